"""The Flow-GRPO demonstration on the digits BAGEL (`examples/train_grpo.py`): its reward, and the shipped adapter
(`checkpoints/tiny-bagel-digits-grpo`) drawing the requested digit without guidance where the model alone does not."""

import inspect
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import DIGITS_CHECKPOINT, ROOT


pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install -e '.[digits]')")
sys.path.insert(0, str(ROOT / "examples"))

from digits import DigitClassifier, generation_accuracy, split_digits, to_pil  # noqa: E402
from train_grpo import DigitProbabilityReward, prompt_dataset  # noqa: E402


ADAPTER = ROOT / "checkpoints" / "tiny-bagel-digits-grpo"


@pytest.fixture(scope="module")
def split():
    return split_digits()


def test_reward_is_the_judges_probability_of_the_requested_digit(split):
    judge = DigitClassifier(split.train_images, split.train_labels, probability=True)
    images = [to_pil(image) for image in split.held_out_images[:40]]
    labels = split.held_out_labels[:40]
    probabilities = judge.probabilities(images)
    assert probabilities.shape == (40, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)
    reward = DigitProbabilityReward(judge)
    right = np.asarray(reward(images, ["unused"] * 40, digit=list(labels)))
    wrong = np.asarray(reward(images, ["unused"] * 40, digit=[(int(label) + 1) % 10 for label in labels]))
    np.testing.assert_allclose(right, probabilities[np.arange(40), labels])
    assert np.median(right) > 0.8 and np.median(wrong) < 0.05  # real digits: the right one is likely, others not
    with pytest.raises(ValueError, match="without `probability=True`"):
        DigitClassifier(split.train_images[:100], split.train_labels[:100]).probabilities(images)


def test_prompt_dataset_pairs_each_prompt_with_its_digit():
    dataset = prompt_dataset(repeats=3)
    assert len(dataset) == 30 and dataset.column_names == ["prompt", "digit"]
    assert dataset[13] == {"prompt": "a handwritten digit three", "digit": 3}


def test_shipped_adapter_draws_the_requested_digit_without_guidance(split):
    """The adapter's README (per digit, 1,000 images per setting) measures the lift; this sample of 200 images, on
    other seeds, checks that it holds: the adapter under its `setting.json` draws the requested digit far more often
    than the model alone under the same arguments, and nearly as often as the model with its default guidance."""
    from diffusers_bagel import BagelPipeline
    from transformers_bagel.training.lora import load_bagel_lora

    setting = json.loads((ADAPTER / "setting.json").read_text())
    call_parameters = inspect.signature(BagelPipeline.__call__).parameters
    assert setting["cfg_text_scale"] == 1.0 and set(setting) <= set(call_parameters)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    judge = DigitClassifier(split.held_out_images, split.held_out_labels)
    pipe = BagelPipeline.from_pretrained(DIGITS_CHECKPOINT)
    pipe.set_progress_bar_config(disable=True)
    guided = generation_accuracy(pipe, judge, 20, seed=7, num_inference_steps=setting["num_inference_steps"])
    alone = generation_accuracy(pipe, judge, 20, seed=7, **setting)
    load_bagel_lora(pipe, ADAPTER)
    adapted = generation_accuracy(pipe, judge, 20, seed=7, **setting)
    assert adapted.accuracy >= alone.accuracy + 0.12, (alone.per_digit, adapted.per_digit)
    assert adapted.accuracy >= guided.accuracy - 0.05, (guided.per_digit, adapted.per_digit)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "{tmp}"], "is not a pipeline folder"),
        (["--cfg_text_scale", "0.5"], "--cfg_text_scale must be >= 1"),
        (["--sde_window_size", "20"], "--sde_window_size (20) exceeds --steps (16)"),
        (["--beta", "-1"], "`beta` must be >= 0"),
        (["--num_generations", "1"], "`num_generations` must be an integer >= 2"),
        (["--steps", "0"], "expected a positive integer"),
    ],
)
def test_training_script_refuses_bad_settings_before_any_work(argv, message, tmp_path, capsys, monkeypatch):
    import train_grpo

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(train_grpo.BagelPipeline, "from_pretrained", no_loading)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    monkeypatch.setattr(sys, "argv", ["train_grpo.py", "--adapter_dir", str(tmp_path / "adapter"), *argv])
    with pytest.raises(SystemExit) as exit_:
        train_grpo.main()
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_training_script_writes_the_adapter_its_setting_and_readme(tmp_path):
    command = [sys.executable, str(ROOT / "examples" / "train_grpo.py"), "--adapter_dir", str(tmp_path / "adapter"),
               "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--prompts_per_step", "2",
               "--num_generations", "2", "--steps", "4", "--eval_per_digit", "1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = tmp_path / "adapter"
    names = {path.name for path in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "setting.json", "README.md", "eval.json"} <= names
    assert json.loads((adapter / "setting.json").read_text()) == {
        "num_inference_steps": 4, "cfg_text_scale": 1.0, "timestep_shift": 3.0
    }  # fmt: skip
    numbers = json.loads((adapter / "eval.json").read_text())
    assert numbers["training"]["steps"] == 2 and numbers["with_adapter"]["images"] == 10
    readme = (adapter / "README.md").read_text()
    assert "| shipped model + this adapter, this setting |" in readme and "--max_steps 2" in readme
