"""`accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/train.py` on the CPU (gloo, real
subprocesses on the tiny model): the model is really sharded with FSDP2 (checkpoints written by both ranks), the
first losses of 2 processes equal the single-process run on the same data, and a sharded checkpoint resumes to the
same loss on 2 processes and on 1 (DCP resharding). Plus the refusal when FSDP is asked for where it cannot apply.

"Same data": the data are two understanding rows of different lengths (text only: no flow-matching noise, which is
drawn per process). With 2 processes each row is its own packed batch (`--max_tokens` fits one row), one per rank,
and the trainer normalises each loss by the token count of both (the original's `sum * world / total`); the
single process packs both rows into one batch (`--max_tokens` doubled). Every step is then one epoch over the same
two rows, in both runs."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_port


ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "accelerate" / "fsdp2.yaml"
TRAIN = ROOT / "examples" / "train.py"
ONE_ROW_TOKENS, TWO_ROW_TOKENS = 48, 96



def _train(launcher: list[str], checkpoint: Path, data: Path, out: Path, max_tokens: int, *extra) -> list[float]:
    command = [*launcher, str(TRAIN), "--checkpoint", str(checkpoint), "--data", str(data), "--task", "understanding",
               "--output_dir", str(out), "--max_steps", "3", "--save_steps", "2", "--logging_steps", "1",
               "--max_tokens", str(max_tokens), "--warmup_steps", "0", "--learning_rate", "1e-3", "--ema", "0",
               "--text_dropout", "0", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads((out / "train_summary.json").read_text())["losses"]


def _accelerate(processes: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
            "--num_processes", str(processes), "--main_process_port", str(free_port())]  # fmt: skip


@pytest.fixture(scope="module")
def two_rows(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    rows = [{"question": "what is the first item?", "answer": "it is the first item of the short list"},
            {"question": "and the second?", "answer": "the second"}]  # fmt: skip
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


@pytest.fixture(scope="module")
def sharded_run(converted_dir, two_rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    losses = _train(_accelerate(2), converted_dir, two_rows, out, ONE_ROW_TOKENS)
    return out, losses


@pytest.mark.slow
def test_launch_shards_and_matches_the_single_process_losses(converted_dir, two_rows, sharded_run, tmp_path):
    out, sharded = sharded_run
    # one packed batch per rank per step (not both rows on each rank): the run saw the data once per step
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["epoch"] == 2.0
    # sharded checkpoints: model and optimiser written by both ranks with torch.distributed.checkpoint
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (out / "checkpoint-2" / folder).glob("*.distcp")) == ["__0_0.distcp",
                                                                                          "__1_0.distcp"]
    # the final model is gathered into an ordinary, loadable folder
    assert (out / "final" / "model" / "model.safetensors").is_file()

    single = _train([sys.executable], converted_dir, two_rows, tmp_path / "single", TWO_ROW_TOKENS)
    assert len(sharded) == len(single) == 3
    for step, (a, b) in enumerate(zip(sharded, single), 1):
        assert abs(a - b) < 1e-5, (step, sharded, single)
    assert sharded[2] < sharded[0]  # it trains


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 1])
def test_sharded_checkpoint_resumes_to_the_same_loss(converted_dir, two_rows, sharded_run, tmp_path, processes):
    """Step 3 after resuming from the 2-process checkpoint of step 2, on 2 processes and resharded onto 1."""
    out, sharded = sharded_run
    max_tokens = ONE_ROW_TOKENS if processes == 2 else TWO_ROW_TOKENS
    resumed = _train(_accelerate(processes), converted_dir, two_rows, tmp_path / "resumed", max_tokens,
                     "--resume_from_checkpoint", str(out / "checkpoint-2"))  # fmt: skip
    assert abs(resumed[-1] - sharded[2]) < 1e-5, (resumed, sharded)


def test_fsdp_that_cannot_apply_is_refused(monkeypatch):
    """FSDP asked for in a run accelerate does not see as distributed: refused, not trained unsharded."""
    from accelerate.utils import DistributedType

    from transformers_bagel.training.fsdp import enable_fsdp2_on_cpu

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    accelerator = SimpleNamespace(state=SimpleNamespace(distributed_type=DistributedType.NO, fsdp_plugin=None))
    with pytest.raises(ValueError, match="cannot shard"):
        enable_fsdp2_on_cpu(accelerator)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert enable_fsdp2_on_cpu(accelerator) is False


@pytest.mark.slow
def test_startup_reads_the_weights_once_per_machine(tmp_path):
    """scripts/measure_fsdp_startup_memory.py: a 0.5 GB float32 BAGEL on 2 CPU processes; the sum of the ranks' peak
    host memory over their baselines stays under 1.6x the model (loading once per process would cost 2x or more)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("measure", ROOT / "scripts" / "measure_fsdp_startup_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.measure(megabytes=520, num_processes=2, workdir=tmp_path)
    assert figures["model_bytes"] >= 500 * 2**20
    assert all(rank["sharded"] and rank["finite"] for rank in figures["ranks"])
    # the shards add up to the parameters (the model's bytes also count its few buffers, which are not sharded)
    assert sum(rank["local_bytes"] for rank in figures["ranks"]) >= 0.95 * figures["model_bytes"]
    assert figures["ratio"] < 1.6, figures
