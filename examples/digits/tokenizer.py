"""A word-level tokenizer for the digits task, holding BAGEL's special tokens."""

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging

from transformers_bagel.convert_bagel_to_hf import SPECIAL_TOKENS


logger = logging.get_logger(__name__)

__all__ = ["BAGEL_SPECIAL_TOKENS", "DIGITS_WORDS", "UNK_TOKEN", "build_digits_tokenizer"]

# BAGEL's special tokens (the converter's `SPECIAL_TOKENS`, keyed by config field) in the order their ids are
# assigned (0..6): Qwen2's order, `<|endoftext|>` first.
BAGEL_SPECIAL_TOKENS = tuple(
    SPECIAL_TOKENS[field]
    for field in (
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "start_of_image_token_id",
        "end_of_image_token_id",
        "latent_token_id",
        "image_token_id",
    )
)
UNK_TOKEN = "<|unk|>"
# Every word of the task's prompts, questions and answers (lower case: the tokenizer lower-cases its input).
DIGITS_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "a", "handwritten", "digit", "change", "the", "to", "which", "is", "this", "?", "draw", "number", "of", "an",
    "image", "what", ".",
)  # fmt: skip


def build_digits_tokenizer(words=DIGITS_WORDS) -> PreTrainedTokenizerFast:
    """
    Builds the task's tokenizer with the `tokenizers` library: a word-level model (one id per word; input lower-cased
    and split on white space and punctuation) over BAGEL's seven special tokens, an unknown token and `words`,
    wrapped as a [`PreTrainedTokenizerFast`] whose `pad_token` is `<|endoftext|>`.

    Args:
        words (`Iterable[str]`, defaults to [`DIGITS_WORDS`]): the vocabulary after the special tokens.

    Returns:
        [`PreTrainedTokenizerFast`]; `len(tokenizer)` is `8 + len(words)`.
    """
    words = list(words)
    if not words or not all(isinstance(word, str) and word and not word.isspace() for word in words):
        raise ValueError("`words` must be a non-empty list of non-blank strings.")
    reserved = set(BAGEL_SPECIAL_TOKENS) | {UNK_TOKEN}
    if len(set(words)) != len(words) or reserved & set(words):
        raise ValueError("`words` must be unique and must not repeat the special tokens.")
    vocab = {token: index for index, token in enumerate((*BAGEL_SPECIAL_TOKENS, UNK_TOKEN, *words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        additional_special_tokens=list(BAGEL_SPECIAL_TOKENS[3:]),
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
