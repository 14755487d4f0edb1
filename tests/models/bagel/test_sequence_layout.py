"""BagelSequence, the one builder of token sequences: the layout of the original's `inferencer.py` and
`data/dataset_base.py` (`PackedDataset.pack_sequence`), and the model's own derivation of positions from ids
(`bagel_token_layout`) agrees with it."""

import torch

from transformers_bagel import BagelConfig, BagelSequence, bagel_token_layout
from transformers_bagel.sequence_layout import IGNORE_INDEX


def test_layout_of_text_and_images_matches_the_models_derivation():
    config = BagelConfig()
    sequence = BagelSequence(config).add_text([11, 12], loss=True).add_image(3, latent=True).add_image(2, latent=False)
    sequence.add_text([13])
    start, end, bos, eos = (config.start_of_image_token_id, config.end_of_image_token_id, config.bos_token_id,
                            config.eos_token_id)  # fmt: skip
    latent, patch = config.latent_token_id, config.image_token_id
    assert sequence.input_ids == [bos, 11, 12, eos, start, latent, latent, latent, end, start, patch, patch, end, bos,
                                  13, eos]  # fmt: skip
    # text advances one per token; an image block shares one position and advances it by one (VAE at r, ViT at r + 1)
    assert sequence.position_ids == [0, 1, 2, 3, 4, 4, 4, 4, 4, 5, 5, 5, 5, 6, 7, 8]
    assert sequence.labels[:4] == [IGNORE_INDEX, 11, 12, eos] and set(sequence.labels[4:]) == {IGNORE_INDEX}
    layout = bagel_token_layout(torch.tensor([sequence.input_ids]), config)
    assert layout.position_ids[0].tolist() == sequence.position_ids
    assert int(layout.next_position[0]) == sequence.position == 9
    assert layout.gen_token_mask[0].tolist() == [token == latent for token in sequence.input_ids]


def test_noised_target_and_dropped_image_positions():
    """Training quirks (the original's `PackedDataset.pack_sequence` in `data/dataset_base.py`): a noised target does
    not advance the position; a dropped image does."""
    config = BagelConfig()
    sequence = BagelSequence(config).add_text([7]).add_image(2, latent=True, noised=True).skip_image().add_text([8])
    assert sequence.position_ids == [0, 1, 2, 3, 3, 3, 3, 4, 5, 6]


def test_processor_chat_inputs_are_the_builders_sequence(converted_dir):
    """The processor lays out a chat (an image, then a question) as the builder does for the same segments."""
    import PIL.Image

    from transformers_bagel import BagelProcessor

    processor = BagelProcessor.from_pretrained(converted_dir / "processor")
    config = BagelConfig.from_pretrained(converted_dir / "model")
    image = PIL.Image.new("RGB", (60, 40), (200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is it?"}]}]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    patches = int(inputs["image_grid_hw"].prod())
    text = processor.tokenizer.encode("what is it?", add_special_tokens=False)
    expected = BagelSequence(config).add_image(patches, latent=False).add_text(text)
    assert inputs["input_ids"][0].tolist() == expected.input_ids
