"""The one builder of BAGEL's token sequences from text / ViT / VAE segments (as the original's `inferencer.py` and
`data/dataset_base.py` lay them out): token ids, positions and labels, used by the processor (chat inputs: the
template's text and its image slots), the pipeline (guidance contexts) and the training collator (packed samples). The
model derives image blocks and expert routing from the ids with [`bagel_token_layout`], which reproduces these positions
for every sequence without noised targets."""

from dataclasses import dataclass, field


__all__ = ["BagelSequence", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class BagelSequence:
    """
    One sequence, built segment by segment as the original lays it out:

    - text: `<|im_start|> ids <|im_end|>`, causal, one position per token; with `loss=True` the labels are the
      shifted text and `<|im_end|>` (transformers' convention: the logits at `i` predict `labels[i + 1]`);
    - image: `<|vision_start|>`, one placeholder per token (`<|image_pad|>` for ViT patches, `<|vision_pad|>` for VAE
      latents), `<|vision_end|>`, all at one position; the position then advances by one, except for a noised
      generation target (training), which does not advance it.

    Args:
        token_ids: an object with BAGEL's special-token ids as attributes (`bos_token_id`, `eos_token_id`,
            `start_of_image_token_id`, `end_of_image_token_id`, `image_token_id`, `latent_token_id`), e.g. a
            [`BagelConfig`].
        position (`int`, defaults to 0): position of the first token.
    """

    token_ids: object
    position: int = 0
    input_ids: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def add_text(self, ids: list[int], loss: bool = False) -> "BagelSequence":
        t = self.token_ids
        tokens = [t.bos_token_id, *ids, t.eos_token_id]
        self.input_ids += tokens
        self.labels += [IGNORE_INDEX, *ids, t.eos_token_id] if loss else [IGNORE_INDEX] * len(tokens)
        self.position_ids += range(self.position, self.position + len(tokens))
        self.position += len(tokens)
        return self

    def add_image(self, num_tokens: int, latent: bool, noised: bool = False) -> "BagelSequence":
        """An image block of `num_tokens` ViT patches (`latent=False`) or VAE latent tokens (`latent=True`)."""
        t = self.token_ids
        placeholder = t.latent_token_id if latent else t.image_token_id
        tokens = [t.start_of_image_token_id, *([placeholder] * num_tokens), t.end_of_image_token_id]
        self.input_ids += tokens
        self.labels += [IGNORE_INDEX] * len(tokens)
        self.position_ids += [self.position] * len(tokens)
        if not noised:
            self.position += 1
        return self

    def add_tokens(self, ids: list[int]) -> "BagelSequence":
        """Tokens taken as they are (a chat template's text, which writes its own `<|im_start|>` / `<|im_end|>`),
        causal, one position each, no labels."""
        self.input_ids += ids
        self.labels += [IGNORE_INDEX] * len(ids)
        self.position_ids += range(self.position, self.position + len(ids))
        self.position += len(ids)
        return self

    def skip_image(self) -> "BagelSequence":
        """An image dropped for classifier-free guidance training still takes its position, as the original."""
        self.position += 1
        return self

    def __len__(self) -> int:
        return len(self.input_ids)
