"""The package layering: transformers_bagel is the base and never imports diffusers_bagel; importing the library
pulls in neither the demo's scikit-learn nor the app's gradio."""

import ast
import subprocess
import sys
from pathlib import Path


SRC = Path(__file__).resolve().parent.parent / "src"


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
