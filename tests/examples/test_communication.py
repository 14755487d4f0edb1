"""examples/benchmarking/communication.py (`examples/benchmark.py --communication`): the bytes each GPU sends per
denoising step equal the hand formulas from BAGEL-7B's configuration, the step FLOPs equal the counts `--meta_only`
makes on fake tensors, and no mode is faster than N GPUs of compute."""

import json
import sys

import pytest
import torch
from conftest import ROOT

from transformers_bagel import BagelConfig, BagelForConditionalGeneration


sys.path.insert(0, str(ROOT / "examples"))
import benchmark  # noqa: E402
from benchmarking.communication import communication_report, communication_table  # noqa: E402


LAYERS, HIDDEN, KV_WIDTH = 28, 3584, 4 * 128  # BAGEL-7B-MoT's decoder (Qwen2.5-7B): 28 layers, 4 KV heads of 128
LATENTS, PATCH_DIM = 64 * 64, 2 * 2 * 16  # a 1024x1024 image: 64x64 latent tokens of 2x2 patches of 16 channels
BLOCK = LATENTS + 2  # the latent block of a step: the latents between a start and an end marker
BRANCHES = {"t2i": 2, "edit": 3}


@pytest.fixture(scope="module")
def report():
    with torch.device("meta"):
        model = BagelForConditionalGeneration(BagelConfig())
    return communication_report(model, 1024, 1024, 50, 790.0)


def _row(report, mode, task, n):
    (row,) = [r for r in report["rows"] if r["mode"] == mode and r["task"].startswith(task) and r["gpus"] == n]
    return row


def test_shapes_and_flops_are_those_the_fake_tensor_run_counts(report):
    # `python examples/benchmark.py --config 7b --meta_only` (README): context tokens per branch, guided steps of 50,
    # and FLOPs of a guided and an unguided step counted by FlopCounterMode on fake tensors.
    tasks = report["tasks"]
    assert tasks["t2i"]["contexts"] == (46, 0) and tasks["edit"]["contexts"] == (9037, 9000, 37)
    assert tasks["t2i"]["guided_steps"] == 41 and tasks["edit"]["guided_steps"] == 50
    for task, guided, unguided in (("t2i", 120.53e12, 60.30e12), ("edit", 210.41e12, 75.09e12)):
        row = _row(report, "tp", task, 2)
        assert row["flops"] == pytest.approx(guided, rel=1e-4)
        assert row["unguided"]["flops"] == pytest.approx(unguided, rel=1e-4)


def test_cfg_gathers_one_float32_velocity_per_branch(report):
    velocity = LATENTS * PATCH_DIM * 4  # guided_velocity combines the branches' velocities in float32
    assert _row(report, "cfg", "t2i", 2)["bytes_per_gpu"] == 1 / 2 * 2 * velocity  # all-gather: (N-1)/N x S
    assert _row(report, "cfg", "edit", 3)["bytes_per_gpu"] == pytest.approx(2 / 3 * 3 * velocity)
    assert _row(report, "cfg", "edit", 2)["bytes_per_gpu"] == 2 * velocity  # 3 branches on 2 GPUs: shares padded to 2
    assert _row(report, "cfg", "t2i", 2)["unguided"]["bytes_per_gpu"] == velocity  # one branch, broadcast by its GPU
    assert not [r for r in report["rows"] if r["mode"] == "cfg" and r["gpus"] > BRANCHES[r["task"]]]


@pytest.mark.parametrize("task", ["t2i", "edit"])
@pytest.mark.parametrize("n", [2, 4])
def test_tp_and_sequence_parallel_bytes_follow_the_hand_formulas(report, task, n):
    tokens = BRANCHES[task] * BLOCK
    tp = 2 * LAYERS * tokens * HIDDEN * 2 * 2 * (n - 1) / n  # two bf16 all-reduces per layer: 2 (N-1)/N x S
    assert _row(report, "tp", task, n)["bytes_per_gpu"] == pytest.approx(tp, rel=1e-12)
    ulysses = LAYERS * (n - 1) / n * tokens / n * (HIDDEN + 2 * KV_WIDTH + HIDDEN) * 2  # q, k, v in; output back
    assert _row(report, "ulysses", task, n)["bytes_per_gpu"] == pytest.approx(ulysses, rel=1e-12)
    ring = LAYERS * (n - 1) * tokens / n * 2 * KV_WIDTH * 2  # the block's k and v, N - 1 hops
    assert _row(report, "ring", task, n)["bytes_per_gpu"] == pytest.approx(ring, rel=1e-12)
    assert _row(report, "tp", task, n)["comm_s"]["NVLink"] == pytest.approx(tp / 450e9)
    assert _row(report, "tp", task, n)["comm_s"]["PCIe"] == pytest.approx(tp / 50e9)


def test_heads_decide_where_tp_and_ulysses_apply(report):
    # 28 query heads and 4 key/value heads: 2 and 4 GPUs, not 3 or 8 (ring attention shards tokens, not heads)
    for mode, counts in (("tp", {2, 4}), ("ulysses", {2, 4}), ("ring", {2, 3, 4, 8}), ("fsdp", {2, 3, 4, 8})):
        assert {r["gpus"] for r in report["rows"] if r["mode"] == mode} == counts, mode


def test_fsdp_gathers_decoder_layers_twice_and_reduces_every_gradient(report):
    units = report["fsdp_units"]
    assert sum(units.values()) == 14_575_018_464  # every parameter of BAGEL-7B-MoT in exactly one unit
    assert units["decoder_layers"] > 13e9 and units["vit_layers"] > 0.39e9
    row = _row(report, "fsdp", "train", 8)
    per_param = 2 * units["decoder_layers"] + units["root"] + units["decoder_layers"] + units["root"]
    assert row["bytes_per_gpu"] == pytest.approx(7 / 8 * per_param * 2)


def test_speedups_stay_below_the_gpu_count(report):
    for r in report["rows"]:
        for link in ("NVLink", "PCIe"):
            n, s = r["gpus"], r["speedup"][link]
            assert 1 < s["no_overlap"] < n and s["no_overlap"] <= s["overlap"] <= n * (1 + 1e-12), (r["mode"], n)
            if r["image_speedup"] is not None:
                image = r["image_speedup"][link]
                assert 1 < image["no_overlap"] < n and image["overlap"] <= n * (1 + 1e-12), (r["mode"], n)
    # t2i's 9 unguided steps of 50 run one branch: guidance-parallel gains nothing there
    image = _row(report, "cfg", "t2i", 2)["image_speedup"]["NVLink"]["no_overlap"]
    assert image == pytest.approx((41 * 120.53 + 9 * 60.30) / (41 * 60.30 + 9 * 60.30), rel=1e-3)


def test_command_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "communication.json"
    benchmark.main(["--communication", "--json", str(out)])
    stdout = capsys.readouterr().out
    headers, rows = communication_table(json.loads(out.read_text()))
    assert stdout.startswith("## Communication per denoising step: 7b, 1024x1024")
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 1 and [c.strip() for c in table[0].strip("|").split("|")] == headers
