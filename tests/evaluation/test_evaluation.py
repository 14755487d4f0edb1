"""`bagel eval` (seeded, batched, resumable benchmark generation in the official layouts) and the lmms-eval model."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "checkpoints" / "tiny-bagel-digits"
sys.path.insert(0, str(ROOT / "examples"))

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STEPS = ["--num_inference_steps", "2", "--no_progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def digits():
    """Three real digit images (7, 3, 1) from the digits demo's data."""
    pytest.importorskip("sklearn")
    from digits.data import load_digits_images, to_pil

    images, labels = load_digits_images()
    return [to_pil(images[list(labels).index(label)]) for label in (7, 3, 1)]


def _run(*argv):
    from diffusers_bagel.cli import main

    assert main(["eval", *argv, "--checkpoint", str(CHECKPOINT), *STEPS]) == 0


def _tree(folder: Path) -> list[str]:
    """The folder's files but the settings record (checked on its own by tests/test_evaluation_safety.py)."""
    files = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(p for p in files if p != "bagel_eval_settings.json")


def _hashes(folder: Path) -> dict:
    return {p: hashlib.sha256((folder / p).read_bytes()).hexdigest() for p in _tree(folder)}


def _mtimes(folder: Path) -> dict:
    return {p: os.stat(folder / p).st_mtime_ns for p in _tree(folder)}


def _check_seeded_and_resumable(argv, out: Path, other: Path, deleted: str):
    """Same seed -> bit-identical files; a rerun writes nothing; a deleted output comes back identical."""
    _run(*argv, "--output_dir", str(out))
    first = _hashes(out)
    _run(*argv, "--output_dir", str(other))
    assert _hashes(other) == first
    before = _mtimes(out)
    _run(*argv, "--output_dir", str(out))
    assert _mtimes(out) == before  # nothing rewritten
    (out / deleted).unlink()
    _run(*argv, "--output_dir", str(out))
    assert _hashes(out) == first
    assert {p: t for p, t in _mtimes(out).items() if p != deleted} == {p: t for p, t in before.items() if p != deleted}
    return first


def test_sample_seed_is_derived_from_seed_and_index():
    from diffusers_bagel.evaluation import sample_seed

    assert sample_seed(0, 3, 1) == sample_seed(0, 3, 1)
    assert len({sample_seed(0, i, k) for i in range(5) for k in range(4)} | {sample_seed(1, 0, 0)}) == 21
    with pytest.raises(ValueError, match="index"):
        sample_seed(0, -1)


def test_geneval_layout_seed_resume(tmp_path):
    lines = [json.dumps({"tag": "single_object", "include": [{"class": w, "count": 1}], "prompt": f"a handwritten digit {w}"})
             for w in ("seven", "three", "one")]  # fmt: skip
    data = tmp_path / "evaluation_metadata.jsonl"
    data.write_text("\n".join(lines) + "\n")
    argv = ["geneval", "--data", str(data), "--n_samples", "2", "--batch_size", "2", "--seed", "5"]
    hashes = _check_seeded_and_resumable(argv, tmp_path / "a", tmp_path / "b", "00001/samples/00001.png")
    expected = [f"{i:05d}/{name}" for i in range(3) for name in ("grid.png", "metadata.jsonl", "samples/00000.png", "samples/00001.png")]
    assert sorted(hashes) == expected
    for i, line in enumerate(lines):
        assert json.loads((tmp_path / "a" / f"{i:05d}" / "metadata.jsonl").read_text()) == json.loads(line)
    assert hashes["00000/samples/00000.png"] != hashes["00000/samples/00001.png"]  # samples get their own seeds
    _run(*argv, "--seed", "6", "--skip_grid", "--limit", "1", "--output_dir", str(tmp_path / "c"))
    assert _tree(tmp_path / "c") == ["00000/metadata.jsonl", "00000/samples/00000.png", "00000/samples/00001.png"]
    assert _hashes(tmp_path / "c")["00000/samples/00000.png"] != hashes["00000/samples/00000.png"]


def test_run_benchmark_in_python_writes_what_the_command_writes(tmp_path):
    """The library route (`run_benchmark(pipe, ...)`) is the command's plan-then-run, with the same files."""
    from diffusers_bagel import BagelPipeline
    from diffusers_bagel.evaluation import run_benchmark

    data = tmp_path / "evaluation_metadata.jsonl"
    data.write_text(json.dumps({"tag": "single_object", "include": [{"class": "seven", "count": 1}],
                                "prompt": "a handwritten digit seven"}) + "\n")  # fmt: skip
    _run("geneval", "--data", str(data), "--n_samples", "1", "--seed", "3", "--output_dir", str(tmp_path / "cli"))
    pipe = BagelPipeline.from_pretrained(CHECKPOINT)
    pipe.set_progress_bar_config(disable=True)
    summary = run_benchmark(pipe, "geneval", data, tmp_path / "lib", n_samples=1, seed=3, num_inference_steps=2,
                            progress=False, checkpoint=CHECKPOINT)  # fmt: skip
    assert summary.skipped == 0 and _hashes(tmp_path / "lib") == _hashes(tmp_path / "cli")
    assert run_benchmark(pipe, "geneval", data, tmp_path / "lib", n_samples=1, seed=3, num_inference_steps=2,
                         progress=False, checkpoint=CHECKPOINT).skipped == 1  # fmt: skip


def test_wise_layout_with_thinking(tmp_path):
    entries = [{"Prompt": f"a handwritten digit {w}", "prompt_id": i + 1, "Category": "digits"} for i, w in enumerate(("two", "five"))]
    data = tmp_path / "final_data.json"
    data.write_text(json.dumps(entries))
    argv = ["wise", "--data", str(data), "--think", "--max_think_tokens", "4", "--batch_size", "2"]
    hashes = _check_seeded_and_resumable(argv, tmp_path / "a", tmp_path / "b", "2.png")
    assert sorted(hashes) == ["1.png", "1.txt", "2.png", "2.txt"]


def _save(images, folder: Path, names):
    folder.mkdir(parents=True, exist_ok=True)
    for image, name in zip(images, names):
        image.save(folder / name)


def test_imgedit_layout(tmp_path, digits):
    root = tmp_path / "singleturn"
    _save(digits, root / "animal", ["a.jpg", "b.jpg", "c.jpg"])
    entries = {f"k{i}": {"id": f"animal/{n}.jpg", "prompt": f"change the digit to {w}", "edit_type": "replace"}
               for i, (n, w) in enumerate(zip("abc", ("three", "eight", "zero")))}  # fmt: skip
    (root / "singleturn.json").write_text(json.dumps(entries))
    argv = ["imgedit", "--data", str(root / "singleturn.json"), "--batch_size", "2"]
    hashes = _check_seeded_and_resumable(argv, tmp_path / "a", tmp_path / "b", "k2.png")
    assert sorted(hashes) == ["k0.png", "k1.png", "k2.png"]


def test_kris_layout(tmp_path, digits):
    bench = tmp_path / "KRIS_Bench"
    _save(digits[:2], bench / "count_change", ["1.jpg", "2.jpg"])
    _save(digits[2:], bench / "multi-element_composition", ["1.jpg"])
    entries = [
        {"id": "1", "type": "count_change", "ori_img": "1.jpg", "ins_en": "change the digit to three"},
        {"id": "2", "type": "count_change", "ori_img": "2.jpg", "ins_en": "change the digit to nine"},
        {"id": "1", "type": "multi-element_composition", "ori_img": ["1.jpg"], "ins_en": "change the digit to four"},
    ]
    (tmp_path / "final_data.json").write_text(json.dumps(entries))
    argv = ["kris", "--data", str(tmp_path / "final_data.json"), "--batch_size", "3"]
    hashes = _check_seeded_and_resumable(argv, tmp_path / "bagel", tmp_path / "b", "count_change/2.png")
    assert sorted(hashes) == ["count_change/1.png", "count_change/2.png", "multi-element_composition/1.png"]


def test_rise_layout(tmp_path, digits):
    _save(digits[:2], tmp_path / "data" / "logical_reasoning_images", ["l1.png", "l2.png"])
    entries = [
        {"index": f"logical_{i}", "category": "logical", "image": f"logical_reasoning_images/l{i}.png",
         "instruction": f"change the digit to {w}", "subtask": "digits"}
        for i, w in ((1, "six"), (2, "two"))
    ]  # fmt: skip
    (tmp_path / "data" / "datav2_total_w_subtask.json").write_text(json.dumps(entries))
    argv = ["rise", "--data", str(tmp_path / "data" / "datav2_total_w_subtask.json")]
    hashes = _check_seeded_and_resumable(argv, tmp_path / "a", tmp_path / "b", "logical/logical_1.png")
    assert sorted(hashes) == ["logical/logical_1.png", "logical/logical_2.png"]


def test_gedit_layout(tmp_path, digits):
    datasets = pytest.importorskip("datasets")
    rows = {
        "key": ["g0", "g1"],
        "task_type": ["subject-replace", "color_alter"],
        "instruction_language": ["en", "en"],
        "instruction": ["change the digit to three", "change the digit to five"],
        "input_image": digits[:2],
    }
    features = datasets.Features({**{k: datasets.Value("string") for k in rows if k != "input_image"}, "input_image": datasets.Image()})
    (tmp_path / "GEdit-Bench" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "GEdit-Bench" / "data" / "train-00000-of-00001.parquet")
    argv = ["gedit", "--data", str(tmp_path / "GEdit-Bench"), "--batch_size", "2"]
    hashes = _check_seeded_and_resumable(argv, tmp_path / "gen_image", tmp_path / "b", "fullset/color_alter/en/g1.png")
    assert sorted(hashes) == [
        "fullset/color_alter/en/g1.png", "fullset/color_alter/en/g1_SRCIMG.png",
        "fullset/subject-replace/en/g0.png", "fullset/subject-replace/en/g0_SRCIMG.png",
    ]  # fmt: skip


def test_bad_inputs_are_named(tmp_path):
    from diffusers_bagel.evaluation import load_benchmark

    (tmp_path / "m.jsonl").write_text('{"prompt": "a", "tag": "t"}\n\n{"prompt": "b", "tag": "t"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: blank line"):
        load_benchmark("geneval", tmp_path / "m.jsonl")
    (tmp_path / "w.json").write_text('[{"prompt_id": 1}]')
    with pytest.raises(ValueError, match="entry 0: missing field 'Prompt'"):
        load_benchmark("wise", tmp_path / "w.json")
    with pytest.raises(ValueError, match="--n_samples 1"):
        load_benchmark("wise", tmp_path / "w.json", n_samples=2)
    (tmp_path / "k.json").write_text('[{"id": "1", "type": "x", "ori_img": "1.jpg", "ins_en": "do"}]')
    with pytest.raises(ValueError, match="not found"):
        load_benchmark("kris", tmp_path / "k.json")


# -- lmms-eval ---------------------------------------------------------------------------------------------------------


def test_lmms_eval_answers_a_local_task(tmp_path, digits, monkeypatch):
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the `eval` extra)")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from transformers_bagel.lmms_eval_bagel import MODEL_ID, lmms_eval_manifest, register_bagel_model

    images = tmp_path / "images"
    _save(digits, images, ["7.png", "3.png", "1.png"])
    with open(tmp_path / "digits.jsonl", "w") as fp:
        for name, answer in (("7.png", "seven"), ("3.png", "three"), ("1.png", "one")):
            fp.write(json.dumps({"image": str(images / name), "question": "Which digit is this?", "answer": answer}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "digits_utils.py").write_text(
        "from PIL import Image\n"
        "def doc_to_visual(doc):\n    return [Image.open(doc['image']).convert('RGB')]\n"
        "def doc_to_text(doc):\n    return doc['question']\n"
    )
    (tasks / "local_digits.yaml").write_text(
        f"task: local_digits\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'digits.jsonl'}\n"
        f"test_split: test\n"
        f"output_type: generate_until\n"
        f"doc_to_visual: !function digits_utils.doc_to_visual\n"
        f"doc_to_text: !function digits_utils.doc_to_text\n"
        f"doc_to_target: answer\n"
        f"generation_kwargs:\n  max_new_tokens: 8\n  until: ['\\n']\n"
        f"metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    import lmms_eval.evaluator

    # lmms-eval 0.7.3 patches filelock through `filelock._api`, gone in filelock 4 (this environment's): its own
    # "already patched" flag skips that patch, which only matters for nested multi-process dataset loading.
    monkeypatch.setattr(lmms_eval.evaluator._enable_reentrant_filelocks, "_patched", True, raising=False)
    register_bagel_model()
    assert lmms_eval_manifest().model_id == MODEL_ID
    results = simple_evaluate(
        model=MODEL_ID,
        model_args=f"pretrained={CHECKPOINT},device=cpu,max_new_tokens=8",
        tasks=["local_digits"],
        batch_size=2,
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    answers = [sample["filtered_resps"][0] for sample in results["samples"]["local_digits"]]
    assert len(answers) == 3
    assert results["results"]["local_digits"]["exact_match,none"] >= 2 / 3, answers


def test_lmms_eval_model_answers_a_batch_as_each_request_alone(digits, monkeypatch):
    """`BagelLmms` answers a batch with one `generate_answers` call; each answer is the one `generate_answer` gives
    the request alone. Without the `eval` extra, lmms-eval's base class is stubbed (the model needs nothing else)."""
    import types

    from transformers_bagel.chat import generate_answer, understanding_messages

    module_name = "transformers_bagel.lmms_eval_bagel"
    stubbed = False
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        stub = types.ModuleType("lmms_eval.api.model")
        stub.lmms = type("lmms", (), {})
        for name in ("lmms_eval", "lmms_eval.api"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, "lmms_eval.api.model", stub)
        stubbed = module_name not in sys.modules
    try:
        from transformers_bagel.lmms_eval_bagel import BagelLmms

        model = BagelLmms(pretrained=str(CHECKPOINT), device="cpu", batch_size=3, max_new_tokens=8)
    finally:
        if stubbed:  # the next import of the module finds the real lmms-eval (or its clear ImportError)
            sys.modules.pop(module_name, None)
    model.task_dict = {"digits": {"test": dict(enumerate(digits))}}
    questions = ["Which digit is this?", "Which digit is it? Answer in one word.", "Which digit is this?"]
    gen_kwargs = {"max_new_tokens": 8, "until": ["\n"]}  # prompts of two lengths: the batch is left-padded
    requests = [types.SimpleNamespace(args=(question, gen_kwargs, lambda doc: [doc], index, "digits", "test"))
                for index, question in enumerate(questions)]  # fmt: skip
    batched = model._generate(requests)
    alone = [model._answer(generate_answer(model.model, model.processor, understanding_messages(question, [image]), 8),
                           ["\n"]) for question, image in zip(questions, digits)]  # fmt: skip
    assert batched == alone
    assert "seven" in batched[0].lower(), batched


def test_lmms_eval_entry_point_is_declared():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["lmms_eval.models"]["bagel_hf"]
    assert target == "transformers_bagel.lmms_eval_bagel:lmms_eval_manifest"
    assert "lmms-eval" in " ".join(project["project"]["optional-dependencies"]["eval"])
