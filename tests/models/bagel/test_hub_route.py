"""The Hub `auto_map` route: a folder saved after `register_for_hub()` loads with `trust_remote_code=True` in a
process that never imports transformers_bagel, and gives the same logits."""

import subprocess
import sys
import textwrap

import pytest
import torch

import transformers_bagel
from conftest import load_expected


@pytest.mark.slow
def test_saved_code_loads_without_the_package(original_model, tmp_path):
    model, tokenizer = original_model
    transformers_bagel.register_for_hub()
    try:
        model.save_pretrained(tmp_path / "model")
        processor = transformers_bagel.BagelProcessor(transformers_bagel.BagelImageProcessor(), tokenizer)
        processor.save_pretrained(tmp_path / "processor")
    finally:
        for cls in (transformers_bagel.BagelConfig, transformers_bagel.BagelModel,
                    transformers_bagel.BagelForConditionalGeneration, transformers_bagel.BagelImageProcessor,
                    transformers_bagel.BagelProcessor):  # fmt: skip
            cls._auto_class = None
    for module in ("modeling_bagel", "modeling_bagel_text", "modeling_bagel_embeddings", "masking_bagel", "loss_bagel"):
        assert (tmp_path / "model" / f"{module}.py").is_file(), module  # the modules it imports are copied with it
    _, expected = load_expected("a_text_logits")
    torch.save(expected["input_ids"], tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        model = AutoModelForImageTextToText.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(tmp_path / "processor")!r}, trust_remote_code=True)
        assert "transformers_bagel" not in sys.modules, "the package was imported"
        assert type(processor).__name__ == "BagelProcessor", type(processor)
        with torch.no_grad():
            logits = model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})[None]).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300)
    logits = torch.load(tmp_path / "logits.pt")
    err = (logits[0] - expected["logits"]).abs().max().item()
    assert err <= 1e-4 * expected["logits"].abs().max().item()
