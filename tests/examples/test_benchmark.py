"""examples/benchmark.py: a tiny run prints every figure of its tables (counted FLOPs, cache size and context lengths
checked against what the engine guarantees), its two denoising paths agree, and the 7B configuration built on the
meta device has BAGEL-7B-MoT's size. No timing is asserted: only that the figures are present, finite and >= 0."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # each test runs the benchmark script, several as subprocesses


ROOT = Path(__file__).resolve().parents[2]
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
    # 6 steps: TaylorSeer runs its decoder in full on the first 5 steps and predicts the 6th; text-to-image's guidance
    # stops before the last step (cfg_interval (0.4, 1]), so both step shapes run.
    stdout = _run(
        "--config", "tiny", "--device", "cpu", "--steps", "6", "--warmup_steps", "1", "--decode_tokens", "3",
        "--compare_steps", "1", "--repeats", "2", "--json", str(out),
    )  # fmt: skip

    prefill = {row["task"]: row for row in _table(stdout, "## Context prefill and one CFG denoising step")}
    assert set(prefill) == {"t2i", "edit"}, stdout
    for task, row in prefill.items():
        for key in ("prefill s", "step s", "step GFLOP/s", "GEMM GFLOP/s", "% of GEMM", "% of peak"):
            _number(row[key])
        for key in ("KV cache (bytes)", "prefill GFLOP", "prefill GFLOP (full + no-image alone)", "step GFLOP"):
            assert _number(row[key]) > 0, (task, key)
    # text-to-image runs the full and no-text contexts (its no-image context is the full one); editing all three
    assert prefill["t2i"]["CFG branches"] == "2" and prefill["edit"]["CFG branches"] == "3"
    t2i_lengths = [int(n) for n in prefill["t2i"]["context tokens"].split("/")]
    edit_lengths = [int(n) for n in prefill["edit"]["context tokens"].split("/")]
    assert len(t2i_lengths) == 2 and t2i_lengths[1] == 0  # the no-text context of text-to-image is empty
    assert len(edit_lengths) == 3 and all(edit_lengths)
    # The edit's no-text context (its image) is a prefix of the full one and shares its keys: the cache holds the full
    # and the no-image contexts once each, nothing padded (tiny: 2 layers x K and V x 2 KV heads x 16 dims x 4 bytes).
    per_key = 2 * 2 * 2 * 16 * 4
    assert int(prefill["t2i"]["KV cache (bytes)"]) == per_key * t2i_lengths[0]
    assert int(prefill["edit"]["KV cache (bytes)"]) == per_key * (edit_lengths[0] + edit_lengths[2])
    # ... and the image is prefilled (ViT, VAE encoder, decoder) once, not once per branch that holds it (counted FLOPs)
    edit = prefill["edit"]
    assert _number(edit["prefill GFLOP"]) < 1.2 * _number(edit["prefill GFLOP (full + no-image alone)"])

    whole = {(row["task"], row["method"]): row for row in _table(stdout, "## Whole generation")}
    methods = ["plain", "taylorseer", "first_block", "diffusers_taylorseer", "mag"]
    assert set(whole) == {(task, method) for task in ("t2i", "edit") for method in methods}
    memory = next(key for key in whole["t2i", "plain"] if key.startswith("peak"))
    # MagCache counts per cache context; text-to-image's guided group stops inside the schedule: not applicable
    assert whole["t2i", "mag"]["s/image"] == "n/a"
    for (task, method), row in whole.items():
        if (task, method) == ("t2i", "mag"):
            continue
        for key in ("s/image", "speed-up", "latent error", "decoder runs"):
            _number(row[key])
        # a step cache never runs the decoder more often than the plain call
        assert int(row["decoder runs"]) <= int(whole[task, "plain"]["decoder runs"])
    for task in ("t2i", "edit"):
        _number(whole[task, "plain"][memory])
        assert int(whole[task, "plain"]["decoder runs"]) == 6
        # the original's TaylorSeer predicts the 6th step (no decoder run), so the latents move, but by little
        assert int(whole[task, "taylorseer"]["decoder runs"]) == 5
        assert 0 < _number(whole[task, "taylorseer"]["latent error"]) < 1

    (understand,) = _table(stdout, "## Understanding")
    assert understand["task"] == "understand"
    for key in ("first token s", "decode tok/s", memory, "TFLOP/s", "% of peak"):
        _number(understand[key])

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
    assert figures["tasks"][1]["kv_cache_bytes"] == int(edit["KV cache (bytes)"])
    assert figures["peak_tflops"] > 0 and all(t["gemm_gflop_per_s"] > 0 for t in figures["tasks"][:2])
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
    # plus vae2llm / llm2vae, from the sizes of the BAGEL-7B-MoT release (its `llm_config.json`).
    h, i, kv, n = 3584, 18944, 4 * 128, 28
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i
    expected = 2 * (n * per_layer + (64 * h + h) + (h * 64 + 64))
    assert math.isclose(figures["gflop_per_latent_token"] * 1e9, expected, rel_tol=1e-9)
    assert 12.9 < figures["gflop_per_latent_token"] < 13.2  # "about 13 GFLOP per latent token per branch"
    assert "GFLOP per latent token per CFG branch" in stdout

    # Analysed on fake tensors at 1024x1024 in bfloat16, the pipeline's own prefill and steps, counted by
    # FlopCounterMode, give what the sizes give: every latent token through the generation expert and the latent
    # heads, the two boundary tokens of a row through the understanding expert, attention over the row's context and
    # block (4 x heads x head_dim per query-key pair and layer), the flow-time embedding once per step.
    assert figures["param_bytes"] == 2 * params["total"]
    # (FlopCounterMode counts a matmul's multiply-adds, not its bias additions)
    block, tokens = 64 * 64 + 2, 64 * 64
    und_token = 2 * n * (h * h + 2 * h * kv + h * h + 3 * h * i)
    gen_token = und_token + 2 * (64 * h + h * 64)  # plus vae2llm and llm2vae
    time_embedding = 2 * 4 * (256 * h + h * h)
    for task, branches, guided in (("t2i", 2, 41), ("edit", 3, 50)):
        lengths = figures[task]["context_tokens"]
        assert len(lengths) == branches and figures[task]["guided_steps"] == guided  # cfg_interval (0.4, 1] / [0, 1]
        attention = sum(4 * 28 * 128 * n * block * (length + block) for length in lengths)
        step = branches * (tokens * gen_token + 2 * und_token) + attention + time_embedding
        assert figures[task]["step_flops"] == step, task
        unguided = tokens * gen_token + 2 * und_token + 4 * 28 * 128 * n * block * (lengths[0] + block) + time_embedding
        assert figures[task]["unguided_step_flops"] == unguided, task
        # keys and values of every layer in bfloat16, each token once: the no-text context is a prefix of the full one
        cached = lengths[0] + (lengths[2] if task == "edit" else 0)
        assert figures["kv_cache_bytes"][task] == 2 * n * 4 * 128 * 2 * cached
        total = (figures[task]["prefill_flops"] + guided * step + (50 - guided) * unguided
                 + figures["vae_decode_flops"])  # fmt: skip
        assert figures[task]["total_flops"] == total
        assert math.isclose(figures["floor_s"][task], total / 790e12)
        assert 0 < figures["peak_activation_bytes"][task] < 8 * 2**30
    assert figures["edit"]["prefill_flops"] > 100 * figures["t2i"]["prefill_flops"] > 0  # an image vs a prompt
    assert figures["understand"]["prefill_flops"] > 0 and figures["understand"]["decode_step_flops"] > 0
    assert "floor s at 790 TFLOP/s" in stdout


def test_help_documents_every_flag():
    usage = _run("--help")
    options = usage[usage.index("options:") :]
    flags = re.findall(r"^  (--\w+)", options, flags=re.MULTILINE)
    assert {"--config", "--device", "--dtype", "--attn", "--height", "--width", "--steps", "--tasks", "--repeats",
            "--step_caches", "--num_layers", "--compare_steps", "--compile", "--meta_only", "--json"} <= set(flags)  # fmt: skip
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


def test_prepared_gpu_run_prints_every_figure_against_its_target(tmp_path):
    """`--targets` (what scripts/gpu_benchmark.sh runs on a GPU), rehearsed on the tiny model: one table with every
    figure, the 8-bit and compiled pipelines computing what the float one computes (to int8 rounding, to float
    rounding)."""
    pytest.importorskip("torchao")
    out = tmp_path / "figures.json"
    stdout = _run(
        "--targets", "--config", "tiny", "--device", "cpu", "--steps", "2", "--warmup_steps", "1",
        "--decode_tokens", "3", "--json", str(out),
    )  # fmt: skip
    rows = {row["figure"].strip(): row for row in _table(stdout, "## tiny on CPU")}
    assert len(rows) == 15, rows
    for row in rows.values():
        _number(row["value"])
        assert row["met"] in ("", "yes", "NO") and (row["met"] == "") == (row["target"] == "")
    assert rows["int8 weights: peak memory (GiB)"]["target"] == "<= 17"
    assert rows["understanding: decode (tokens/s)"]["target"] == ">= 60"
    figures = json.loads(out.read_text())["targets"]
    assert 0 < figures["int8_latent_error"] < 0.05  # int8 rounding moves the latents, a little
    assert figures["compiled_latent_error"] < 1e-4  # the compiled layers compute what the eager ones compute
    assert figures["compile_warmup_s"] > 0 and figures["build_s"] > 0


def test_benchmark_imports_no_training_stack():
    """The GPU machine of scripts/gpu_benchmark.sh has no `datasets`: the benchmark (communication counts included)
    must not import the training package, which loads it."""
    code = ("import sys; sys.path.insert(0, 'examples'); import benchmark; "
            "print(sorted(m for m in ('datasets', 'transformers_bagel.training') if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
