"""`bagel eval` against hostile benchmark files and careless reruns (issue 23): ids confined to the output folder,
input paths confined to --image_root, the settings record of an output folder, GenEval's scorer fields, the count of
entries left to draw, broken input files and failing disks. Each refusal happens before the model loads (the plan) or
before anything is written, and names the file, line, field or value."""

import errno
import json
import os
import re
from pathlib import Path

import PIL.Image
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "checkpoints" / "tiny-bagel-digits"
FAST = {"num_inference_steps": 2}
SETTINGS = settings(
    max_examples=200, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
# Strings built from the pieces of path traversal, plus any text at all.
PIECES = ["..", ".", "/", "\\", "a", "evil", "C:", "\x00", "\n", "~", " ", "é", "%2e"]
HOSTILE = st.one_of(st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join), st.text(max_size=20))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("scratch")


def _json_lines(path: Path, entries) -> Path:
    """A JSON list with entry `i` on line `i + 2` (so that messages can be checked for the line)."""
    path.write_text("[\n" + ",\n".join(json.dumps(entry) for entry in entries) + "\n]\n", encoding="utf-8")
    return path


def _wise(path: Path, ids=(1, 2)) -> Path:
    return _json_lines(path, [{"Prompt": f"a handwritten digit {i}", "prompt_id": i} for i in ids])


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _plan(name, data, out, **kwargs):
    from diffusers_bagel.evaluation import plan_benchmark

    kwargs = {"checkpoint": CHECKPOINT, "dtype": "auto", "device": "cpu", **FAST, **kwargs}
    return plan_benchmark(name, data, out, **kwargs)


def _run(digits_pipe, name, data, out, **kwargs):
    """What `bagel eval` does: plan (all checks), load the model only if something is left to draw, run."""
    from diffusers_bagel.evaluation import run_plan

    plan = _plan(name, data, out, **kwargs)
    return plan, run_plan(digits_pipe if plan.pending else None, plan, progress=False)


# -- 1. path traversal -------------------------------------------------------------------------------------------------


@SETTINGS
@given(name=HOSTILE)
def test_plain_names_stay_in_their_folder(name, scratch):
    from diffusers_bagel.evaluation.paths import check_name, name_problem

    problem = name_problem(name)
    if "/" in name or "\\" in name or name in (".", "..", "") or "\x00" in name:
        assert problem is not None
    if problem is None:
        assert check_name(name, "id", "f.json:3: entry 1") == name
        assert (scratch / name).resolve().parent == scratch.resolve()
        assert (scratch / name).name == name
    else:
        with pytest.raises(ValueError, match=r"^f\.json:3: entry 1: field 'id' = " + re.escape(repr(name))):
            check_name(name, "id", "f.json:3: entry 1")


@SETTINGS
@given(prompt_id=HOSTILE)
def test_wise_ids_are_confined_or_refused_with_their_line(prompt_id, scratch):
    entries = [{"Prompt": "p", "prompt_id": 7}, {"Prompt": "q", "prompt_id": prompt_id}]
    data = _json_lines(scratch / "final_data.json", entries)
    out = scratch / "out"
    try:
        plan = _plan("wise", data, out)
    except ValueError as error:
        assert str(error).startswith(f"{data}:3: entry 1: "), error
        assert "prompt_id" in str(error) or "output path" in str(error), error
    else:
        for item in plan.items:
            assert (out / item.outputs[0]).resolve().parent == out.resolve()
    assert not out.exists()  # planning writes nothing


@SETTINGS
@given(relative=HOSTILE)
def test_input_paths_stay_under_image_root(relative, scratch):
    from diffusers_bagel.evaluation.paths import confined_path

    try:
        path = confined_path(scratch, relative, "image", "d.json:4: entry 2")
    except ValueError as error:
        assert str(error).startswith(f"d.json:4: entry 2: field 'image' = {relative!r}"), error
    else:
        assert os.path.commonpath([os.path.normpath(path), str(scratch)]) == str(scratch)


@pytest.mark.parametrize(
    "name, entries, message",
    [
        ("wise", [{"Prompt": "p", "prompt_id": "../../evil"}], r":2: entry 0: field 'prompt_id' = '\.\./\.\./evil' holds a path"),
        ("wise", [{"Prompt": "p", "prompt_id": 1}, {"Prompt": "p", "prompt_id": ".."}], r":3: entry 1: field 'prompt_id' = '\.\.' is"),
        ("rise", [{"index": "/tmp/evil", "category": "c", "image": "a.png", "instruction": "i"}], r":2: entry 0: field 'index' = '/tmp/evil'"),
        ("rise", [{"index": "1", "category": "..", "image": "a.png", "instruction": "i"}], r":2: entry 0: field 'category' = '\.\.' is"),
        ("rise", [{"index": "1", "category": "c", "image": "/etc/passwd", "instruction": "i"}], r":2: entry 0: field 'image' = '/etc/passwd' is an absolute path"),
        ("rise", [{"index": "1", "category": "c", "image": "../../etc/passwd", "instruction": "i"}], r":2: entry 0: field 'image' = '\.\./\.\./etc/passwd' goes up"),
        ("kris", [{"id": "a/b", "type": "t", "ori_img": "a.png", "ins_en": "i"}], r":2: entry 0: field 'id' = 'a/b' holds a path separator"),
        ("kris", [{"id": "1", "type": "C:evil", "ori_img": "a.png", "ins_en": "i"}], r":2: entry 0: field 'type' = 'C:evil' names a drive"),
        ("kris", [{"id": "1", "type": "t", "ori_img": ["a.png", "../../x.png"], "ins_en": "i"}], r":2: entry 0: field 'ori_img' = '\.\./\.\./x\.png' goes up"),
    ],
)  # fmt: skip
def test_hostile_json_entries_are_refused_by_line_and_value(tmp_path, name, entries, message):
    data = _json_lines(tmp_path / "bench.json", entries)
    with pytest.raises(ValueError, match=re.escape(str(data)) + message):
        _plan(name, data, tmp_path / "out", image_root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json"]  # nothing written


def test_hostile_imgedit_key_is_refused_through_the_command(tmp_path, capsys):
    from diffusers_bagel.cli import main

    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    data = tmp_path / "singleturn.json"
    data.write_text('{\n "ok": {"id": "a.png", "prompt": "p"},\n "../../evil": {"id": "a.png", "prompt": "p"}\n}\n')
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "imgedit", "--data", str(data), "--output_dir", str(tmp_path / "out"),
              "--checkpoint", str(tmp_path / "no-model-needed"), "--no_progress"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{data}:3: entry '../../evil': field 'key' = '../../evil' holds a path separator" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.png").exists()


def test_link_out_of_the_output_folder_is_refused_before_writing(tmp_path, digits_png):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "logical").symlink_to(outside, target_is_directory=True)
    entry = {"index": "1", "category": "logical", "image": digits_png.name, "instruction": "i"}
    data = _json_lines(tmp_path / "rise.json", [entry])
    message = r"rise\.json:2: entry 0: output path 'logical/1\.png' resolves to .*outside the output folder"
    with pytest.raises(ValueError, match=message):
        _plan("rise", data, out, image_root=digits_png.parent)
    assert list(outside.iterdir()) == []


def test_gedit_hostile_key_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"key": ["../../evil"], "task_type": ["t"], "instruction_language": ["en"], "instruction": ["i"],
            "input_image": [PIL.Image.new("RGB", (32, 32))]}  # fmt: skip
    features = {k: datasets.Value("string") for k in rows if k != "input_image"} | {"input_image": datasets.Image()}
    datasets.Dataset.from_dict(rows, features=datasets.Features(features)).to_parquet(tmp_path / "gedit.parquet")
    with pytest.raises(ValueError, match=r"gedit\.parquet: row 0: field 'key' = '\.\./\.\./evil' holds a path"):
        _plan("gedit", tmp_path / "gedit.parquet", tmp_path / "out")


@pytest.fixture()
def digits_png(tmp_path):
    path = tmp_path / "images" / "seven.png"
    path.parent.mkdir()
    PIL.Image.new("RGB", (64, 64), (255, 255, 255)).save(path)
    return path


# -- 2. the settings record --------------------------------------------------------------------------------------------


def test_rerun_with_other_settings_is_refused_and_overwrite_redraws(tmp_path, digits_pipe):
    from diffusers_bagel.evaluation import SETTINGS_FILE, SettingsMismatchError

    data = _wise(tmp_path / "final_data.json")
    out = tmp_path / "out"
    plan, summary = _run(digits_pipe, "wise", data, out, batch_size=2)
    assert plan.pending == 2 and sorted(summary.written) == ["1.png", "2.png"]
    record = json.loads((out / SETTINGS_FILE).read_text())
    assert record["settings"] | {"entries_sha256": None} == {
        "benchmark": "wise", "entries_sha256": None, "checkpoint": "tiny-bagel-digits", "dtype": "float32", "seed": 0,
        "n_samples": 1, "think": False, **json.loads(json.dumps(plan.pipeline_kwargs)),
    }  # fmt: skip
    assert record["settings"]["num_inference_steps"] == 2 and record["info"]["batch_size"] == 2
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    before = _files(out)

    # Same settings (another batch size, a limit): resumes, nothing to draw, record untouched.
    plan, summary = _run(digits_pipe, "wise", data, out, batch_size=1, limit=1)
    assert (plan.pending, plan.write_record, summary.written) == (0, False, [])
    assert _files(out) == before

    # Other settings: refused before the model loads, listing what differs and how to proceed.
    with pytest.raises(SettingsMismatchError) as refused:
        _plan("wise", data, out, seed=3, num_inference_steps=3)
    message = str(refused.value)
    assert str(out) in message and SETTINGS_FILE in message
    assert "seed: 0 (recorded) -> 3 (this run)" in message
    assert "num_inference_steps: 2 (recorded) -> 3 (this run)" in message
    assert "another --output_dir" in message and "--overwrite" in message
    assert "cfg_text_scale" not in message
    with pytest.raises(SettingsMismatchError, match=r"entries_sha256"):
        _plan("wise", _wise(tmp_path / "other.json", ids=(1, 2, 3)), out)  # another benchmark file
    assert _files(out) == before

    # --overwrite: the earlier outputs are deleted and drawn again with the new settings, the record follows.
    old = {name: (out / name).read_bytes() for name in ("1.png", "2.png")}
    plan, summary = _run(digits_pipe, "wise", data, out, seed=3, overwrite=True)
    assert plan.replace and plan.pending == 2 and sorted(summary.written) == ["1.png", "2.png"]
    assert all((out / name).read_bytes() != image for name, image in old.items())
    assert json.loads((out / SETTINGS_FILE).read_text())["settings"]["seed"] == 3
    plan, summary = _run(digits_pipe, "wise", data, out, seed=3)
    assert plan.pending == 0 and summary.written == []


def test_record_edge_cases(tmp_path):
    from diffusers_bagel.evaluation import SETTINGS_FILE, SettingsMismatchError

    data = _wise(tmp_path / "final_data.json")
    out = tmp_path / "out"
    out.mkdir()
    PIL.Image.new("RGB", (16, 16)).save(out / "1.png")
    # A folder of an older version (outputs, no record): taken as this run's, with a warning.
    plan = _plan("wise", data, out)
    assert plan.write_record and not plan.replace and plan.pending == 1
    # A damaged record: named.
    (out / SETTINGS_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(out / SETTINGS_FILE)) + " could not be read"):
        _plan("wise", data, out)
    # --overwrite never crosses benchmarks.
    (out / SETTINGS_FILE).write_text(json.dumps({"settings": {"benchmark": "geneval"}}))
    with pytest.raises(SettingsMismatchError, match="holds 'geneval' outputs; --overwrite only replaces"):
        _plan("wise", data, out, overwrite=True)
    # A record but no outputs (a run stopped before its first image): any settings go.
    (out / "1.png").unlink()
    assert _plan("wise", data, out, seed=9).write_record


# -- 3. GenEval's scorer fields ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ({"prompt": "a cat"}, r"m\.jsonl:2: missing field 'tag' \(the official GenEval scorer reads it\)"),
        ({"prompt": "a cat", "tag": 3}, r"m\.jsonl:2: field 'tag' must be a non-empty string, got 3"),
        ({"tag": "single_object"}, r"m\.jsonl:2: missing field 'prompt'"),
        ({"prompt": "p", "tag": "t", "include": {"class": "cat"}}, r"m\.jsonl:2: field 'include' must be a list"),
        ({"prompt": "p", "tag": "t", "include": [{"class": "cat"}]}, r"m\.jsonl:2: field 'include\[0\]\.count' must be an integer"),
        ({"prompt": "p", "tag": "t", "exclude": [{"count": 1}]}, r"m\.jsonl:2: field 'exclude\[0\]\.class'"),
        ({"prompt": "p", "tag": "t", "include": [{"class": "cat", "count": 1, "position": ["left of", 0]}]},
         r"m\.jsonl:2: field 'include\[0\]\.position' must be \[relation, index of an earlier 'include' clause\]"),
    ],
)  # fmt: skip
def test_geneval_lines_without_the_scorer_fields_are_refused(tmp_path, line, message):
    from diffusers_bagel.evaluation import load_benchmark

    good = {"prompt": "a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    (tmp_path / "m.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message):
        load_benchmark("geneval", tmp_path / "m.jsonl")


def test_geneval_position_clause_is_accepted(tmp_path):
    from diffusers_bagel.evaluation import load_benchmark

    line = {"prompt": "a cat left of a dog", "tag": "position",
            "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}]}  # fmt: skip
    (tmp_path / "m.jsonl").write_text("\ufeff" + json.dumps(line) + "\r\n", encoding="utf-8")  # BOM and CRLF too
    assert load_benchmark("geneval", tmp_path / "m.jsonl")[0].prompt == "a cat left of a dog"


# -- 4. nothing left to draw -------------------------------------------------------------------------------------------


def test_count_of_entries_left_to_draw_follows_the_resume_rule(tmp_path, digits_pipe):
    lines = [{"prompt": f"a handwritten digit {w}", "tag": "single_object"} for w in ("one", "two", "three")]
    data = tmp_path / "m.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    options = {"n_samples": 2, "batch_size": 2}
    plan = _plan("geneval", data, out, **options)
    assert (plan.pending, plan.complete) == (3, False)
    _run(digits_pipe, "geneval", data, out, **options)
    plan = _plan("geneval", data, out, **options)
    assert (plan.pending, plan.complete) == (0, True)
    # A missing grid needs no model: the plan says complete and a run without a pipeline writes it back.
    (out / "00002" / "grid.png").unlink()
    plan, summary = _run(None, "geneval", data, out, **options)
    assert plan.complete and summary.written == ["00002/grid.png"]
    # A missing sample: its whole batch ([0, 2)) is drawn again, as the runner does.
    (out / "00001" / "samples" / "00000.png").unlink()
    assert _plan("geneval", data, out, **options).pending == 2
    assert _plan("geneval", data, out, **options, limit=1).pending == 0  # entry 1 is outside this run
    from diffusers_bagel.evaluation import run_plan

    with pytest.raises(ValueError, match="no pipeline was given"):
        run_plan(None, _plan("geneval", data, out, **options), progress=False)


# -- 5. input files ----------------------------------------------------------------------------------------------------


def test_broken_input_files_are_named(tmp_path):
    from diffusers_bagel.evaluation import load_benchmark

    cases = {
        "broken.jsonl": ('{"prompt": "a", "tag": "t"}\n{"prompt": "b", "tag": \n', "geneval", r"broken\.jsonl:2: not a JSON line \(Expecting value"),
        "empty.jsonl": ("", "geneval", r"empty\.jsonl' is empty"),
        "blank.json": ("  \n\n", "wise", r"blank\.json' is empty"),
        "none.json": ("[]", "wise", r"none\.json': expected a non-empty JSON list"),
        "bad.json": ('[\n {"Prompt": "p", "prompt_id": 1},\n {"Prompt": }\n]', "wise", r"bad\.json' is not valid JSON \(Expecting value, line 3 column 13\)"),
        "twice.json": ('{\n "a": {"id": "x.png", "prompt": "p"},\n "a": {"id": "y.png", "prompt": "q"}\n}', "imgedit", r"twice\.json:3: key 'a' given twice \(first on line 2\)"),
    }  # fmt: skip
    for name, (text, benchmark, message) in cases.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            load_benchmark(benchmark, tmp_path / name)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "a", "tag": "t"}\n{"prompt": "caf\u00e9", "tag": "t"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.jsonl' is not UTF-8 text: line 2 holds the byte b'\\xe9' .*Latin-1"):
        load_benchmark("geneval", latin)
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ValueError, match=r"folder\.json' is a folder; expected a file"):
        load_benchmark("wise", tmp_path / "folder.json")
    (tmp_path / "images" / "a.png").mkdir(parents=True)  # a folder where an input image is expected
    _json_lines(tmp_path / "rise.json", [{"index": "1", "category": "c", "image": "a.png", "instruction": "i"}])
    with pytest.raises(ValueError, match=r"rise\.json:2: entry 0: input image .*a\.png' is a folder, not an image"):
        load_benchmark("rise", tmp_path / "rise.json", image_root=tmp_path / "images")


def test_folder_in_the_way_of_an_output_is_refused_before_writing(tmp_path):
    data = _wise(tmp_path / "final_data.json")
    (tmp_path / "out" / "2.png").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"final_data\.json:3: entry 1: .*2\.png' is a folder where the layout expects"):
        _plan("wise", data, tmp_path / "out")
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "logical").write_text("a file where a folder goes")
    entry = {"index": "1", "category": "logical", "image": "a.png", "instruction": "i"}
    rise = _json_lines(tmp_path / "rise.json", [entry])
    PIL.Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"logical' is a file where the layout expects a folder"):
        _plan("rise", rise, tmp_path / "out2", image_root=tmp_path)
    with pytest.raises(ValueError, match=r"--output_dir .*a\.png/out': .*a\.png' is a file, not a folder"):
        _plan("wise", data, tmp_path / "a.png" / "out")


# -- 6. failing disks --------------------------------------------------------------------------------------------------


def _full_disk(monkeypatch, after: int = 0):
    """PIL saves write a few bytes then fail with ENOSPC (after `after` good saves)."""
    real_save = PIL.Image.Image.save
    calls = {"n": 0}

    def save(image, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= after:
            return real_save(image, fp, *args, **kwargs)
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", save)


def test_full_disk_is_one_error_naming_the_folder_and_leaves_no_temporary_file(tmp_path, digits_pipe, monkeypatch):
    from diffusers_bagel.evaluation import EvalOutputError

    data = _wise(tmp_path / "final_data.json")
    out = tmp_path / "out"
    _full_disk(monkeypatch, after=1)
    with pytest.raises(EvalOutputError) as failed:
        _run(digits_pipe, "wise", data, out)
    error = failed.value
    assert isinstance(error, OSError) and isinstance(error, ValueError) and error.errno == errno.ENOSPC
    assert str(error).startswith(f"could not write '2.png' in the output folder {str(out)!r}: No space left on device.")
    assert "free some space" in str(error).lower() and "resumes" in str(error)
    assert sorted(p.name for p in out.iterdir()) == ["1.png", "bagel_eval_settings.json"]  # no .tmp, no partial 2.png
    monkeypatch.undo()
    plan, summary = _run(digits_pipe, "wise", data, out)
    assert summary.written == ["2.png"]


def test_permission_denied_through_the_command_has_no_traceback(tmp_path, monkeypatch, capsys):
    from diffusers_bagel.cli import main

    data = _wise(tmp_path / "final_data.json")
    out = tmp_path / "out"

    def denied(source, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(os, "replace", denied)
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "wise", "--data", str(data), "--output_dir", str(out), "--checkpoint", str(CHECKPOINT),
              "--num_inference_steps", "2", "--no_progress", "--device", "cpu"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    expected = f"could not write 'bagel_eval_settings.json' in the output folder {str(out)!r}: Permission denied"
    assert f"bagel eval: error: {expected}" in err, err
    assert "Traceback" not in err and "permissions" in err
    assert [p.name for p in out.iterdir()] == []  # the temporary file is gone


def test_unwritable_output_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    data = _wise(tmp_path / "final_data.json")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, where chmod does not deny
    with pytest.raises(ValueError, match=r"--output_dir .*out/new': .* is not writable \(permission denied\)"):
        _plan("wise", data, tmp_path / "out" / "new")


def test_atomic_write_removes_its_temporary_file_whatever_fails(tmp_path, monkeypatch):
    from diffusers_bagel.evaluation.runner import atomic_write_text

    def failing_replace(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text("text", tmp_path / "a.txt")
    assert list(tmp_path.iterdir()) == []
    # A temporary file that cannot be removed does not hide the first error.
    def stuck(self, missing_ok=False):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "unlink", stuck)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text("text", tmp_path / "b.txt")
