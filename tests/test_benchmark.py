"""examples/benchmark.py: a tiny run prints every figure of its tables, its two denoising paths agree, and the 7B
configuration built on the meta device has BAGEL-7B-MoT's size. No timing is asserted."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "benchmark.py"


def _run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _table(stdout: str, title: str) -> list[dict]:
    """The markdown table printed under the heading starting with `title`, as one dict per row."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in row.strip("|").split("|")))) for row in table[2:]]


def _number(cell: str) -> float:
    value = float(cell.rstrip("x"))
    assert math.isfinite(value) and value >= 0, cell
    return value


def test_tiny_run_prints_every_figure_and_both_paths_agree(tmp_path):
    out = tmp_path / "figures.json"
    stdout = _run(
        "--config", "tiny", "--device", "cpu", "--steps", "2", "--warmup_steps", "1", "--decode_tokens", "3",
        "--compare_steps", "1", "--json", str(out),
    )  # fmt: skip

    speed = {row["task"]: row for row in _table(stdout, "## Speed")}
    assert set(speed) == {"t2i", "edit", "understand"}, stdout
    memory = next(key for key in speed["t2i"] if key.startswith("peak"))
    always = ["prefill s", memory, "TFLOP/s", "% of peak"]
    for task in ("t2i", "edit"):
        for key in always + ["s/image", "s/step"]:
            _number(speed[task][key])
        assert speed[task]["first token s"] == speed[task]["decode tok/s"] == "-"
    for key in always + ["first token s", "decode tok/s"]:
        _number(speed["understand"][key])
    assert speed["understand"]["s/step"] == "-"
    # text-to-image runs the full and no-text contexts (its no-image context is the full one); editing all three
    assert speed["t2i"]["CFG branches"] == "2" and speed["edit"]["CFG branches"] == "3"
    assert speed["t2i"]["context tokens"].endswith("/0")  # the no-text context of text-to-image is empty
    assert len(speed["edit"]["context tokens"].split("/")) == 3

    comparison = {row["task"]: row for row in _table(stdout, "## Denoising step")}
    assert set(comparison) == {"t2i", "edit"}
    for row in comparison.values():
        for key in ("sequential s/step", "optimised s/step", "speed-up", "speed-up (median)"):
            _number(row[key])
        # the batched, cached step computes what the uncached public forward computes, branch by branch
        assert _number(row["max abs dv (step 1)"]) <= 1e-4 * _number(row["max abs v"])
        assert _number(row["max abs dx (final)"]) <= 1e-5

    figures = json.loads(out.read_text())
    assert [t["task"] for t in figures["tasks"]] == ["t2i", "edit", "understand"]
    assert figures["tasks"][1]["cfg_branches"] == 3 and figures["comparisons"][1]["cfg_branches"] == 3
    assert figures["peak_tflops"] > 0
    # the tiny configuration's size, counted from its modules, matches the counts derived from its config
    # (q, k, v with biases, o without, SwiGLU MLP, two layernorms and the q/k norms per layer, one final norm)
    hidden, mlp, head_dim, kv, layers = 64, 128, 16, 2 * 16, 2
    per_layer = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden + 3 * hidden * mlp
    per_layer += 2 * hidden + 2 * head_dim
    assert figures["params"]["decoder_generation_expert"] == layers * per_layer + hidden


def test_7b_configuration_has_the_published_size(tmp_path):
    out = tmp_path / "7b.json"
    stdout = _run("--config", "7b", "--meta_only", "--json", str(out))
    figures = json.loads(out.read_text())
    params = figures["params"]
    # BAGEL-7B-MoT: "7B active, 14B total"; Qwen2.5-7B (one expert plus embeddings and head) has 7.62B parameters.
    assert 14.0e9 < params["total"] < 15.0e9
    assert 7.5e9 < params["active_per_token"] < 7.7e9
    assert params["decoder_generation_expert"] == params["decoder_understanding_expert"]
    # 2 x the weights one latent token passes through: 28 layers of q, k, v, o (with biases) and the SwiGLU MLP,
    # plus vae2llm / llm2vae, from SPEC section 2's sizes.
    h, i, kv, n = 3584, 18944, 4 * 128, 28
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i
    expected = 2 * (n * per_layer + (64 * h + h) + (h * 64 + 64))
    assert math.isclose(figures["gflop_per_latent_token"] * 1e9, expected, rel_tol=1e-9)
    assert 12.9 < figures["gflop_per_latent_token"] < 13.2  # "about 13 GFLOP per latent token per branch"
    assert "GFLOP per latent token per CFG branch" in stdout


def test_help_documents_every_flag():
    usage = _run("--help")
    options = usage[usage.index("options:") :]
    flags = re.findall(r"^  (--\w+)", options, flags=re.MULTILINE)
    assert {"--config", "--device", "--dtype", "--attn", "--height", "--width", "--steps", "--tasks",
            "--compare_steps", "--compile", "--meta_only", "--json"} <= set(flags)  # fmt: skip
    for flag in flags:
        # every flag is followed by its description (on its own line or the next)
        text = options.split(flag, 1)[1].split("\n  --", 1)[0]
        assert len(re.sub(r"^[ A-Z_{},0-9a-z-]*\n", "", text).strip()) > 10, flag


def test_int8_quantised_run(tmp_path):
    pytest.importorskip("torchao")
    out = tmp_path / "figures.json"
    stdout = _run(
        "--config", "tiny", "--device", "cpu", "--steps", "2", "--warmup_steps", "1", "--tasks", "t2i",
        "--compare_steps", "1", "--quantize", "int8", "--json", str(out),
    )  # fmt: skip
    assert "decoder weights quantised to int8" in stdout
    report = json.loads(out.read_text())
    assert report["quantize"] == "int8" and report["tasks"][0]["task"] == "t2i"
    assert _number(str(report["tasks"][0]["s_per_image"])) > 0
