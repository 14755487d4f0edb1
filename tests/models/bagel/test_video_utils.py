"""Videos as BAGEL sees them: sampled frames, one ViT image block each, through the chat template, the model and the
pipeline; the original's frame sampler; refusals of bad videos."""

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import load_pipeline
from transformers_bagel.chat import generate_answer, understanding_messages
from transformers_bagel.video_utils import DEFAULT_NUM_FRAMES, load_video_frames, sample_frame_indices


def _frames(count, size=(48, 32), seed=0):
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)]


def _chat(processor, content, **kwargs):
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


def _same_inputs(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- (c) the frame sampler ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "num_frames", "expected"),
    [
        # bounds floor(i * total / n); middle of [a, b - 1] is (a + b - 1) // 2
        (10, 4, [0, 3, 5, 8]),  # bounds 0 2 5 7 10
        (8, 4, [0, 2, 4, 6]),  # bounds 0 2 4 6 8
        (7, 3, [0, 2, 5]),  # bounds 0 2 4 7
        (16, 1, [7]),  # one interval [0, 15]
        (100, 8, [5, 18, 30, 43, 55, 68, 80, 93]),  # bounds 0 12 25 37 50 62 75 87 100
        (5, 5, [0, 1, 2, 3, 4]),  # as many frames as asked: all
        (3, 8, [0, 1, 2]),  # fewer frames than asked: all (not padded)
        # the original's float bounds: 11 * 30 / 22 = 15 is computed as 14.999..., truncated to 14 (intervals 10 and
        # 11 are [12, 13] and [14, 15], middles 12 and 14; exact bounds would give 13 and 15)
        (30, 22, [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, 16, 17, 19, 20, 21, 23, 24, 25, 27, 28]),
    ],
)
def test_sample_frame_indices_takes_the_middle_of_equal_intervals(total, num_frames, expected):
    assert sample_frame_indices(total, num_frames) == expected


def test_sample_frame_indices_default_count_and_rate():
    assert sample_frame_indices(80) == sample_frame_indices(80, DEFAULT_NUM_FRAMES) == [4, 14, 24, 34, 44, 54, 64, 74]
    # 1 frame per second of a 30 fps, 3 s video: the middle of each second.
    assert sample_frame_indices(90, fps=1, video_fps=30) == [15, 45, 75]
    # 2 per second at 25 fps: 0.25 s, 0.75 s, 1.25 s, ... -> 6.25, 18.75, 31.25 rounded; num_frames keeps the first.
    assert sample_frame_indices(100, num_frames=3, fps=2, video_fps=25) == [6, 19, 31]
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(10, fps=1)


# -- (a) a video is exactly its frames as images -----------------------------------------------------------------------


def test_video_part_equals_its_frames_as_image_parts_and_gives_the_same_logits(pipe):
    processor, model = pipe.processor, pipe.model
    frames = _frames(4)
    question = {"type": "text", "text": "what happens?"}
    video = _chat(processor, [{"type": "video", "video": frames}, question])
    images = _chat(processor, [*({"type": "image", "image": f} for f in frames), question])
    _same_inputs(video, images)
    assert video["image_grid_hw"].shape[0] == 4
    slot = "<|vision_start|><|image_pad|><|vision_end|>"
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "video", "video": frames}]}])
    assert text == slot * 4
    # num_frames from the part, and from the call, sample the same frames; a bare part renders slots.
    eight = _frames(8, seed=1)
    by_part = _chat(processor, [{"type": "video", "video": eight, "num_frames": 4}, question])
    by_call = _chat(processor, [{"type": "video", "video": eight}, question], num_frames=4)
    picked = _chat(processor, [*({"type": "image", "image": eight[i]} for i in (0, 2, 4, 6)), question])
    _same_inputs(by_part, picked)
    _same_inputs(by_call, picked)
    bare = processor.apply_chat_template([{"role": "user", "content": [{"type": "video", "num_frames": 3}]}])
    assert bare == slot * 3
    with torch.no_grad():
        a = model(**{**video, "pixel_values": video["pixel_values"].to(model.dtype)}).logits
        b = model(**{**images, "pixel_values": images["pixel_values"].to(model.dtype)}).logits
    assert torch.equal(a, b)


def test_understanding_messages_carry_a_video(pipe):
    frames = _frames(4)
    messages = understanding_messages("what happens?", video=frames, num_frames=2)
    assert messages[0]["content"][0] == {"type": "video", "video": frames, "num_frames": 2}
    inputs = _chat(pipe.processor, messages[0]["content"])
    assert inputs["image_grid_hw"].shape[0] == 2
    with pytest.raises(ValueError, match="pass `video`"):
        understanding_messages("what?", num_frames=2)


def test_processor_refuses_videos_argument_pointing_to_the_chat_route(pipe):
    with pytest.raises(ValueError, match="apply_chat_template"):
        pipe.processor(text="hi", videos=[_frames(2)])


# -- (b) an mp4 file ---------------------------------------------------------------------------------------------------


def _write_mp4(path, frames, rate=10):
    av = pytest.importorskip("av")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_mp4_is_decoded_sampled_and_answered_like_its_frames(pipe, tmp_path):
    pytest.importorskip("av")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255), (90, 90, 90),
               (200, 120, 30), (10, 10, 10), (250, 250, 250)]  # fmt: skip
    path = tmp_path / "clip.mp4"
    _write_mp4(path, [PIL.Image.new("RGB", (48, 32), c) for c in colours])
    frames = load_video_frames(path, num_frames=4)
    assert len(frames) == 4 and all(f.size == (48, 32) and f.mode == "RGB" for f in frames)
    # Frames 0, 3, 5, 8 of 10: lossy, so compare the mean colour.
    for frame, index in zip(frames, (0, 3, 5, 8)):
        assert np.abs(np.asarray(frame, dtype=float).mean((0, 1)) - colours[index]).max() < 30
    assert len(load_video_frames(path, fps=2)) == 2  # 1 s at 10 fps: frames 2 and 7 (rounded half to even: 2, 8)
    model, processor = pipe.model, pipe.processor
    from_video = generate_answer(model, processor, understanding_messages("what?", video=path, num_frames=4), 3)
    from_frames = generate_answer(model, processor, understanding_messages("what?", images=frames), 3)
    assert from_video == from_frames


# -- (d) bad videos ----------------------------------------------------------------------------------------------------


def test_bad_videos_are_refused_naming_the_file_or_argument(pipe, tmp_path):
    pytest.importorskip("av")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="broken.mp4"):
        load_video_frames(broken)
    with pytest.raises(ValueError, match="missing.mp4"):
        load_video_frames(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="no frames"):
        load_video_frames([])
    with pytest.raises(ValueError, match="num_frames"):
        load_video_frames(_frames(3), num_frames=0)
    empty = tmp_path / "frames"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="frames.*no image files"):
        load_video_frames(empty)
    with pytest.raises(ValueError, match="Part 0 of the message 0 .*broken.mp4"):
        _chat(pipe.processor, [{"type": "video", "video": broken}])
    with pytest.raises(ValueError, match="num_frames"):
        _chat(pipe.processor, [{"type": "video", "video": _frames(3), "num_frames": 0}])


def test_frames_folder_is_read_in_name_order(tmp_path):
    frames = _frames(12, seed=3)
    for i, frame in enumerate(frames):
        frame.save(tmp_path / f"frame_{i}.png")
    loaded = load_video_frames(tmp_path, num_frames=3)  # frame_10 after frame_9: indices 1, 5, 9
    for frame, index in zip(loaded, (1, 5, 9)):
        assert np.array_equal(np.asarray(frame), np.asarray(frames[index]))


def test_video_arrays_and_batched_conversations(pipe):
    frames = _frames(5, seed=4)
    array = np.stack([np.asarray(f) for f in frames])  # (T, H, W, C)
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)  # (T, C, H, W)
    for video in (array, tensor):
        loaded = load_video_frames(video, num_frames=2)  # bounds 0 2 5: middles (0 + 1) // 2, (2 + 4) // 2
        assert [np.asarray(f).tolist() for f in loaded] == [array[0].tolist(), array[3].tolist()]
    with pytest.raises(ValueError, match="4 dimensions"):
        load_video_frames(array[0])
    question = {"type": "text", "text": "what?"}
    conversations = [[{"role": "user", "content": [{"type": "video", "video": frames[:2]}, question]}],
                     [{"role": "user", "content": [{"type": "image", "image": frames[0]}, question]}]]  # fmt: skip
    before = [[dict(m) for m in c] for c in conversations]
    out = pipe.processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt")
    assert out["image_grid_hw"].shape[0] == 3
    assert conversations == before  # the caller's messages are not changed


def test_too_many_frames_for_the_position_table_are_refused(pipe, monkeypatch):
    model = pipe.model
    inputs = _chat(pipe.processor, [{"type": "video", "video": _frames(6)}, {"type": "text", "text": "what?"}])
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", 8)  # 6 frames + 3 text tokens + bos
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(**{**inputs, "pixel_values": inputs["pixel_values"].to(model.dtype)}, max_new_tokens=2)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        pipe([{"video": _frames(6)}, "make a poster of this"], height=32, width=32, num_inference_steps=2)


# -- (e) the pipeline --------------------------------------------------------------------------------------------------


def test_pipeline_takes_a_video_item_as_vit_context(pipe):
    frames = _frames(6, seed=2)
    contexts = pipe.build_contexts(pipe.normalize_prompts([{"video": frames, "num_frames": 3}, "a poster"], None)[0],
                                   think=False)  # fmt: skip
    kinds = [kind for kind, _ in contexts.full.segments]
    assert kinds == ["vit", "vit", "vit", "text"]
    assert [kind for kind, _ in contexts.no_text.segments] == ["vit", "vit", "vit"]
    assert [kind for kind, _ in contexts.no_image.segments] == ["text"]
    assert contexts.image_size is None and contexts.has_images
    out = pipe([{"video": frames, "num_frames": 3}, "make a poster of this"], height=32, width=32,
               num_inference_steps=2, output_type="pt", generator=torch.manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 3, 32, 32) and bool(torch.isfinite(out.images).all())
    with pytest.raises(ValueError, match="no 'video'"):
        pipe([{"frames": frames}, "a poster"], num_inference_steps=2)
    with pytest.raises(ValueError, match="video item of `prompt`.*num_frames"):
        pipe([{"video": frames, "num_frames": 0}, "a poster"], num_inference_steps=2)


def test_video_file_without_pyav_names_the_extra(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    with pytest.raises(ImportError, match=r'pip install "bagel-hf\[video\]"'):
        load_video_frames(path)


def test_training_rows_with_a_video_column_become_frame_blocks(tmp_path):
    from transformers_bagel.training import row_to_sample

    frames = _frames(6)
    folder = tmp_path / "clip"
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"frame_{i}.png")
    sample = row_to_sample({"video": "clip", "question": "what?", "answer": "a clip"}, "understanding", 3,
                           image_dir=tmp_path, num_frames=3)  # fmt: skip
    kinds = [segment["type"] for segment in sample["segments"]]
    assert kinds == ["vit_image"] * 3 + ["text", "text"]
    expected = [frames[i] for i in sample_frame_indices(6, 3)]
    for segment, frame in zip(sample["segments"], expected):
        assert np.array_equal(np.asarray(segment["image"]), np.asarray(frame))
    with pytest.raises(ValueError, match="column 'video', row 4"):
        row_to_sample({"video": "missing", "question": "q", "answer": "a"}, "understanding", 4, image_dir=tmp_path)


# -- (f) video parts refuse what they would ignore (issue 23) -----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"num_frame": 4}, r"Part 0 of the message 0 \(type 'video'\) has unknown key\(s\) \['num_frame'\]; a video part "
                           r"takes \['type', 'video', 'path', 'num_frames', 'fps'\]"),
        ({"url": "https://example.com/a.mp4"}, r"unknown key\(s\) \['url'\] \(a URL is not downloaded"),
        ({"max_frames": 2, "sample_fps": 1}, r"unknown key\(s\) \['max_frames', 'sample_fps'\]"),
    ],
)  # fmt: skip
def test_unknown_keys_of_a_video_part_are_refused_naming_them(processor, extra, message):
    with pytest.raises(ValueError, match=message):
        _chat(processor, [{"type": "video", "video": _frames(3), **extra}, {"type": "text", "text": "what?"}])
    with pytest.raises(ValueError, match=message):  # rendering the text only checks them too
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video", "num_frames": 2, **extra}]}])


def test_frames_sampled_beforehand_are_kept_with_their_count(processor, caplog):
    """`bagel chat --video clip --num_frames 12` samples 12 frames and hands them over: with `num_frames` equal to
    their count (what the CLI must pass), the processor keeps all 12, exactly as 12 image parts; without it they are
    sampled down to the default 8, with a warning that says how to keep them."""
    import logging

    twelve = _frames(12, seed=5)
    question = {"type": "text", "text": "what?"}
    kept = _chat(processor, understanding_messages("what?", video=twelve, num_frames=len(twelve))[0]["content"])
    as_images = _chat(processor, [*({"type": "image", "image": f} for f in twelve), question])
    _same_inputs(kept, as_images)
    with caplog.at_level(logging.WARNING):
        default = _chat(processor, understanding_messages("what?", video=twelve)[0]["content"])
    assert default["image_grid_hw"].shape[0] == DEFAULT_NUM_FRAMES
    assert "12 frames in memory are sampled down to 8" in caplog.text and "num_frames" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _chat(processor, [{"type": "video", "video": _frames(4)}, question])  # nothing dropped: no warning
    assert "sampled down" not in caplog.text


def test_num_frames_of_the_part_and_of_the_call_must_agree(processor):
    part = {"type": "video", "video": _frames(8), "num_frames": 4}
    question = {"type": "text", "text": "what?"}
    with pytest.raises(ValueError, match=r"sets `num_frames`=4 but apply_chat_template was called with num_frames=2"):
        _chat(processor, [part, question], num_frames=2)
    agreed = _chat(processor, [part, question], num_frames=4)
    assert agreed["image_grid_hw"].shape[0] == 4
    with pytest.raises(ValueError, match=r"sets `fps`=1 but apply_chat_template was called with fps=2"):
        _chat(processor, [{"type": "video", "video": _frames(8), "fps": 1}, question], fps=2)
