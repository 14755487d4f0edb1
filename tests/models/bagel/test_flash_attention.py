"""flash_attention_2 through transformers' flash-attention integration, with the kernel replaced by a pure-PyTorch
function of flash-attn's exact semantics (tests/flash_reference.py): prefill, decoding and denoising give the sdpa
numbers, and the original's fixtures hold."""

import pytest
import torch
import transformers.modeling_flash_attention_utils as flash_utils
from transformers.modeling_utils import PreTrainedModel

import flash_reference
from conftest import assert_close_rel, check_rows_prefilled_together, load_expected
from diffusers_bagel import BagelPipeline


@pytest.fixture()
def reference_flash(monkeypatch):
    """transformers' flash-attention path with the reference kernel (the flash-attn package and a GPU are not needed:
    only the import of the kernel and transformers' environment check are replaced)."""
    calls = {"flash_attn_func": 0, "flash_attn_varlen_func": 0}

    def counted(function):
        def kernel(*args, **kwargs):
            calls[function.__name__] += 1
            return function(*args, **kwargs)

        kernel.__signature__ = __import__("inspect").signature(function)  # transformers reads the kernel's parameters
        return kernel

    kernels = (counted(flash_reference.flash_attn_func), counted(flash_reference.flash_attn_varlen_func), None,
               flash_utils._pad_input, flash_utils._unpad_input)  # fmt: skip
    monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: kernels)
    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):  # fmt: skip
        monkeypatch.setattr(flash_utils, name, None, raising=False)
    check = PreTrainedModel._check_and_adjust_attn_implementation

    def accept_flash(self, attn_implementation, *args, **kwargs):
        if attn_implementation == "flash_attention_2":
            return attn_implementation
        return check(self, attn_implementation, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "_check_and_adjust_attn_implementation", accept_flash)
    monkeypatch.setattr(PreTrainedModel, "_flash_attn_can_dispatch", lambda self, *args, **kwargs: True)
    return calls


def test_reference_kernel_matches_sdpa_semantics():
    """The stand-in itself: varlen bottom-right causal GQA against sdpa on each sequence."""
    torch.manual_seed(0)
    lengths_q, lengths_k = [3, 5, 1], [7, 5, 4]
    q = torch.randn(sum(lengths_q), 4, 8)
    k, v = torch.randn(sum(lengths_k), 2, 8), torch.randn(sum(lengths_k), 2, 8)
    cu_q = torch.tensor([0, 3, 8, 9])
    cu_k = torch.tensor([0, 7, 12, 16])
    out = flash_reference.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 7, causal=True)
    for i, (lq, lk) in enumerate(zip(lengths_q, lengths_k)):
        qi = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ki = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1).repeat_interleave(2, 0)
        vi = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1).repeat_interleave(2, 0)
        mask = torch.arange(lk)[None] <= torch.arange(lq)[:, None] + (lk - lq)
        expected = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask)
        assert torch.allclose(out[cu_q[i] : cu_q[i + 1]], expected.transpose(0, 1), atol=1e-6)


def test_flash_prefill_and_decode_match_the_original(original_model, reference_flash, no_grad):
    model, _ = original_model
    meta, expected = load_expected("a_text_logits")
    model.set_attn_implementation("flash_attention_2")
    try:
        assert model.config.text_config._attn_implementation == "flash_attention_2"
        assert_close_rel(model(input_ids=expected["input_ids"][None]).logits[0], expected["logits"], 1e-4)
        assert reference_flash["flash_attn_func"] == model.config.text_config.num_hidden_layers
        prompt = torch.cat([expected["input_ids"], torch.tensor([meta["new_token_ids"]["bos_token_id"]])])[None]
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
        start = prompt.shape[1] - 1
        assert out.sequences[0, start : start + 8].tolist() == expected["greedy_token_ids"].tolist()
        for step, logits in enumerate(out.logits):
            assert_close_rel(logits[0], expected["greedy_step_logits"][step], 1e-4)
    finally:
        model.set_attn_implementation("sdpa")


def test_flash_matches_sdpa_on_images_padding_and_denoising(converted_dir, reference_flash, no_grad):
    """Interleaved text / ViT / VAE contexts (segments: causal text, full image blocks), a left-padded batch in
    `generate`, packed guidance contexts and denoising rows: flash_attention_2 gives the sdpa numbers."""
    import numpy as np
    import PIL.Image

    pipe = BagelPipeline.from_pretrained(converted_dir)
    pipe.set_progress_bar_config(disable=True)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    edit = {"prompt": "Make it blue.", "image": image, "num_inference_steps": 3, "output_type": "latent",
            "think": True, "max_think_tokens": 3}  # fmt: skip
    messages = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what?"}]}],
                [{"role": "user", "content": [{"type": "text", "text": "a longer question without an image"}]}]]
    chat = pipe.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt", padding=True)  # fmt: skip
    results = {}
    for implementation in ("sdpa", "flash_attention_2"):
        before = dict(reference_flash)
        pipe.model.set_attn_implementation(implementation)
        out = pipe(**edit, generator=torch.Generator().manual_seed(0))
        tokens = pipe.model.generate(**chat, max_new_tokens=4, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)  # fmt: skip
        results[implementation] = (out.images, out.text, tokens.sequences, torch.stack(tokens.logits))
        ran = {name: reference_flash[name] - before[name] for name in before}
        # sdpa never reaches the kernel; flash runs its segments, the padded decoding and the ViT through it
        assert (min(ran.values()) > 0) == (implementation == "flash_attention_2"), ran
    pipe.model.set_attn_implementation("sdpa")
    (images, text, sequences, logits), (f_images, f_text, f_sequences, f_logits) = results.values()
    assert bool((chat["attention_mask"] == 0).any())  # the batch is padded
    assert f_text == text and torch.equal(f_sequences, sequences)
    assert_close_rel(f_logits, logits, 1e-5)
    assert_close_rel(f_images, images, 1e-5)


def test_flash_rows_prefilled_in_one_forward_equal_rows_prefilled_alone(original_model, reference_flash, no_grad):
    """Several contexts prefilled in one forward under flash_attention_2: each row's segments start at its own span
    (a run never crosses rows), as sdpa's mask does."""
    from conftest import mixed_inputs

    model, _ = original_model
    model.set_attn_implementation("flash_attention_2")
    try:
        before = reference_flash["flash_attn_func"]
        text = {"input_ids": torch.tensor([[401, 40, 41, 42, 402]])}
        check_rows_prefilled_together(model, [text, text])
        check_rows_prefilled_together(model, [mixed_inputs(model.config, seed) for seed in (1, 2, 3)])
        assert reference_flash["flash_attn_func"] > before
    finally:
        model.set_attn_implementation("sdpa")
