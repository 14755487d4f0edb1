"""The repository layout: transformers_bagel is the base and never imports diffusers_bagel; importing the library
pulls in neither the demo's scikit-learn nor the app's gradio; the root `model_card.md` is a real file, the card
`bagel convert` writes for the 7B release; no source file grows past about 800 lines."""

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_transformers_bagel_never_imports_diffusers_bagel():
    offenders = {
        str(path.relative_to(SRC)): sorted(name for name in _imported_modules(path) if name.startswith("diffusers_bagel"))
        for path in (SRC / "transformers_bagel").rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_library_import_pulls_no_demo_or_app_dependency():
    code = "import sys, transformers_bagel, diffusers_bagel; print(sorted(m for m in ('sklearn', 'gradio') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"
    assert not (SRC / "transformers_bagel" / "digits").exists()


def test_root_model_card_is_the_card_the_converter_writes_for_the_7b():
    card = ROOT / "model_card.md"
    assert card.is_file() and not card.is_symlink()
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from write_model_card import rendered_card
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    text = card.read_text(encoding="utf-8")
    assert "base_model: ByteDance-Seed/BAGEL-7B-MoT" in text and "{{" not in text
    assert text == rendered_card(), "model_card.md is out of date: run `python scripts/write_model_card.py`"


def test_no_source_file_grows_past_about_800_lines():
    """Small files with one job each: a module that outgrows this is split (the model, the pipeline and the server
    were, at 1,800, 1,300 and 900 lines)."""
    lengths = {str(path.relative_to(SRC)): len(path.read_text(encoding="utf-8").splitlines())
               for path in SRC.rglob("*.py")}  # fmt: skip
    assert {path: n for path, n in lengths.items() if n > 850} == {}
