"""Training loss on a packed batch against an independent reference written from SPEC.md section 6: each sample run
on its own with a dense mask built as the original's `prepare_attention_mask_per_sample`, the MoT layers written out by
hand from the weights, CE and MSE computed directly with the original's normalisation."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from transformers_bagel import BagelForConditionalGeneration, BagelProcessor
from transformers_bagel.training import (
    BagelDataCollator,
    edit_sample,
    freeze_modules,
    text_segment,
    text_to_image_sample,
    understanding_sample,
    vae_segment,
    vit_segment,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(converted_dir):
    model = BagelForConditionalGeneration.from_pretrained(converted_dir / "model")
    processor = BagelProcessor.from_pretrained(converted_dir / "processor")
    return model, processor


def _image(width, height, seed):
    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _latent(height, width, seed):
    """A clean normalised VAE latent (16, H/8, W/8) standing in for the VAE output."""
    return torch.randn(16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def _samples():
    t2i = text_to_image_sample("a red cat on a mat", None, row=0)
    t2i["segments"][1]["latents"] = _latent(64, 48, 1)
    und = understanding_sample(_image(70, 42, 2), "what is it?", "a small cat", row=1)
    edit = edit_sample(_image(64, 64, 3), "make it blue", None, row=2)
    edit["segments"][0]["image"] = None
    edit["segments"][0]["latents"] = _latent(64, 64, 4)  # the source's clean VAE latent
    edit["segments"][-1]["latents"] = _latent(48, 64, 5)  # the target
    # interleaved: text after a generated image must neither see the noised image nor find its position advanced
    interleaved = {
        "segments": [
            text_segment("draw a dog"),
            vae_segment(latents=_latent(32, 64, 6), loss=True),
            vit_segment(_image(42, 56, 7)),
            text_segment("this dog is brown", loss=True),
        ],
        "row": 3,
    }
    return [t2i, und, edit, interleaved]


# -- the reference ---------------------------------------------------------------------------------------------------


def _reference_sample(sample, model, processor, noise, timesteps):
    """One sample's sequence as the original's pack_sequence builds it: embeddings, positions, expert of each token,
    split lengths and modes, CE indexes and labels, MSE indexes and targets."""
    config, tokenizer, inner = model.config, processor.tokenizer, model.model
    embeds, positions, is_gen, splits = [], [], [], []
    ce_index, ce_labels, mse_index, mse_target = [], [], [], []
    curr, rope = 0, 0

    def text_embed(ids):
        return inner.language_model.embed_tokens(torch.tensor(ids))

    for segment in sample["segments"]:
        if segment["type"] == "text":
            ids = tokenizer.encode(segment["text"], add_special_tokens=False)
            shifted = [config.bos_token_id, *ids]
            if segment["loss"]:
                ce_index += range(curr, curr + len(shifted))  # bos .. last text token
                ce_labels += [*ids, config.eos_token_id]  # next token; <|im_end|> is the last label
            tokens = [*shifted, config.eos_token_id]
            embeds.append(text_embed(tokens))
            is_gen += [False] * len(tokens)
            positions += range(rope, rope + len(tokens))
            splits.append((len(tokens), "causal"))
            curr, rope = curr + len(tokens), rope + len(tokens)
            continue
        if segment["type"] == "vit_image":
            vit = processor.image_processor.preprocess(segment["image"], resize_with_vae_rule_first=False)
            body = inner.get_image_features(vit["pixel_values"], vit["image_grid_hw"])
            mode = "full"
        else:
            latent = segment["latents"]
            p = config.latent_patch_size
            h, w = latent.shape[1] // p, latent.shape[2] // p
            clean = latent.reshape(16, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * 16)  # chpwq->hwpqc
            ids = (torch.arange(h)[:, None] * config.max_latent_size + torch.arange(w)).flatten()
            if segment["loss"]:
                t, eps = timesteps.pop(0), noise.pop(0)
                eps = eps.reshape(16, h, p, w, p).permute(1, 3, 2, 4, 0).reshape(h * w, p * p * 16)
                x = (1 - t) * clean + t * eps
                mse_index += range(curr + 1, curr + 1 + h * w)
                mse_target.append(eps - clean)
                mode = "noise"
            else:
                t, x, mode = 0.0, clean, "full"
            time = inner.time_embedder(torch.full((h * w,), float(t)))
            body = inner.vae2llm(x) + time + inner.latent_pos_embed.pos_embed[ids]
        start, end = text_embed([config.start_of_image_token_id, config.end_of_image_token_id]).split(1)
        embeds.append(torch.cat([start, body, end]))
        n = body.shape[0] + 2
        is_gen += [False] + [segment["type"] == "vae_image"] * body.shape[0] + [False]
        positions += [rope] * n
        splits.append((n, mode))
        curr += n
        if mode != "noise":
            rope += 1
    return {
        "embeds": torch.cat(embeds),
        "positions": torch.tensor(positions),
        "is_gen": torch.tensor(is_gen),
        "splits": splits,
        "ce_index": ce_index,
        "ce_labels": ce_labels,
        "mse_index": mse_index,
        "mse_target": mse_target,
    }


def _dense_mask(splits):
    """The original `prepare_attention_mask_per_sample`, as a boolean (True = may attend)."""
    total = sum(n for n, _ in splits)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n, mode in splits:
        block = torch.ones(n, n, dtype=torch.bool)
        mask[start : start + n, start : start + n] = block.tril() if mode == "causal" else block
        mask[start : start + n, :start] = True
        start += n
    start = 0
    for n, mode in splits:
        if mode == "noise":
            mask[:, start : start + n] = False
            mask[start : start + n, start : start + n] = True
        start += n
    return mask


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _reference_hidden(model, embeds, positions, is_gen, mask):
    """The MoT decoder written out: per-token expert choice, joint attention under `mask`, final per-expert norm."""
    text = model.model.language_model
    cfg = text.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // heads
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    freqs = positions[:, None].float() * inv_freq[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def pick(und, gen, x):
        out = torch.empty(*x.shape[:-1], und(x[:1]).shape[-1])
        out[~is_gen], out[is_gen] = und(x[~is_gen]), gen(x[is_gen])
        return out

    x = embeds
    length = x.shape[0]
    for layer in text.layers:
        attn = layer.self_attn
        h = pick(layer.input_layernorm, layer.input_layernorm_moe_gen, x)
        q = pick(attn.q_proj, attn.q_proj_moe_gen, h).view(length, heads, dim)
        k = pick(attn.k_proj, attn.k_proj_moe_gen, h).view(length, kv_heads, dim)
        v = pick(attn.v_proj, attn.v_proj_moe_gen, h).view(length, kv_heads, dim)
        q = pick(attn.q_norm, attn.q_norm_moe_gen, q)
        k = pick(attn.k_norm, attn.k_norm_moe_gen, k)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(dim)
        scores = scores.masked_fill(~mask[None], float("-inf"))
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(length, heads * dim)
        x = x + pick(attn.o_proj, attn.o_proj_moe_gen, out)
        x = x + pick(lambda y: layer.mlp(layer.post_attention_layernorm(y)),
                     lambda y: layer.mlp_moe_gen(layer.post_attention_layernorm_moe_gen(y)), x)  # fmt: skip
    return pick(text.norm, text.norm_moe_gen, x)


def _reference_losses(model, processor, samples, noise, timesteps, ce_weight=1.0, mse_weight=1.0):
    noise, timesteps = list(noise), [float(t) for t in timesteps]
    ce_terms, mse_terms = [], []
    for sample in samples:
        seq = _reference_sample(sample, model, processor, noise, timesteps)
        hidden = _reference_hidden(model, seq["embeds"], seq["positions"], seq["is_gen"], _dense_mask(seq["splits"]))
        if seq["ce_index"]:
            logits = model.lm_head(hidden[seq["ce_index"]])
            ce_terms.append(torch.nn.functional.cross_entropy(logits, torch.tensor(seq["ce_labels"]), reduction="none"))
        if seq["mse_index"]:
            prediction = model.llm2vae(hidden[seq["mse_index"]])
            mse_terms.append((prediction - torch.cat(seq["mse_target"])) ** 2)
    ce = torch.cat(ce_terms)
    mse = torch.cat(mse_terms)
    ce_loss = ce.sum() / ce.numel()  # sum * world / total_ce_tokens, one process
    mse_loss = mse.mean(-1).sum() / mse.shape[0]  # mean over channels, sum / total_mse_tokens
    return ce_loss, mse_loss, ce_weight * ce_loss + mse_weight * mse_loss


# -- tests -----------------------------------------------------------------------------------------------------------


def _noise_and_times(samples, seed=7):
    generator = torch.Generator().manual_seed(seed)
    noise = [
        torch.randn(segment["latents"].shape, generator=generator)
        for sample in samples
        for segment in sample["segments"]
        if segment["type"] == "vae_image" and segment["loss"]
    ]
    return noise, torch.tensor([0.3, 0.8, 0.55])[: len(noise)]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_loss_matches_independent_reference(tiny, attn_implementation):
    """Text-to-image, understanding, editing and an interleaved sample (text after a generated image) in one pack."""
    model, processor = tiny
    model.set_attn_implementation(attn_implementation)
    model.train()
    samples = _samples()
    collator = BagelDataCollator(processor, model.config, text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0,
                                 vae_cond_dropout_prob=0.0)  # fmt: skip
    batch = collator(samples)
    noise, timesteps = _noise_and_times(samples)
    with torch.no_grad():
        out = model(**batch, noise=noise, timesteps=timesteps, ce_weight=0.5, mse_weight=2.0)
        ce, mse, total = _reference_losses(model, processor, samples, noise, timesteps, 0.5, 2.0)
    for name, got, want in (("ce", out.ce_loss, ce), ("mse", out.mse_loss, mse), ("loss", out.loss, total)):
        assert abs(got.item() - want.item()) <= 1e-4 * abs(want.item()), f"{name}: {got.item()} vs {want.item()}"
    # the batch really is packed: one row, no padding, three samples
    assert batch["input_ids"].shape[0] == 1
    assert batch["document_ids"].unique().tolist() == [0, 1, 2, 3]
    model.set_attn_implementation("sdpa")


def test_packing_does_not_leak_between_samples(tiny):
    """Each sample's losses are unchanged by what it is packed with (block-diagonal attention, no label crossing):
    the packed CE is the understanding sample's alone, the packed MSE the token-weighted mean of the two targets'."""
    model, processor = tiny
    model.train()
    samples = _samples()
    collator = BagelDataCollator(processor, model.config, text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0,
                                 vae_cond_dropout_prob=0.0)  # fmt: skip
    samples = samples[:3]
    noise, timesteps = _noise_and_times(samples)
    with torch.no_grad():
        packed = model(**collator(samples), noise=noise, timesteps=timesteps)
        t2i = model(**collator([samples[0]]), noise=noise[:1], timesteps=timesteps[:1])
        und = model(**collator([samples[1]]))
        edit = model(**collator([samples[2]]), noise=noise[1:], timesteps=timesteps[1:])
    tokens = [noise[0][0].numel() // 4, noise[1][0].numel() // 4]  # latent tokens of each target (2x2 patches)
    expected_mse = (t2i.mse_loss * tokens[0] + edit.mse_loss * tokens[1]) / sum(tokens)
    torch.testing.assert_close(packed.mse_loss, expected_mse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(packed.ce_loss, und.ce_loss, rtol=1e-5, atol=1e-7)
    assert t2i.ce_loss.item() == 0.0 and und.mse_loss is None


def test_sampled_timesteps_are_shifted_logit_normal(tiny):
    """Without `timesteps`, t = shift * s / (1 + (shift - 1) * s) with s = sigmoid(randn), drawn per target image."""
    model, processor = tiny
    model.train()
    samples = _samples()
    collator = BagelDataCollator(processor, model.config, text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0,
                                 vae_cond_dropout_prob=0.0)  # fmt: skip
    batch = collator(samples)
    noise, _ = _noise_and_times(samples)
    shift = 3.0
    model.config.timestep_shift = shift
    try:
        torch.manual_seed(123)
        s = torch.sigmoid(torch.randn(3))
        expected_t = shift * s / (1 + (shift - 1) * s)
        torch.manual_seed(123)
        with torch.no_grad():
            out = model(**batch, noise=noise)
            _, mse, _ = _reference_losses(model, processor, samples, noise, expected_t)
    finally:
        model.config.timestep_shift = 1.0
    assert abs(out.mse_loss.item() - mse.item()) <= 1e-4 * mse.item()


def test_loss_backpropagates_to_both_experts(tiny):
    model, processor = tiny
    model.train()
    model.zero_grad()
    freeze_modules(model)  # the fixed sin-cos tables come back trainable from from_pretrained
    samples = _samples()
    collator = BagelDataCollator(processor, model.config, text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0,
                                 vae_cond_dropout_prob=0.0)  # fmt: skip
    noise, timesteps = _noise_and_times(samples)
    model(**collator(samples), noise=noise, timesteps=timesteps).loss.backward()
    layer = model.model.language_model.layers[0]
    for param in (layer.mlp.up_proj.weight, layer.mlp_moe_gen.up_proj.weight, model.lm_head.weight,
                  model.llm2vae.weight, model.model.vae2llm.weight, model.model.connector.fc1.weight):  # fmt: skip
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert model.model.latent_pos_embed.pos_embed.grad is None  # the frozen sin-cos table
    model.zero_grad()


def test_bad_noise_and_timesteps_are_refused(tiny):
    model, processor = tiny
    samples = _samples()
    collator = BagelDataCollator(processor, model.config, text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0,
                                 vae_cond_dropout_prob=0.0)  # fmt: skip
    batch = collator(samples)
    noise, timesteps = _noise_and_times(samples)
    with pytest.raises(ValueError, match="one per target image"):
        model(**batch, noise=noise, timesteps=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        model(**batch, noise=noise, timesteps=torch.tensor([0.5, 1.5, 0.5]))
    with pytest.raises(ValueError, match="one tensor per target image"):
        model(**batch, noise=noise[:1], timesteps=timesteps)
    with pytest.raises(ValueError, match="shape"):
        model(**batch, noise=[noise[0]] * 3, timesteps=timesteps)
