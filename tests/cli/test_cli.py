"""The `bagel` command: installed entry point, help for every flag, each subcommand against the pipeline's own output,
the converted folder's exact file list and model card, `push` (with the Hub calls replaced), and actionable errors."""

import io
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import PIL.Image
import pytest
import torch

from conftest import ORIGINAL_DIR, TINY_IMAGE_SIZES
from diffusers_bagel.cli import build_parser, main
from transformers_bagel.chat import generate_answer, understanding_messages


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:40, 0:50]
    pixels = np.stack([x * 5, y * 6, 250 - x * 5], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("cli-input") / "input.png"
    PIL.Image.fromarray(pixels).save(path)
    return path


def _run(argv, capsys):
    """Runs `bagel ARGV` in this process; returns (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# -- entry point and help ---------------------------------------------------------------------------------------------


def test_console_script_is_installed_and_lists_subcommands():
    script = Path(sys.executable).parent / "bagel"
    assert script.is_file(), "the `bagel` console script is missing: reinstall the package (pip install -e .)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120, check=True)
    for command in ("convert", "generate", "edit", "chat", "push"):
        assert f"    {command} " in result.stdout, result.stdout


def test_help_documents_every_flag_with_its_default(capsys):
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("generate", "edit", "chat", "push"):
        code, out, _ = _run([name, "--help"], capsys)
        assert code == 0
        help_text = " ".join(out.split())
        for action in subparsers[name]._actions:
            assert action.help, f"bagel {name} {action.option_strings} has no help text"
            for option in action.option_strings:
                assert option in out, f"{option} missing from `bagel {name} --help`"
            if action.option_strings and not action.required and action.default not in (None, [], False, True, "==SUPPRESS=="):
                shown = " ".join(str(action.default).split())
                assert f"(default: {shown})" in help_text, f"default of {action.option_strings} not shown"
    code, out, _ = _run(["convert", "--help"], capsys)
    assert code == 0 and out.startswith("usage: bagel convert") and "--vae_max_image_size" in out


def test_generate_help_shows_the_text_to_image_preset_and_edit_the_edit_preset(capsys):
    _, generate, _ = _run(["generate", "--help"], capsys)
    _, edit, _ = _run(["edit", "--help"], capsys)
    generate, edit = " ".join(generate.split()), " ".join(edit.split())
    assert "(default: 1.5)" in generate and "(default: global)" in generate and "(default: [0.4, 1.0])" in generate
    assert "(default: 2.0)" in edit and "(default: text_channel)" in edit and "(default: [0.0, 1.0])" in edit


# -- convert: the folder a user gets ----------------------------------------------------------------------------------


def test_convert_writes_exactly_the_expected_files_and_a_valid_model_card(tmp_path, capsys):
    out_dir = tmp_path / "bagel-tiny-hf"
    sizes = [item for name, value in TINY_IMAGE_SIZES.items() for item in (f"--{name}", value)]
    code, out, _ = _run(
        ["convert", "--input_dir", ORIGINAL_DIR, "--output_dir", out_dir, "--max_shard_size", "1MB", *sizes], capsys
    )
    assert code == 0 and str(out_dir) in out
    files = {str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file()}
    shards = sorted(f for f in files if f.startswith("model/model-"))
    assert len(shards) > 1, "the 1MB shard size should split the tiny model"
    assert shards == [f"model/model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert files == {
        "README.md",
        "model_index.json",
        "pipeline_bagel.py",  # diffusers' custom-pipeline route
        "config.json",  # these two only point transformers' Auto classes at the subfolders
        "processor_config.json",
        "model/config.json",
        "model/generation_config.json",
        "model/model.safetensors.index.json",
        *shards,
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "processor/chat_template.jinja",
        "processor/processor_config.json",
        "processor/tokenizer.json",
        "processor/tokenizer_config.json",
    }

    card = huggingface_hub.ModelCard.load(out_dir / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "any-to-any"
    assert card.data.library_name == "diffusers"
    # the tiny model is not BAGEL-7B-MoT: its card says what it is, with its own size
    assert card.data.base_model is None and "It is not ByteDance-Seed/BAGEL-7B-MoT" in card.text
    assert "2 decoder layers of width 64" in card.text and "7B parameters" not in card.text
    assert "transformers>=5.24,<5.25" in card.text and "--checkpoint bagel-tiny-hf " in card.text
    assert {"bagel", "text-to-image", "image-to-image", "image-text-to-text"} <= set(card.data.tags)
    assert "{{" not in card.text and 'from_pretrained("bagel-tiny-hf"' in card.text
    assert "arXiv:2505.14683" in card.text and "@article{deng2025bagel" in card.text
    for published in ("2388", "85.0", "55.3", "67.2", "0.82", "0.52", "0.88", "7.36", "6.83", "6.52"):
        assert f"| {published} |" in card.text, published


# -- generate / edit / chat against the pipeline -------------------------------------------------------------------------


def test_generate_passes_every_sampling_flag_to_the_pipeline(converted_dir, pipe, tmp_path, capsys):
    output = tmp_path / "out" / "gen.png"
    code, out, err = _run(
        ["generate", "--checkpoint", converted_dir, "--prompt", "A red cat.", "--output", output,
         "--height", 32, "--width", 48, "--steps", 2, "--timestep_shift", 2.0, "--cfg_text_scale", 2.5,
         "--cfg_img_scale", 1.2, "--cfg_interval", 0.2, 0.9, "--cfg_renorm_type", "channel", "--cfg_renorm_min", 0.1,
         "--seed", 5, "--num_images", 2],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    expected = pipe(
        "A red cat.", height=32, width=48, num_inference_steps=2, timestep_shift=2.0, cfg_text_scale=2.5,
        cfg_img_scale=1.2, cfg_interval=(0.2, 0.9), cfg_renorm_type="channel", cfg_renorm_min=0.1,
        num_images_per_prompt=2, generator=torch.Generator().manual_seed(5),
    ).images  # fmt: skip
    paths = [tmp_path / "out" / "gen_0.png", tmp_path / "out" / "gen_1.png"]
    assert out.splitlines() == [f"wrote {p} (48x32)" for p in paths]
    for path, image in zip(paths, expected):
        assert np.array_equal(np.asarray(PIL.Image.open(path)), np.asarray(image))
    assert not np.array_equal(np.asarray(expected[0]), np.asarray(expected[1]))


def test_generate_with_lora_draws_what_the_adapted_pipeline_draws(converted_dir, tmp_path, capsys):
    from conftest import load_pipeline
    from transformers_bagel.training.lora import get_bagel_lora_model

    pipe = load_pipeline(converted_dir)  # its own model: peft adds the adapter in place
    torch.manual_seed(0)
    lora = get_bagel_lora_model(pipe.model, r=4)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: an adapter that changes nothing
                parameter.normal_(0.0, 0.5)
    lora.save_pretrained(tmp_path / "adapter")
    call = dict(height=32, width=32, num_inference_steps=3, cfg_text_scale=1.0)
    adapted = pipe("A red cat.", generator=torch.Generator().manual_seed(2), **call).images[0]
    with lora.disable_adapter():
        plain = pipe("A red cat.", generator=torch.Generator().manual_seed(2), **call).images[0]
    assert not np.array_equal(np.asarray(adapted), np.asarray(plain))

    output = tmp_path / "lora.png"
    code, _, err = _run(
        ["generate", "--checkpoint", converted_dir, "--lora", tmp_path / "adapter", "--prompt", "A red cat.",
         "--output", output, "--height", 32, "--width", 32, "--steps", 3, "--cfg_text_scale", 1.0, "--seed", 2],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert np.array_equal(np.asarray(PIL.Image.open(output)), np.asarray(adapted))


def test_edit_with_thinking_prints_the_plan_and_matches_the_pipeline(converted_dir, pipe, picture, tmp_path, capsys):
    output = tmp_path / "edit.png"
    code, out, err = _run(
        ["edit", "--checkpoint", converted_dir, "--image", picture, "--prompt", "Make it green.", "--output", output,
         "--steps", 2, "--seed", 3, "--think", "--max_think_tokens", 16],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    expected = pipe(
        "Make it green.", image=PIL.Image.open(picture), num_inference_steps=2, think=True, max_think_tokens=16,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    edited = expected.images[0]
    assert out == f"thinking: {expected.text[0]}\nwrote {output} ({edited.width}x{edited.height})\n"
    width, height = pipe.processor.image_processor.get_resize_size(50, 40, "vae")
    assert PIL.Image.open(output).size == (width, height) == edited.size
    assert np.array_equal(np.asarray(PIL.Image.open(output)), np.asarray(edited))


def test_chat_streams_the_answer_of_the_model(converted_dir, pipe, picture, capsys):
    question = "What colours are in this picture?"
    code, out, err = _run(
        ["chat", "--checkpoint", converted_dir, "--image", picture, "--prompt", question, "--max_new_tokens", 24],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    expected = generate_answer(pipe.model, pipe.processor, understanding_messages(question, [PIL.Image.open(picture)]), 24)
    assert expected and out == expected + "\n"


def test_chat_answers_about_a_video_as_about_its_frames(converted_dir, pipe, tmp_path, capsys):
    from transformers_bagel.video_utils import load_video_frames

    folder = tmp_path / "clip"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        PIL.Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / f"frame_{i}.png")
    question = "What happens?"
    for count in (3, 10):  # 10: more than the processor's default of 8, which must not sample them again
        code, out, err = _run(["chat", "--checkpoint", converted_dir, "--video", folder, "--num_frames", count,
                               "--prompt", question, "--max_new_tokens", 8], capsys)  # fmt: skip
        assert code == 0, err
        frames = load_video_frames(folder, num_frames=count)
        messages = understanding_messages(question, video=frames, num_frames=count)
        assert sum(part["type"] == "video" for part in messages[0]["content"]) == 1
        expected = generate_answer(pipe.model, pipe.processor, messages, 8)
        assert expected and out == expected + "\n", count
    inputs = pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert len(inputs["image_grid_hw"]) == 10


def test_chat_on_stdin_keeps_the_conversation(converted_dir, pipe, picture, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe it.\nAnd the left side?\n\n"))
    code, out, err = _run(["chat", "--checkpoint", converted_dir, "--image", picture, "--max_new_tokens", 12], capsys)
    assert code == 0, err
    image = PIL.Image.open(picture)
    first = generate_answer(pipe.model, pipe.processor, understanding_messages("Describe it.", [image]), 12)
    follow_up = understanding_messages("And the left side?", [image], [("Describe it.", first)])
    second = generate_answer(pipe.model, pipe.processor, follow_up, 12)
    alone = generate_answer(pipe.model, pipe.processor, understanding_messages("And the left side?", [image]), 12)
    assert second != alone, "the follow-up should depend on the conversation"
    assert out == f"> {first}\n> {second}\n> "


DIGITS = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-bagel-digits"


def test_defaults_fit_the_shipped_model_and_only_given_budgets_are_warned_about(tmp_path, capsys, caplog):
    """On the digits model (256 positions), `bagel chat` and `bagel generate --think` run with their defaults: the
    answer and the plan get what the positions leave, quietly; a budget the user gave that does not fit is lowered
    with one warning naming it."""
    seven = tmp_path / "seven.png"
    PIL.Image.new("RGB", (64, 64)).save(seven)
    with caplog.at_level("WARNING"):
        code, out, err = _run(["chat", "--checkpoint", DIGITS, "--image", seven, "--prompt", "Which digit is this?"],
                              capsys)  # fmt: skip
        assert code == 0 and out.strip(), err
        code, out, err = _run(["generate", "--checkpoint", DIGITS, "--prompt", "a handwritten digit seven", "--think",
                               "--steps", 2, "--output", tmp_path / "seven_out.png"], capsys)  # fmt: skip
        assert code == 0 and "wrote" in out, err
    assert not [r for r in caplog.records if "max_new_tokens" in r.getMessage() or "max_think" in r.getMessage()]
    with caplog.at_level("WARNING"):
        code, _, err = _run(["chat", "--checkpoint", DIGITS, "--image", seven, "--prompt", "Which digit is this?",
                             "--max_new_tokens", 4000], capsys)  # fmt: skip
    assert code == 0, err
    assert len([r for r in caplog.records if "max_new_tokens=4000" in r.getMessage()]) == 1


def test_eval_loads_no_model_when_nothing_is_left_and_refuses_other_settings(converted_dir, tmp_path, capsys,
                                                                            monkeypatch):
    import json

    from diffusers_bagel import cli

    data = tmp_path / "metadata.jsonl"
    data.write_text("".join(json.dumps({"tag": "single_object", "include": [{"class": w, "count": 1}],
                                        "prompt": f"a photo of a {w}"}) + "\n" for w in ("cat", "dog")))  # fmt: skip
    run = ["eval", "geneval", "--checkpoint", converted_dir, "--data", data, "--output_dir", tmp_path / "out",
           "--n_samples", 1, "--steps", 2, "--resolution", 32, "--no_progress"]  # fmt: skip
    code, out, err = _run(run, capsys)
    assert code == 0 and "wrote" in out, err
    monkeypatch.setattr(cli, "_load_pipeline", lambda *args: pytest.fail("the model was loaded"))
    code, out, err = _run(run, capsys)
    assert code == 0 and "nothing to draw (the model is not loaded)" in out, err
    code, out, err = _run(run + ["--seed", 4], capsys)  # other settings into a finished folder: refused, no model
    assert code == 2 and "seed: 0 (recorded) -> 4 (this run)" in err and "--overwrite" in err, err


def test_build_messages_orders_thinking_history_images_and_question():
    image = PIL.Image.new("RGB", (8, 8))
    messages = understanding_messages("Why?", [image], [("What?", "A cat.")], think=True)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("You should first think about the reasoning process")
    assert messages[1]["content"] == [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]
    assert messages[3]["content"] == [{"type": "text", "text": "Why?"}]
    with pytest.raises(ValueError, match="question is empty"):
        understanding_messages("  ", [image])


# -- push, without touching the network ----------------------------------------------------------------------------------


def test_push_uploads_the_folder_with_a_card_for_the_repo(converted_dir, tmp_path, capsys, monkeypatch):
    import shutil

    folder = tmp_path / "to-push"
    shutil.copytree(converted_dir, folder)
    local_card = (folder / "README.md").read_text()
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, *a, **k: calls.append(("create", a, k)) or
                        "https://hub.example/me/bagel-tiny")  # fmt: skip
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, **k: calls.append(("commit", (), k)))
    code, out, err = _run(["push", "--folder", folder, "--repo_id", "me/bagel-tiny", "--private"], capsys)
    assert code == 0, err
    assert calls[0] == ("create", ("me/bagel-tiny",), {"private": True, "repo_type": "model", "exist_ok": True})
    assert calls[1][0] == "commit" and calls[1][2]["repo_id"] == "me/bagel-tiny"
    operations = {op.path_in_repo: op for op in calls[1][2]["operations"]}
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted(operations) == local  # every file once, the card included
    card = operations["README.md"].path_or_fileobj.decode()
    assert 'BagelPipeline.from_pretrained("me/bagel-tiny"' in card
    # the command line takes a folder: the card downloads the repo first, then passes the folder
    assert "huggingface-cli download me/bagel-tiny --local-dir bagel-tiny" in card and "--checkpoint bagel-tiny " in card
    assert (folder / "README.md").read_text() == local_card  # the local folder is not rewritten
    assert out == "uploaded " + str(folder) + " to https://hub.example/me/bagel-tiny\n"


def test_push_offline_is_one_line(converted_dir, capsys, monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("Max retries exceeded with url: /api/repos/create\n(long stack of details)")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    code, _, err = _run(["push", "--folder", converted_dir, "--repo_id", "me/bagel-tiny"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "could not upload to the Hub repo 'me/bagel-tiny' (OSError: Max retries exceeded" in err


def test_flags_left_out_are_not_passed_so_the_pipeline_defaults_apply(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from diffusers_bagel import cli

    calls = []

    def pipe(prompt, **kwargs):
        calls.append(kwargs)
        return SimpleNamespace(images=[PIL.Image.new("RGB", (16, 16))], text=None)

    monkeypatch.setattr(cli, "_load_pipeline", lambda *args: pipe)
    code, _, err = _run(["generate", "--checkpoint", tmp_path, "--prompt", "x", "--output", tmp_path / "x.png",
                         "--cfg_img_scale", 2, "--cfg_interval", 0.1, 0.9], capsys)  # fmt: skip
    assert code == 0, err
    given = {"image", "think", "think_do_sample", "num_images_per_prompt", "sample_posterior", "generator"}
    assert set(calls[0]) == given | {"cfg_img_scale", "cfg_interval"}
    assert calls[0]["cfg_img_scale"] == 2.0 and calls[0]["cfg_interval"] == (0.1, 0.9)


# -- errors a user can act on --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--checkpoint", "{empty}", "--prompt", "x"], "is not a converted BAGEL folder"),
        # sizes the model cannot draw: refused from its config.json, before the weights load
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--height", "40"], "--height 40: this model draws sides"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--width", "4096"], "multiples of 16 up to 256 px"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "   ", "--steps", "1"], "prompt is empty"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--output", "x.gif"], "ending in .png, .jpg"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--cfg_text_scale", "0.5"], "`cfg_text_scale` must be a number in [1.0"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--cfg_interval", "0.5", "nan"], "`cfg_interval` must be (start, end)"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--steps", "0"], "`num_inference_steps` must be a positive integer"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--cfg_renorm_type", "local"], "invalid choice"),
        (["edit", "--checkpoint", "{ckpt}", "--prompt", "x", "--image", "{empty}/none.png"], "no such file"),
        (["edit", "--checkpoint", "{ckpt}", "--prompt", "x", "--image", "{text}"], "could not be decoded"),
        (["chat", "--checkpoint", "{ckpt}", "--prompt", "", "--max_new_tokens", "2"], "question is empty"),
        (["chat", "--checkpoint", "{ckpt}", "--prompt", "q", "--video", "{text}"], "--video: "),
        (["chat", "--checkpoint", "{ckpt}", "--prompt", "q", "--video", "{empty}"], "--video: "),
        (["chat", "--checkpoint", "{ckpt}", "--prompt", "q", "--num_frames", "2"], "--num_frames needs --video"),
        (["push", "--folder", "{empty}", "--repo_id", "me/x"], "is not a converted BAGEL folder"),
        pytest.param(["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--device", "cuda"], "CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--device", "potato"], "is not a device name"),
        (["push", "--folder", "{ckpt}", "--repo_id", "no-owner"], "must look like owner/name"),
        (["convert", "--input_dir", "{empty}", "--output_dir", "{empty}_out"], "not a BAGEL release folder"),
        (["convert", "--input_dir", "{empty}", "--output_dir", "{empty}/out"], "never writes into its input"),
        (["convert", "--input_dir", "{empty}", "--output_dir", "{ckpt}"], "is not empty; pass overwrite=True"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--lora", "{empty}/none"], "--lora: LoRA adapter folder"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--lora", "{empty}"], "holds no adapter_config.json"),
        (["generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--lora", "{empty}", "--parallel", "tp"],
         "--lora and --parallel tp cannot be combined"),
        (["paint"], "invalid choice"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, converted_dir, tmp_path, capsys):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    fill = {"{empty}": str(tmp_path), "{ckpt}": str(converted_dir), "{text}": str(text_file)}
    argv = [fill.get(a, a).replace("{empty}", str(tmp_path)) for a in argv]
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert message in err, err


def test_model_card_of_the_7b_names_the_release():
    from transformers_bagel import BagelConfig
    from diffusers_bagel.convert_bagel_to_diffusers import model_card_text

    card = model_card_text("me/bagel-7b", BagelConfig())
    assert "base_model: ByteDance-Seed/BAGEL-7B-MoT" in card and "The weights are the original ones" in card
    assert "7.6B parameters are active per token, 14.6B in total." in card


def test_disk_and_file_errors_are_one_line_without_traceback(tmp_path, capsys, monkeypatch):
    import errno

    from diffusers_bagel import cli, convert_bagel_to_diffusers

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "model-00001.safetensors"))

    monkeypatch.setattr(convert_bagel_to_diffusers, "save_original_model", full_disk)
    code, _, err = _run(["convert", "--input_dir", ORIGINAL_DIR, "--output_dir", tmp_path / "out"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "No space left on the device" in err and "nothing was left behind" in err and "GB in float32" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.converting-*"))

    broken = tmp_path / "release"
    broken.mkdir()
    for path in ORIGINAL_DIR.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "tokenizer.json").write_text("{broken")
    code, _, err = _run(["convert", "--input_dir", broken, "--output_dir", tmp_path / "out2"], capsys)
    assert code == 1 and "tokenizer.json' is not a valid JSON file" in err and "Traceback" not in err
    (broken / "tokenizer.json").unlink()
    (broken / "vocab.json").unlink()
    code, _, err = _run(["convert", "--input_dir", broken, "--output_dir", tmp_path / "out2"], capsys)
    assert code == 2 and "has no tokenizer: it needs tokenizer.json, or vocab.json and merges.txt" in err

    monkeypatch.setattr(cli, "_run_image", lambda args: (_ for _ in ()).throw(PermissionError(errno.EACCES, "no",
                                                                                              "/x/out.png")))
    code, _, err = _run(["generate", "--checkpoint", tmp_path, "--prompt", "x"], capsys)
    assert code == 1 and err.strip() == "bagel generate: error: permission denied (/x/out.png): choose a place you can write."


@pytest.mark.parametrize(("name", "image_format"), [("seven.jpg", "JPEG"), ("seven.webp", "WEBP"), ("seven.PNG", "PNG")])
def test_output_may_be_jpeg_or_webp(tmp_path, capsys, monkeypatch, name, image_format):
    from diffusers_bagel import cli

    loaded = []
    load = cli._load_pipeline
    monkeypatch.setattr(cli, "_load_pipeline", lambda *args: loaded.append(1) or load(*args))
    code, out, err = _run(["generate", "--checkpoint", DIGITS, "--prompt", "a handwritten digit seven", "--steps", 1,
                           "--output", tmp_path / name], capsys)  # fmt: skip
    assert code == 0, err
    assert PIL.Image.open(tmp_path / name).format == image_format and out == f"wrote {tmp_path / name} (64x64)\n"
    code, _, err = _run(["generate", "--checkpoint", DIGITS, "--prompt", "x", "--height", 128], capsys)
    assert code == 2 and "up to 64 px" in err and len(loaded) == 1  # refused before the model loads


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api_key", ""], "--api_key is empty (an unset shell variable?)"),
        (["--batch_wait_ms", "5000", "--request_timeout", "1"], "batch_wait"),
        (["--port", "70000"], "port"),
        (["--device", "cuda:7"], "is not available on this machine"),
        (["--device", "meta"], "holds no weights"),
    ],
)
def test_serve_settings_are_refused_before_the_model_loads(converted_dir, capsys, monkeypatch, argv, message):
    pytest.importorskip("fastapi")
    from diffusers_bagel import cli, serving

    monkeypatch.setattr(serving, "run_server", lambda *args, **kwargs: pytest.fail("the server started"))
    monkeypatch.delenv("BAGEL_API_KEY", raising=False)
    if "--device" not in argv:
        monkeypatch.setattr(cli, "_load_pipeline", lambda *args: pytest.fail("the model was loaded"))
    code, _, err = _run(["serve", "--checkpoint", converted_dir, *argv], capsys)
    assert code == 2 and message in err, err
