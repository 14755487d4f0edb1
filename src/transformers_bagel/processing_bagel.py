"""Processor for BAGEL: tokenizer plus image processor, interleaved text and images."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .checkpoint_files import check_json_files, check_tokenizer_files, is_pipeline_root, local_folder
from .configuration_bagel import SPECIAL_TOKENS, special_token_ids
from .sequence_layout import BagelSequence
from .video_utils import _check_num_frames, load_video_frames


logger = logging.get_logger(__name__)

__all__ = ["BagelProcessor", "BAGEL_CHAT_TEMPLATE", "VIDEO_PART_KEYS"]


# BAGEL has no roles and no system template (the original's `prepare_prompts`, `modeling/bagel/bagel.py` of
# ByteDance-Seed/Bagel): every text is `<|im_start|>text<|im_end|>`, every image a vision block, and generation starts
# from `<|im_start|>`. Roles are accepted and ignored so that standard
# `messages` work; a plain-string content is one text. BAGEL has no video token: a video is one vision block per
# frame, as the original's VLM data puts it (`video` holding the decoded frames, or a bare slot of `num_frames`).
BAGEL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}"
    "{{ '<|im_start|>' + message['content'] + '<|im_end|>' }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ '<|im_start|>' + part['text'] + '<|im_end|>' }}"
    "{% elif part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}"
    "{% if part['video'] is defined and part['video'] is not string and part['video'] is iterable %}"
    "{% for frame in part['video'] %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% endfor %}"
    "{% else %}"
    "{% for frame in range(part['num_frames'] or 0) %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% endfor %}"
    "{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>' }}{% endif %}"
)
# The special tokens a processor needs (padding uses the tokenizer's own pad token).
_NO_VAE_SLOTS = (
    "BagelProcessor fills ViT image slots only; VAE latents (for generation and editing) come from the VAE, which "
    "BagelPipeline runs, and training batches with VAE images are built by BagelDataCollator."
)
LAYOUT_TOKEN_FIELDS = tuple(field for field in SPECIAL_TOKENS if field != "pad_token_id")
_NO_VIDEOS_ARGUMENT = (
    "BagelProcessor does not take `videos=`: BAGEL has no video token, it sees a video as its frames, one image block "
    "each. Give the video as a {'type': 'video', 'video': ...} part to `apply_chat_template(..., tokenize=True)` "
    "(optionally with `num_frames` / `fps`), or load its frames with "
    "`transformers_bagel.video_utils.load_video_frames` and pass them as `images=` with one "
    "`<|vision_start|><|image_pad|><|vision_end|>` slot per frame."
)
_VIDEO_KEYS = ("video", "path")
# Every key a {"type": "video", ...} chat part may hold; any other is refused (a typo would otherwise be ignored).
VIDEO_PART_KEYS = ("type", *_VIDEO_KEYS, "num_frames", "fps")


class BagelProcessor(ProcessorMixin):
    r"""
    Constructs a BAGEL processor from a Qwen2 tokenizer and a [`BagelImageProcessor`].

    Text may contain image placeholders: `<|image_pad|>` for an image seen by the ViT (understanding) and
    `<|vision_pad|>` for an image seen by the VAE (generation, editing), each normally wrapped in
    `<|vision_start|>...<|vision_end|>` as the chat template writes it. Each placeholder is expanded to the number of
    tokens of its image; images are consumed in order. Batches are left padded.

    Args:
        image_processor ([`BagelImageProcessor`]): the image processor.
        tokenizer ([`PreTrainedTokenizerBase`]): a tokenizer holding BAGEL's special tokens.
        chat_template (`str`, *optional*): defaults to BAGEL's role-less template.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None, **kwargs):
        if chat_template is None:
            chat_template = BAGEL_CHAT_TEMPLATE
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        # Ids by BagelConfig field (`bos_token_id`, `image_token_id`, ...), the names BagelSequence lays rows out with.
        self.token_ids = special_token_ids(tokenizer, LAYOUT_TOKEN_FIELDS)
        self.image_token, self.latent_token = SPECIAL_TOKENS["image_token_id"], SPECIAL_TOKENS["latent_token_id"]
        self.image_token_id = self.token_ids["image_token_id"]
        self.latent_token_id = self.token_ids["latent_token_id"]
        self._layout_ids = SimpleNamespace(**self.token_ids)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        [`~ProcessorMixin.from_pretrained`]; a local folder without tokenizer files, or with a truncated one, is
        refused naming the folder or file (transformers would suggest installing sentencepiece, or raise a bare
        `JSONDecodeError`).
        """
        if not kwargs.get("subfolder") and local_folder(pretrained_model_name_or_path) is not None:
            if is_pipeline_root(pretrained_model_name_or_path):
                raise ValueError(
                    f"{str(pretrained_model_name_or_path)!r} is a converted BAGEL pipeline folder: load the processor "
                    f"from its `processor` subfolder ({cls.__name__}.from_pretrained(path, subfolder='processor'))."
                )
        folder = local_folder(pretrained_model_name_or_path, kwargs.get("subfolder"))
        if folder is not None:
            check_tokenizer_files(folder)
            check_json_files(folder, ["processor_config.json", "preprocessor_config.json"])
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def apply_chat_template(self, conversation, *args, **kwargs):
        """
        [`~ProcessorMixin.apply_chat_template`] with BAGEL's template, after checking the messages: each has a
        `content` (a string, or a non-empty list of `{"type": "text", "text": ...}` / `{"type": "image", ...}` /
        `{"type": "video", "video": ...}` parts); texts may not hold the tokenizer's special tokens (they would forge
        segment boundaries); with `tokenize=True` each image part names its image and each video part its video.
        Anything else is refused naming the message and part, instead of being dropped by the template.

        A video part (`video` or `path`: a video file, a folder of frames or a list of frames, see
        [`~video_utils.load_video_frames`]) is decoded and sampled here, with its own `num_frames` / `fps` keys or
        else the call's `num_frames=` / `fps=` (also accepted in `processor_kwargs`; the part and the call giving
        different values is refused), and stands for its frames: one
        `<|vision_start|><|image_pad|><|vision_end|>` block and one image each, exactly as the same frames given as
        consecutive image parts (BAGEL has no video token; the original's VLM data puts a video so). The text depends
        on the number of frames, so videos are decoded with `tokenize=False` too; a bare `{"type": "video",
        "num_frames": n}` renders `n` slots for images given to the processor. The caller's messages are not changed.
        A video part takes only the keys of [`VIDEO_PART_KEYS`] (`type`, `video`, `path`, `num_frames`, `fps`);
        another key is refused naming it. Frames already in memory are sampled like any video (8 of them without
        `num_frames` / `fps`, with a warning when that drops frames): to keep frames sampled beforehand (e.g. by
        [`~video_utils.load_video_frames`]), give `num_frames=len(frames)`.
        """
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        video_kwargs = {}
        for key in ("num_frames", "fps"):
            value = kwargs.pop(key, None)
            value = processor_kwargs.pop(key, None) if value is None else value
            video_kwargs[key] = value
        processor_kwargs.pop("do_sample_frames", None)  # set by transformers for videos; frames are sampled here
        if processor_kwargs:
            kwargs["processor_kwargs"] = processor_kwargs
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        expanded = []
        for c, messages in enumerate(conversations):
            if not isinstance(messages, (list, tuple)) or not messages:
                raise ValueError(f"Conversation {c} is empty: give a list of messages.")
            new_messages = []
            for m, message in enumerate(messages):
                where = f"message {m}" + (f" of conversation {c}" if len(conversations) > 1 else "")
                content = message.get("content") if isinstance(message, dict) else None
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
                if not isinstance(parts, (list, tuple)) or not parts:
                    raise ValueError(f"The {where} has no content (got {content!r}): give a string or a list of parts.")
                new_parts = []
                for p, part in enumerate(parts):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind not in ("text", "image", "video"):
                        raise ValueError(
                            f"Part {p} of the {where} has type {kind!r}: BAGEL's chat takes 'text', 'image' and "
                            "'video' parts."
                        )
                    if kind == "text":
                        text = part.get("text")
                        if not isinstance(text, str):
                            raise ValueError(f"Part {p} of the {where} is a text part without a string `text`.")
                        found = self.special_tokens_in(text)
                        if found:
                            raise ValueError(
                                f"Part {p} of the {where} contains the special tokens {found}, which delimit BAGEL's "
                                "segments: put each text in its own part or message."
                            )
                    elif kind == "video":
                        new_parts.extend(self._video_parts(part, f"Part {p} of the {where}", video_kwargs, kwargs))
                        continue
                    elif kwargs.get("tokenize") and not any(
                        part.get(key) is not None for key in ("image", "url", "path", "base64")
                    ):
                        # Rendering text only, a bare {"type": "image"} is a slot for an image given to the processor.
                        raise ValueError(
                            f"Part {p} of the {where} is an image part without `image`, `url` or `path` (needed with "
                            "tokenize=True, which loads the images from the messages)."
                        )
                    new_parts.append(part)
                new_messages.append({**message, "content": new_parts} if not isinstance(content, str) else message)
            expanded.append(new_messages)
        return super().apply_chat_template(expanded if batched else expanded[0], *args, **kwargs)

    def _video_parts(self, part: dict, where: str, video_kwargs: dict, kwargs: dict) -> list[dict]:
        """A video part as the image parts of its sampled frames (a bare slot is kept for the template)."""
        _check_video_part_keys(part, where)
        video = next((part[key] for key in _VIDEO_KEYS if part.get(key) is not None), None)
        num_frames = _video_setting(part, video_kwargs, "num_frames", where)
        fps = _video_setting(part, video_kwargs, "fps", where)
        if video is None:
            if kwargs.get("tokenize"):
                raise ValueError(
                    f"{where} is a video part without `video` or `path` (needed with tokenize=True, which loads the "
                    "videos from the messages)."
                )
            if num_frames is None:
                raise ValueError(
                    f"{where} is a bare video part: give its `video`, or `num_frames` for that many image slots."
                )
            try:
                _check_num_frames(num_frames)
            except ValueError as error:
                raise ValueError(f"{where} (type 'video'): {error}") from error
            return [{"type": "image"} for _ in range(int(num_frames))]
        try:
            frames = load_video_frames(video, num_frames=num_frames, fps=fps)
        except (ValueError, TypeError) as error:
            raise ValueError(f"{where} (type 'video') could not be read: {error}") from error
        given = _frames_in_memory(video)
        if num_frames is None and fps is None and given > len(frames):
            logger.warning(
                f"{where}: the video's {given} frames in memory are sampled down to {len(frames)} (the default "
                f"count); if they are already sampled, pass `num_frames` (e.g. {given}) in the part or the call to "
                "keep them all."
            )
        logger.info(f"{where}: a video of {len(frames)} frame(s), one image block each.")
        return [{"type": "image", "image": frame} for frame in frames]

    def special_tokens_in(self, text: str) -> list[str]:
        """The tokenizer's special tokens (segment delimiters, image slots) written in `text`."""
        tokenizer = self.tokenizer
        specials = set(tokenizer.all_special_tokens) | {
            token.content for token in tokenizer.added_tokens_decoder.values() if token.special
        }
        return sorted(token for token in specials if token and token in text)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of one text segment (no special tokens added), warning when words fall outside the tokenizer's
        vocabulary (a word-level tokenizer turns them into its unknown token)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        unk, unk_text = self.tokenizer.unk_token_id, self.tokenizer.unk_token
        if unk is not None and unk in ids and not (unk_text and unk_text in text):
            logger.warning(
                f"{ids.count(unk)} word(s) of {text[:60]!r} are not in the tokenizer's vocabulary and were replaced by "
                f"{self.tokenizer.unk_token}."
            )
        return ids

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_hw"]

    def __call__(
        self,
        text: str | list[str] | None = None,
        images=None,
        return_tensors: str | None = "pt",
        padding_side: str = "left",
        add_special_tokens: bool = False,
        **kwargs,
    ) -> BatchFeature:
        """
        Tokenizes `text` and expands its image placeholders.

        Args:
            text (`str` or `list[str]`): prompts, for example from [`~BagelProcessor.apply_chat_template`].
            images: images for the `<|image_pad|>` placeholders (ViT), flat in order or one list per prompt.
            return_tensors (`str`, defaults to `"pt"`): only `"pt"` (or `None` for lists) is supported.
            padding_side (`str`, defaults to `"left"`): side on which shorter prompts are padded.
            padding (`bool` or `str`, defaults to `True`): `True` / `"longest"` pads to the longest prompt,
                `"max_length"` to `max_length`, `False` / `"do_not_pad"` not at all (lists, or equal lengths).
            max_length (`int`, *optional*), pad_to_multiple_of (`int`, *optional*): as for tokenizers, counted after
                the image placeholders are expanded.
            truncation (`bool`, *optional*): prompts are never cut (a cut could split an image block): with
                `truncation=True`, a prompt longer than `max_length` is refused instead.
            return_attention_mask (`bool`, defaults to `True`): whether to return `attention_mask`.

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask`, and for images `pixel_values` and `image_grid_hw`.
            VAE latent slots (`<|vision_pad|>`) are not filled here: their latents come from the VAE, which
            [`BagelPipeline`] (generation, editing) and [`BagelDataCollator`] (training) run.
        """
        if kwargs.pop("videos", None) is not None:
            raise ValueError(_NO_VIDEOS_ARGUMENT)
        if kwargs.pop("audio", None) is not None:
            raise ValueError("BAGEL does not take audio.")
        if kwargs.pop("vae_images", None) is not None:
            raise ValueError(_NO_VAE_SLOTS)
        padding = kwargs.pop("padding", True)
        truncation = kwargs.pop("truncation", None)
        max_length = kwargs.pop("max_length", None)
        pad_to_multiple_of = kwargs.pop("pad_to_multiple_of", None)
        return_attention_mask = kwargs.pop("return_attention_mask", True)
        padding = {True: "longest", False: "do_not_pad", None: "longest"}.get(padding, padding)
        if padding not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"`padding` must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}.")
        for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs `max_length`.")
        if truncation not in (None, False, "do_not_truncate") and max_length is None:
            raise ValueError("`truncation` needs `max_length`.")
        ignored = set(kwargs)
        if ignored:
            logger.warning_once(f"BagelProcessor ignores the arguments {sorted(ignored)}.")
        if text is None:
            raise ValueError("BagelProcessor needs `text`; use `image_processor` directly for images alone.")
        texts = [text] if isinstance(text, str) else list(text) if isinstance(text, (list, tuple)) else None
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"`text` must be a string or a non-empty list of strings, got {type(text).__name__}.")
        if padding_side not in ("left", "right"):
            raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
        if return_tensors not in ("pt", None):
            raise ValueError(f"BagelProcessor supports return_tensors='pt' or None, got {return_tensors!r}.")

        vit_images = _flatten_images(images)
        rows = [self.tokenizer.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if any(self.latent_token_id in row for row in rows):
            raise ValueError(f"The text holds {self.latent_token} slots: {_NO_VAE_SLOTS}")
        self._check_counts_per_prompt(rows, self.image_token_id, images, "images", self.image_token)
        self._check_counts(rows, self.image_token_id, vit_images, "images", self.image_token)

        data = {}
        vit_counts = []
        if vit_images:
            vit = self.image_processor.preprocess(vit_images, return_tensors="pt")
            data.update(vit)
            vit_counts = (vit["image_grid_hw"][:, 0] * vit["image_grid_hw"][:, 1]).tolist()

        counts = {self.image_token_id: iter(vit_counts)}
        expanded = [self._expand(row, counts).input_ids for row in rows]

        longest = max(len(r) for r in expanded)
        if truncation not in (None, False, "do_not_truncate") and longest > max_length:
            # A cut could fall inside an image block, which the model cannot take: say so rather than cut.
            raise ValueError(
                f"A prompt takes {longest} tokens (images expanded), more than max_length={max_length}; BAGEL's "
                "prompts are not truncated (a cut could split an image block): shorten the text or use fewer images."
            )
        length = max(longest, max_length) if padding == "max_length" else longest
        if pad_to_multiple_of and padding != "do_not_pad":
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
        if padding == "do_not_pad":
            if return_tensors == "pt" and len({len(r) for r in expanded}) > 1:
                raise ValueError(
                    "padding=False with prompts of different lengths cannot be returned as one tensor: pass "
                    "return_tensors=None for lists, or pad."
                )
            length = 0
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids, attention_mask = [], []
        for row in expanded:
            pad = max(length - len(row), 0)
            ids = [pad_id] * pad + row if padding_side == "left" else row + [pad_id] * pad
            mask = [0] * pad + [1] * len(row) if padding_side == "left" else [1] * len(row) + [0] * pad
            input_ids.append(ids)
            attention_mask.append(mask)
        if return_tensors == "pt":
            input_ids = torch.tensor(input_ids, dtype=torch.long)
            attention_mask = torch.tensor(attention_mask, dtype=torch.long)
        data = {"input_ids": input_ids, **({"attention_mask": attention_mask} if return_attention_mask else {}), **data}
        return BatchFeature(data=data)

    def _expand(self, row: list[int], counts: dict) -> BagelSequence:
        """The row laid out by [`BagelSequence`]: each `<|vision_start|> placeholder <|vision_end|>` slot becomes an
        image block of its image's token count; a bare placeholder expands in place; other tokens are kept."""
        sequence = BagelSequence(self._layout_ids)
        start, end = self._layout_ids.start_of_image_token_id, self._layout_ids.end_of_image_token_id
        i = 0
        while i < len(row):
            token = row[i]
            if token == start and i + 2 < len(row) and row[i + 1] in counts and row[i + 2] == end:
                sequence.add_image(next(counts[row[i + 1]]), latent=False)
                i += 3
                continue
            sequence.add_tokens([token] * next(counts[token]) if token in counts else [token])
            i += 1
        return sequence

    @staticmethod
    def _check_counts_per_prompt(rows, token_id, images, argument, token):
        """With one image list per prompt, each prompt's placeholders must match its own list (flattening would move
        an image into another prompt)."""
        if not isinstance(images, (list, tuple)) or not any(isinstance(item, (list, tuple)) for item in images):
            return
        if len(images) != len(rows):
            raise ValueError(f"`{argument}` holds {len(images)} image lists for {len(rows)} prompts.")
        for i, (row, per_prompt) in enumerate(zip(rows, images)):
            per_prompt = per_prompt if isinstance(per_prompt, (list, tuple)) else [per_prompt]
            count = sum(item is not None for item in per_prompt)
            if row.count(token_id) != count:
                raise ValueError(
                    f"Prompt {i} has {row.count(token_id)} {token} placeholder(s) but its list in `{argument}` holds "
                    f"{count} image(s)."
                )

    @staticmethod
    def _check_counts(rows, token_id, images, argument, token):
        placeholders = sum(row.count(token_id) for row in rows)
        if placeholders != len(images):
            raise ValueError(
                f"The text has {placeholders} {token} placeholder(s) but {len(images)} image(s) were passed as "
                f"`{argument}`; give exactly one image per placeholder."
            )


def _check_video_part_keys(part: dict, where: str) -> None:
    """Refuses keys of a video part other than [`VIDEO_PART_KEYS`], naming them and the allowed ones."""
    unknown = sorted(str(key) for key in set(part) - set(VIDEO_PART_KEYS))
    if unknown:
        hint = " (a URL is not downloaded: download the video and give its `path`)" if "url" in unknown else ""
        raise ValueError(
            f"{where} (type 'video') has unknown key(s) {unknown}{hint}; a video part takes {list(VIDEO_PART_KEYS)}."
        )


def _video_setting(part: dict, video_kwargs: dict, key: str, where: str):
    """`num_frames` / `fps` of a video part: the part's own, else the call's; both given and different is refused
    (one of them would be silently ignored)."""
    own, call = part.get(key), video_kwargs.get(key)
    if own is not None and call is not None and own != call:
        raise ValueError(
            f"{where} (type 'video') sets `{key}`={own!r} but apply_chat_template was called with {key}={call!r}: "
            "give it in one place only."
        )
    return own if own is not None else call


def _frames_in_memory(video) -> int:
    """The number of frames of a video given in memory (a list, or a 4-d array); 0 for a file or a folder."""
    if isinstance(video, (list, tuple)):
        return len(video)
    if getattr(video, "ndim", None) == 4:
        return int(video.shape[0])
    return 0


def _flatten_images(images) -> list:
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        return [images]
    flat = []
    for item in images:
        if isinstance(item, (list, tuple)):
            flat.extend(i for i in item if i is not None)
        elif item is not None:
            flat.append(item)
    return flat
