"""Quantised BAGEL through transformers' quantisation configs: torchao int8 weight-only on both experts of every
decoder layer, loaded with `from_pretrained(quantization_config=...)`, stays close to the float model in
understanding and in the pipeline's image generation."""

import pytest
import torch


torchao = pytest.importorskip("torchao", reason="torchao is not installed (pip install -e '.[quant]')")

from transformers import TorchAoConfig  # noqa: E402

from diffusers_bagel import BagelPipeline  # noqa: E402
from transformers_bagel import BagelForConditionalGeneration  # noqa: E402


@pytest.fixture(scope="module")
def models(converted_dir):
    from torchao.quantization import Int8WeightOnlyConfig

    plain = BagelForConditionalGeneration.from_pretrained(converted_dir / "model")
    quantised = BagelForConditionalGeneration.from_pretrained(
        converted_dir / "model", quantization_config=TorchAoConfig(Int8WeightOnlyConfig())
    )
    return plain, quantised


def _int8_bytes(weight) -> int:
    data = getattr(weight, "qdata", None)
    return data.numel() * data.element_size() if data is not None and data.dtype == torch.int8 else 0


def test_both_experts_of_every_layer_hold_int8_weights(models):
    plain, quantised = models
    names = [name for name, module in quantised.model.language_model.layers.named_modules()
             if isinstance(module, torch.nn.Linear)]  # fmt: skip
    assert any("moe_gen" in name for name in names) and any("moe_gen" not in name for name in names)
    layers = dict(quantised.model.language_model.layers.named_modules())
    reference = dict(plain.model.language_model.layers.named_modules())
    for name in names:
        weight = layers[name].weight
        assert _int8_bytes(weight) == weight.numel(), name  # one byte per weight
        assert _int8_bytes(weight) * 4 == reference[name].weight.numel() * reference[name].weight.element_size()


def test_quantised_understanding_stays_close(models, no_grad):
    plain, quantised = models
    ids = torch.tensor([[401, 30, 31, 32, 33, 34, 402, 401]])
    expected, actual = plain(input_ids=ids).logits, quantised(input_ids=ids).logits
    error = (actual - expected).abs().max() / expected.abs().max()
    assert 0 < error < 0.03, error  # int8 rounding: changed, but by ~1% of the logit range


def test_quantised_pipeline_generates_nearly_the_same_latents(models, converted_dir):
    plain, quantised = models
    outputs = []
    for model in (plain, quantised):
        pipe = BagelPipeline.from_pretrained(converted_dir, model=model)
        pipe.set_progress_bar_config(disable=True)
        outputs.append(pipe("a red square", height=32, width=32, num_inference_steps=3, output_type="latent",
                            generator=torch.Generator().manual_seed(0)).images)  # fmt: skip
    similarity = torch.nn.functional.cosine_similarity(outputs[0].flatten(), outputs[1].flatten(), dim=0)
    assert torch.isfinite(outputs[1]).all() and similarity > 0.999, similarity
