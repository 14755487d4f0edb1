"""
Quick start on the built-in tiny BAGEL: convert it, generate an image, edit it, and answer a question about it.

    python examples/quickstart.py [--checkpoint CONVERTED_DIR] [--output_dir outputs/quickstart]

Without --checkpoint, the tiny random-weight BAGEL shipped with the tests (original release layout) is converted once
into outputs/tiny-bagel and used. Its pictures are noise (random weights); the point is the whole path running.
"""

import argparse
from pathlib import Path

import torch

from diffusers_bagel import BagelPipeline
from transformers_bagel.convert_bagel_to_hf import convert


ROOT = Path(__file__).resolve().parent.parent
TINY_ORIGINAL = ROOT / "tests" / "fixtures" / "tiny_bagel_original"
TINY_SIZES = {"vae_max_image_size": 128, "vae_min_image_size": 32, "vit_max_image_size": 112, "vit_min_image_size": 28}


def default_checkpoint(output_root: Path) -> Path:
    converted = output_root / "tiny-bagel"
    if not (converted / "model_index.json").is_file():
        convert(TINY_ORIGINAL, converted, image_sizes=TINY_SIZES)
    return converted


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=None, help="Converted BAGEL folder (default: tiny model).")
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "quickstart", help="Where PNGs go.")
    parser.add_argument("--prompt", default="A photo of a red cat sitting on a wooden table.")
    parser.add_argument("--edit_prompt", default="Make the cat blue.")
    parser.add_argument("--question", default="What is in this image?")
    parser.add_argument("--steps", type=int, default=20, help="Euler steps.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    checkpoint = args.checkpoint or default_checkpoint(ROOT / "outputs")
    pipe = BagelPipeline.from_pretrained(checkpoint)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    generated = pipe(args.prompt, num_inference_steps=args.steps, generator=torch.manual_seed(args.seed)).images[0]
    generated_path = args.output_dir / "generated.png"
    generated.save(generated_path)

    edited = pipe(
        args.edit_prompt, image=generated, num_inference_steps=args.steps, generator=torch.manual_seed(args.seed)
    ).images[0]
    edited_path = args.output_dir / "edited.png"
    edited.save(edited_path)

    messages = [{"role": "user", "content": [{"type": "image", "image": generated}, {"type": "text", "text": args.question}]}]
    inputs = pipe.processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    answer_ids = pipe.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = pipe.processor.batch_decode(answer_ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]

    print(f"checkpoint: {checkpoint}")
    print(f"text-to-image ({generated.width}x{generated.height}): {generated_path}")
    print(f"edit ({edited.width}x{edited.height}): {edited_path}")
    print(f"understanding: Q: {args.question!r} A: {answer!r}")


if __name__ == "__main__":
    main()
