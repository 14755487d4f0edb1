"""
Gradio app for BAGEL with the original demo's three tabs: text to image, image editing and image understanding, each
with a thinking toggle and every sampling parameter.

    python examples/app.py [--checkpoint CONVERTED_DIR | random-tiny] [--host 127.0.0.1] [--port 7860]

Without --checkpoint it serves the shipped digits BAGEL (checkpoints/tiny-bagel-digits), with digit example prompts;
`--checkpoint random-tiny` serves the random-weight test model (its pictures are noise, its answers gibberish; every
control works). The page says which model is loaded. Needs `pip install -e ".[app]"` (gradio).
"""

import argparse
import inspect
import logging
import os
import re
import threading

import torch


os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine

import gradio as gr  # noqa: E402
from quickstart import resolve_checkpoint  # noqa: E402
from transformers import TextIteratorStreamer  # noqa: E402

from _shared import DTYPES, load_pipeline  # noqa: E402
from transformers_bagel.chat import DEFAULT_MAX_NEW_TOKENS, generate_answer, understanding_messages  # noqa: E402
from diffusers_bagel import BagelPipeline  # noqa: E402
from diffusers_bagel.defaults import CFG_RENORM_TYPES, DEFAULT_MAX_THINK_TOKENS, EDIT_PRESET  # noqa: E402
from diffusers_bagel.defaults import TEXT_TO_IMAGE_PRESET  # noqa: E402


__all__ = ["build_demo", "describe_model", "main", "pick_examples", "public_error"]

logger = logging.getLogger("bagel.app")

# The pipeline's own defaults, the sliders' initial values (the presets above where generating and editing differ).
PIPELINE_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(BagelPipeline.__call__).parameters.items()
}

# System fonts only: the default theme would ask the browser to fetch web fonts.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "Consolas", "monospace"]
)


def _generator(seed: float):
    """Seed -1 draws a fresh random seed; 0 or more is reproducible, as `bagel generate --seed` and the pipeline's
    `generator=torch.Generator().manual_seed(seed)`."""
    seed = int(seed)
    return torch.Generator().manual_seed(seed) if seed >= 0 else None


def _named_parameters(function, names: list[str]):
    """`function(*values)` with a signature naming each value, so that the app's API (gradio_client, the "Use via
    API" page) shows `cfg_text_scale`, `seed`, ... instead of `param_2`, `param_3`, ..."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    function.__signature__ = inspect.Signature([inspect.Parameter(name, kind) for name in names])
    return function


# Example inputs of each tab: the first set whose words the loaded tokenizer knows (the digits BAGEL's word-level
# tokenizer knows only its own few words; a BPE tokenizer knows everything, so the general set is shown).
EXAMPLES = (
    {"t2i": "A red cat sitting on a wooden table.", "edit": "Make it a snowy winter night.",
     "understand": "What is in this image?"},
    {"t2i": "a handwritten digit seven", "edit": "change the digit to three", "understand": "Which digit is this?"},
)  # fmt: skip


def pick_examples(processor) -> dict:
    """The first set of `EXAMPLES` with no word outside `processor`'s tokenizer vocabulary."""
    tokenizer = processor.tokenizer
    for examples in EXAMPLES:
        ids = [i for text in examples.values() for i in tokenizer.encode(text, add_special_tokens=False)]
        if tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids:
            return examples
    return EXAMPLES[0]


def describe_model(pipe, name: str) -> str:
    """One line naming the loaded model: its folder name, size, largest image and device."""
    config = pipe.model.config
    parameters = sum(p.numel() for p in pipe.model.parameters())
    size = f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.1f}M"
    return (
        f"Model: **{name}** ({size} parameters, {config.text_config.num_hidden_layers} decoder layers, images up to "
        f"{config.max_image_size} px, {pipe.model.dtype} on {pipe.model.device.type})"
    )


def public_error(error: Exception) -> gr.Error:
    """The page's error for `error`: the message of a refused input (without server paths); anything else is logged
    on the server and shown as a generic failure."""
    if isinstance(error, (ValueError, TypeError)):
        message = re.sub(r"(?<![\w.:/])/(?:[^/\s'\"]+/)+([^/\s'\"]*)", r"\1", str(error))
        return gr.Error(message)
    logger.error("generation failed", exc_info=error)
    return gr.Error(f"The model failed ({type(error).__name__}); the server log has the details.")


def _run_pipeline(pipe, **kwargs):
    try:
        output = pipe(**kwargs)
    except Exception as error:
        raise public_error(error) from error
    thinking = output.text[0] if output.text else ""
    return output.images[0], thinking


def _sampling_controls(pipe, preset: dict, num_inference_steps: int, prefix: str) -> dict:
    """The sampling parameters of one tab, in an accordion; returns the components by parameter name."""
    controls = {}
    with gr.Accordion("Inference hyperparameters", open=False):
        with gr.Row():
            controls["seed"] = gr.Slider(
                -1, 1_000_000, value=-1, step=1, label="Seed",
                info="-1 for a random seed; 0 or more reproduces an image (as bagel generate --seed)",
                elem_id=f"{prefix}-seed",
            )  # fmt: skip
            controls["num_inference_steps"] = gr.Slider(
                1, 100, value=num_inference_steps, step=1, label="Steps", info="Euler steps (original timesteps - 1)",
                elem_id=f"{prefix}-steps",
            )  # fmt: skip
            controls["timestep_shift"] = gr.Slider(
                1.0, 10.0, value=PIPELINE_DEFAULTS["timestep_shift"], step=0.5, label="Timestep shift", info="Higher for layout, lower for details"
            )
        with gr.Row():
            controls["cfg_text_scale"] = gr.Slider(
                1.0, 8.0, value=preset["cfg_text_scale"], step=0.1, label="CFG text scale",
                info="How strongly the image follows the text (1 disables text guidance)",
            )  # fmt: skip
            controls["cfg_img_scale"] = gr.Slider(
                1.0, 4.0, value=preset["cfg_img_scale"], step=0.1, label="CFG image scale",
                info="How much of the input images is kept (1 disables image guidance)",
            )  # fmt: skip
            controls["cfg_interval_start"] = gr.Slider(
                0.0, 1.0, value=preset["cfg_interval"][0], step=0.1, label="CFG interval start",
                info="Guidance runs for flow times in (start, 1]",
            )  # fmt: skip
        with gr.Row():
            controls["cfg_renorm_type"] = gr.Dropdown(
                list(CFG_RENORM_TYPES), value=preset["cfg_renorm_type"], label="CFG renorm type",
                info="global for text-to-image, text_channel for editing",
            )  # fmt: skip
            controls["cfg_renorm_min"] = gr.Slider(
                0.0, 1.0, value=PIPELINE_DEFAULTS["cfg_renorm_min"], step=0.1, label="CFG renorm min", info="1.0 disables the renormalisation"
            )
        if prefix == "t2i":
            step, largest = pipe.latent_downsample, pipe.model.config.max_image_size
            with gr.Row():
                controls["height"] = gr.Slider(
                    step, largest, value=pipe.default_sample_size, step=step, label="Height", elem_id="t2i-height"
                )
                controls["width"] = gr.Slider(
                    step, largest, value=pipe.default_sample_size, step=step, label="Width", elem_id="t2i-width"
                )
        with gr.Group(visible=False) as thinking_group:
            with gr.Row():
                controls["think_do_sample"] = gr.Checkbox(label="Sample the thinking", value=False)
                controls["max_think_tokens"] = gr.Slider(
                    1, 4096, value=DEFAULT_MAX_THINK_TOKENS, step=1, label="Max thinking tokens",
                    elem_id=f"{prefix}-max-think",
                )
                controls["think_temperature"] = gr.Slider(
                    0.1, 1.0, value=PIPELINE_DEFAULTS["think_temperature"], step=0.1, label="Thinking temperature"
                )
    controls["_thinking_group"] = thinking_group
    return controls


def build_demo(pipe, num_inference_steps: int | None = None, model_name: str = "BAGEL") -> gr.Blocks:
    """The three-tab Blocks app around a loaded [`BagelPipeline`] (`model_name` is shown on the page;
    `num_inference_steps` is the initial value of the Steps sliders, the pipeline's default when unset)."""
    num_inference_steps = num_inference_steps or PIPELINE_DEFAULTS["num_inference_steps"]
    examples = pick_examples(pipe.processor)

    def text_to_image(prompt, think, *values):
        params = dict(zip(t2i_names, values))
        start = params.pop("cfg_interval_start")
        seed = params.pop("seed")
        return _run_pipeline(
            pipe, prompt=prompt, think=think, cfg_interval=(start, 1.0), generator=_generator(seed),
            **{k: int(v) if k in ("num_inference_steps", "height", "width", "max_think_tokens") else v
               for k, v in params.items()},
        )  # fmt: skip

    def edit(image, prompt, think, *values):
        if image is None:
            raise gr.Error("Upload an image to edit.")
        params = dict(zip(edit_names, values))
        start = params.pop("cfg_interval_start")
        seed = params.pop("seed")
        return _run_pipeline(
            pipe, prompt=prompt, image=image, think=think, cfg_interval=(start, 1.0), generator=_generator(seed),
            **{k: int(v) if k in ("num_inference_steps", "max_think_tokens") else v for k, v in params.items()},
        )  # fmt: skip

    def understand(image, question, think, do_sample, temperature, max_new_tokens):
        if image is None:
            raise gr.Error("Upload an image to ask about.")
        try:
            messages = understanding_messages(question, [image], think=think)
        except ValueError as error:
            raise public_error(error) from error
        streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure = []

        def work():
            try:
                generate_answer(
                    pipe.model, pipe.processor, messages, int(max_new_tokens), do_sample, temperature, streamer
                )
            except Exception as error:  # reported to the page below; the streamer must still be closed
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text
        thread.join()
        if failure:
            raise public_error(failure[0])
        yield text

    with gr.Blocks(title="BAGEL") as demo:
        gr.Markdown(
            "# BAGEL\nText to image, image editing and image understanding with one model "
            "([paper](https://arxiv.org/abs/2505.14683)).\n\n" + describe_model(pipe, model_name),
            elem_id="model-line",
        )
        with gr.Tab("Text to Image", id="t2i"):
            t2i_prompt = gr.Textbox(label="Prompt", value=examples["t2i"], elem_id="t2i-prompt")
            t2i_think = gr.Checkbox(label="Thinking", value=False, elem_id="t2i-think")
            t2i = _sampling_controls(pipe, TEXT_TO_IMAGE_PRESET, num_inference_steps, "t2i")
            t2i_thinking = gr.Textbox(label="Thinking process", visible=False, elem_id="t2i-thinking")
            t2i_image = gr.Image(
                label="Generated image", type="pil", format="png", interactive=False, elem_id="t2i-image"
            )
            t2i_button = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
        with gr.Tab("Image Edit", id="edit"):
            with gr.Row():
                with gr.Column():
                    edit_input = gr.Image(label="Input image", type="pil", elem_id="edit-input")
                    edit_prompt = gr.Textbox(label="Prompt", value=examples["edit"], elem_id="edit-prompt")
                with gr.Column():
                    edit_image = gr.Image(
                        label="Result", type="pil", format="png", interactive=False, elem_id="edit-image"
                    )
                    edit_thinking = gr.Textbox(label="Thinking process", visible=False, elem_id="edit-thinking")
            edit_think = gr.Checkbox(label="Thinking", value=False, elem_id="edit-think")
            edit_controls = _sampling_controls(pipe, EDIT_PRESET, num_inference_steps, "edit")
            edit_button = gr.Button("Submit", variant="primary", elem_id="edit-submit")
        with gr.Tab("Image Understanding", id="understand"):
            with gr.Row():
                with gr.Column():
                    und_input = gr.Image(label="Input image", type="pil", elem_id="und-input")
                    und_question = gr.Textbox(label="Prompt", value=examples["understand"], elem_id="und-question")
                with gr.Column():
                    und_answer = gr.Textbox(label="Result", lines=12, elem_id="und-answer")
            und_think = gr.Checkbox(label="Thinking", value=False, elem_id="und-think")
            with gr.Accordion("Inference hyperparameters", open=False):
                with gr.Row():
                    und_do_sample = gr.Checkbox(label="Sampling", value=False)
                    und_temperature = gr.Slider(
                        0.05, 1.0, value=inspect.signature(generate_answer).parameters["temperature"].default,
                        step=0.05, label="Temperature",
                    )  # fmt: skip
                    und_max_new_tokens = gr.Slider(
                        1, 4096, value=DEFAULT_MAX_NEW_TOKENS, step=1, label="Max new tokens"
                    )
            und_button = gr.Button("Submit", variant="primary", elem_id="und-submit")

        t2i_names = [name for name in t2i if not name.startswith("_")]
        edit_names = [name for name in edit_controls if not name.startswith("_")]
        _named_parameters(text_to_image, ["prompt", "think", *t2i_names])
        _named_parameters(edit, ["image", "prompt", "think", *edit_names])
        for toggle, thinking_box, controls in ((t2i_think, t2i_thinking, t2i), (edit_think, edit_thinking, edit_controls)):
            toggle.change(
                lambda show: (gr.update(visible=show), gr.update(visible=show)),
                inputs=toggle, outputs=[thinking_box, controls["_thinking_group"]],
            )  # fmt: skip
        gr.on(
            [t2i_button.click, t2i_prompt.submit], text_to_image,
            inputs=[t2i_prompt, t2i_think, *(t2i[name] for name in t2i_names)], outputs=[t2i_image, t2i_thinking],
        )  # fmt: skip
        gr.on(
            [edit_button.click, edit_prompt.submit], edit,
            inputs=[edit_input, edit_prompt, edit_think, *(edit_controls[name] for name in edit_names)],
            outputs=[edit_image, edit_thinking],
        )  # fmt: skip
        gr.on(
            [und_button.click, und_question.submit], understand,
            inputs=[und_input, und_question, und_think, und_do_sample, und_temperature, und_max_new_tokens],
            outputs=und_answer,
        )  # fmt: skip
    return demo


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", default=None,
        help="Converted BAGEL folder, or `random-tiny` for the random-weight test model (default: the shipped digits "
             "BAGEL: try 'a handwritten digit seven', 'change the digit to three', 'Which digit is this?').",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="Address to serve on (0.0.0.0 to share on a network).")
    parser.add_argument("--port", type=int, default=7860, help="Port to serve on.")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available).")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                        help="auto: bfloat16 on CUDA, float32 on the CPU.")  # fmt: skip
    parser.add_argument(
        "--num_inference_steps", type=int, default=PIPELINE_DEFAULTS["num_inference_steps"],
        help="Initial value of the Steps sliders (1 to 100).",
    )  # fmt: skip
    args = parser.parse_args()
    if not 1 <= args.num_inference_steps <= 100:  # the sliders' range
        parser.error(f"--num_inference_steps must be in 1..100, got {args.num_inference_steps}")

    checkpoint = resolve_checkpoint(args.checkpoint, parser)
    pipe = load_pipeline(checkpoint, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    demo = build_demo(pipe, args.num_inference_steps, model_name=checkpoint.name)
    print(f"serving {checkpoint} on http://{args.host}:{args.port}", flush=True)
    # show_error=False: refused inputs reach the page as gr.Error; other exceptions (tracebacks, server paths) do not.
    demo.queue().launch(server_name=args.host, server_port=args.port, theme=THEME, ssr_mode=False, show_error=False)


if __name__ == "__main__":
    main()
