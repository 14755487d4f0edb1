"""
The guidance contexts of a [`BagelPipeline`] call as model inputs and as a prefilled [`BagelContext`].

One route lays out every context: [`ContextEncoder.layout`] writes a list of segments (see `pipeline_inputs`) as
[`BagelSequence`] token ids, each text tokenised by the processor, each image block sized from its image, with no model
run. The position check and thinking budget, the left-padded batch that thinking generates from
([`ContextEncoder.batch`]) and the cache prefill of the guidance branches ([`prefill_guidance`]) all read it; the
ViT patches and VAE latents of the images are computed only when a model input needs them, each image VAE-encoded
once per call.
"""

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from transformers_bagel.context_bagel import BagelContext, BagelContextSpan
from transformers_bagel.modeling_bagel import pack_latents
from transformers_bagel.sequence_layout import BagelSequence

from .guidance_parallel import GuidanceParallel
from .pipeline_inputs import Context, GuidanceContexts


__all__ = ["ContextEncoder", "Guidance", "prefill_guidance"]


class ContextEncoder:
    """
    Token ids and image inputs of the contexts of one pipeline call, for `model` (a
    [`~transformers_bagel.BagelForConditionalGeneration`]), `vae` and `processor`, on `device`. Each text is tokenised
    once and each image VAE-encoded once (per posterior mode) by one encoder.

    Args:
        generator (`torch.Generator`, *optional*): draws the VAE posterior samples with `sample_posterior`.
        sample_posterior (`bool`, defaults to `False`): sample the VAE posterior of input images instead of taking its
            mean.
    """

    def __init__(self, model, vae, processor, device, generator=None, sample_posterior: bool = False):
        self.model, self.vae, self.processor, self.device = model, vae, processor, device
        self.generator, self.sample_posterior = generator, sample_posterior
        self._text_ids = {}
        self._latents = {}  # (id(image), sampled) -> (image, tokens); the image is kept so that its id stays its own

    def text_ids(self, text: str) -> list[int]:
        """Token ids of one text segment (the processor's `encode_text`), tokenised once per encoder."""
        if text not in self._text_ids:
            self._text_ids[text] = self.processor.encode_text(text)
        return self._text_ids[text]

    def latent_grid(self, image) -> tuple[int, int]:
        """`(rows, cols)` of the latent tokens of a VAE-resized image."""
        stride = self.model.config.latent_downsample
        return image.height // stride, image.width // stride

    def layout(self, segments: list) -> BagelSequence:
        """The token sequence of `segments` as the original lays it out (`inferencer.py` of ByteDance-Seed/Bagel):
        `<|im_start|> text <|im_end|>` per text, one image block per image (VAE latents or ViT patches)."""
        sequence = BagelSequence(self.model.config)
        for kind, value in segments:
            if kind == "text":
                sequence.add_text(self.text_ids(value))
            elif kind == "vae":
                rows, cols = self.latent_grid(value)
                sequence.add_image(rows * cols, latent=True)
            else:
                rows, cols = self.processor.image_processor.num_vit_patches(value.height, value.width)
                sequence.add_image(rows * cols, latent=False)
        return sequence

    def _vae_tokens(self, image, sample_posterior: bool) -> torch.Tensor:
        """Clean conditioning latents of one image: `(h * w, patch_latent_dim)` in the normalised latent space."""
        key = (id(image), sample_posterior)
        if key not in self._latents:
            vae = self.vae
            pixels = self.processor.image_processor.preprocess_vae([image])["vae_pixel_values"][0]
            posterior = vae.encode(pixels[None].to(device=self.device, dtype=vae.dtype)).latent_dist
            latent = posterior.sample(self.generator) if sample_posterior else posterior.mode()
            latent = (latent - vae.config.shift_factor) * vae.config.scaling_factor
            self._latents[key] = (image, pack_latents(latent, self.model.config.latent_patch_size)[0])
        return self._latents[key][1]

    def image_inputs(self, rows: list[list], sample_posterior: bool | None = None) -> dict:
        """The ViT patches (`pixel_values`, `image_grid_hw`) and clean latents (`latents`, `latent_grid_hw`) of the
        images of `rows` (lists of segments), in row order. `sample_posterior`: the encoder's when None."""
        sample_posterior = self.sample_posterior if sample_posterior is None else sample_posterior
        dtype, device = self.model.dtype, self.device
        vit_images = [value for row in rows for kind, value in row if kind == "vit"]
        vae_images = [value for row in rows for kind, value in row if kind == "vae"]
        inputs = {}
        if vit_images:
            vit = self.processor.image_processor.preprocess(vit_images, return_tensors="pt")
            inputs["pixel_values"] = vit["pixel_values"].to(device=device, dtype=dtype)
            inputs["image_grid_hw"] = vit["image_grid_hw"].to(device)
        if vae_images:
            latents = [self._vae_tokens(image, sample_posterior) for image in vae_images]
            inputs["latents"] = torch.cat(latents).to(device=device, dtype=dtype)
            inputs["latent_grid_hw"] = torch.tensor([self.latent_grid(image) for image in vae_images], device=device)
        return inputs

    def batch(self, contexts: list[Context], sample_posterior: bool | None = None) -> dict:
        """Token ids (left padded, with their `attention_mask`), ViT patches and clean latents of several contexts, in
        one batch (for `generate`). `sample_posterior`: the encoder's when None."""
        config = self.model.config
        rows = [self.layout(c.segments).input_ids for c in contexts]
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), config.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):
            if ids:
                input_ids[i, length - len(ids) :] = torch.tensor(ids)
                attention_mask[i, length - len(ids) :] = 1
        inputs = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
        inputs.update(self.image_inputs([c.segments for c in contexts], sample_posterior))
        return inputs

    def prefill(self, context: BagelContext, span: BagelContextSpan, rows: list[list]) -> list[BagelContextSpan]:
        """
        Appends the segments of `rows[0]` to `span` (the last context of `context`); each later row is a new context.
        Rows of as many tokens run in one forward (the weights are read once for all), otherwise one after another.
        Returns the span of each row.
        """
        ids = [self.layout(row).input_ids for row in rows]
        if len({len(row_ids) for row_ids in ids}) > 1:
            grown = []
            for row, row_ids in zip(rows, ids):
                row_span = context.new_span() if grown else span
                grown += self._prefill_forward(context, [row_span], [row], [row_ids]) if row_ids else [row_span]
            return grown
        if not ids[0]:
            return [span] + [context.new_span() for _ in rows[1:]]
        return self._prefill_forward(context, [span] + [context.new_span()] * (len(rows) - 1), rows, ids)

    def _prefill_forward(self, context: BagelContext, spans: list, rows: list[list], ids: list[list[int]]) -> list:
        """One cache-only forward of rows of equal length (see [`~ContextEncoder.prefill`])."""
        inputs = self.image_inputs(rows)
        input_ids = torch.tensor(ids, device=self.device)
        # Only the cache is wanted: the last layer computes its keys and values, and no logits are computed.
        output = self.model.prefill_context(input_ids, context, spans, cache_only=True, **inputs)
        return list(output.context_spans)


@dataclass
class Guidance:
    """
    The prefilled guidance branches of one pipeline call: every context in one [`BagelContext`], and per branch
    (`"cond"`: full context, `"text"`: without the text, `"image"`: without the images) the span of each prompt.
    """

    context: BagelContext
    spans: dict[str, list[BagelContextSpan]]
    batch_size: int
    use_text: bool
    use_image: bool
    image_reuses_full: bool
    cfg_text_scale: float
    cfg_img_scale: float
    cfg_interval: tuple[float, float]
    cfg_renorm_type: str
    cfg_renorm_min: float
    hooked_decoder: object = None  # the decoder carrying this call's diffusers step-cache hooks, if any
    # With guidance parallelism: the processes, and the rank of each branch (`spans` holds this rank's branches only).
    parallel: GuidanceParallel | None = None
    owners: dict[str, int] | None = None

    @property
    def num_branches(self) -> int:
        return 1 + self.use_text + self.use_image

    def local_branches(self, active: list[str]) -> list[str]:
        """The branches of `active` this process runs (all of them without guidance parallelism)."""
        if self.parallel is None:
            return active
        return [branch for branch in active if self.owners[branch] == self.parallel.rank]


def prefill_guidance(
    encoder: ContextEncoder,
    contexts: list[GuidanceContexts],
    cfg_text_scale: float,
    cfg_img_scale: float,
    cfg_interval: tuple[float, float],
    cfg_renorm_type: str,
    cfg_renorm_min: float,
    cache: Cache | None = None,
    reuse_full_for_image: bool = True,
    batch_invariant: bool = False,
    parallel: GuidanceParallel | None = None,
) -> Guidance:
    """Prefills every context the guidance of `contexts` (one per image) needs, through `encoder`; see
    [`BagelPipeline.prepare_guidance`]. With `parallel`, only the contexts of this process's branches, computed as
    with `batch_invariant=True`."""
    use_text = cfg_text_scale > 1.0
    image_reuses_full = all(c.no_image_cut == len(c.full.segments) for c in contexts)
    use_image = use_text and cfg_img_scale > 1.0 and not (image_reuses_full and reuse_full_for_image)
    branches = ["cond"] + ["text"] * use_text + ["image"] * use_image
    owners = None if parallel is None else parallel.owners(branches)
    if owners is not None:
        branches = [branch for branch in branches if owners[branch] == parallel.rank]
    batch_invariant = batch_invariant or parallel is not None
    context = BagelContext(cache, batch_invariant=batch_invariant)
    spans = {"cond": [], "text": [], "image": []}
    done = {}
    for prompt in contexts:
        if id(prompt) not in done:  # num_images_per_prompt repeats one prompt's contexts: prefill them once
            # With the default cache, every prompt after the first is prefilled on its own and appended, so its
            # keys (and a seeded image) are exactly those of the prompt generated alone; prefilled into the shared
            # row, its attention would also run over the earlier prompts' keys (masked out) and round differently.
            alone = BagelContext() if done and cache is None else context
            prompt_spans = _prefill_prompt(encoder, alone, prompt, branches, batch_invariant and cache is None)
            if alone is not context:
                offset = context.append_context(alone)
                prompt_spans = {kind: span.shifted(offset) for kind, span in prompt_spans.items()}
            done[id(prompt)] = prompt_spans
        for kind, span in done[id(prompt)].items():
            spans[kind].append(span)
    return Guidance(
        context=context,
        spans=spans,
        batch_size=len(contexts),
        use_text=use_text,
        use_image=use_image,
        image_reuses_full=image_reuses_full and not use_image,
        cfg_text_scale=cfg_text_scale,
        cfg_img_scale=cfg_img_scale,
        cfg_interval=tuple(cfg_interval),
        cfg_renorm_type=cfg_renorm_type,
        cfg_renorm_min=cfg_renorm_min,
        parallel=parallel,
        owners=owners,
    )


def _prefill_prompt(
    encoder: ContextEncoder, context: BagelContext, prompt: GuidanceContexts, branches: list[str], apart: bool
) -> dict[str, BagelContextSpan]:
    """
    The spans of one prompt's `branches`: the full context prefilled once, as far as the branches need it (all of it
    for "cond"), cut where a guidance context is its prefix; a guidance context that is not a prefix is a span of its
    own, prefilled in the forward of the full context's last segment (an edit's instruction after the image and
    alone: one forward of two rows), or with `apart` on its own and appended, so that its keys do not depend on the
    other branches' (`batch_invariant`, guidance parallelism).
    """
    full = prompt.full.segments
    prefix_cuts = {"cond": len(full), "text": prompt.no_text_cut, "image": prompt.no_image_cut}
    cuts = {kind: prefix_cuts[kind] for kind in branches if prefix_cuts[kind] is not None}
    guidance_contexts = {"text": prompt.no_text, "image": prompt.no_image}
    separate = [(kind, guidance_contexts[kind].segments) for kind in branches if kind not in cuts]
    together = [] if apart else separate
    span, done_at = context.new_span(), 0
    at_cut, spans = {0: span}, {}
    for cut in sorted(set(cuts.values())):
        # One forward per segment, as the original prefills: an image block alone sees every earlier key, so its
        # attention needs no mask, and a lone latent block takes the experts by slices (no gather / scatter).
        for index in range(done_at, cut):
            rows = [[full[index]]] + ([segments for _, segments in together] if index == len(full) - 1 else [])
            span, *others = encoder.prefill(context, span, rows)
            spans.update(zip((kind for kind, _ in together), others))
        done_at = max(done_at, cut)
        at_cut[cut] = span
    spans.update({kind: at_cut[cut] for kind, cut in cuts.items()})
    for kind, segments in separate:
        if kind in spans:
            continue
        if not apart:  # the full context's last segment was not prefilled here (an empty full context)
            spans[kind] = encoder.prefill(context, context.new_span(), [segments])[0]
            continue
        alone = BagelContext()
        span = encoder.prefill(alone, alone.new_span(), [segments])[0]
        spans[kind] = span.shifted(context.append_context(alone))
    return spans
