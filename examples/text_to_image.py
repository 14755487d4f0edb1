"""
Text-to-image with BAGEL: one prompt, the original app's text-to-image preset, a PNG written and its path printed.

    python examples/text_to_image.py [--checkpoint CONVERTED_DIR] [--prompt "..."] [--steps 50]

Without --checkpoint the tiny random-weight test model is used: its pictures are noise, the path is the real one.
"""

import torch
from _shared import base_parser, checkpoint_from, load_pipeline



def main():
    parser = base_parser(__doc__)
    parser.add_argument("--prompt", default="A lighthouse on a cliff at sunset, oil painting.")
    parser.add_argument("--height", type=int, default=None, help="Multiple of 16 (default: the model's default).")
    parser.add_argument("--width", type=int, default=None, help="Multiple of 16 (default: the model's default).")
    parser.add_argument("--cfg_text_scale", type=float, default=4.0, help="Text guidance scale.")
    parser.add_argument("--timestep_shift", type=float, default=3.0, help="Schedule shift.")
    args = parser.parse_args()

    pipe = load_pipeline(checkpoint_from(args))
    image = pipe(
        args.prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        cfg_text_scale=args.cfg_text_scale,
        timestep_shift=args.timestep_shift,
        generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "text_to_image.png"
    image.save(path)
    print(f"text-to-image ({image.width}x{image.height}): {path}")


if __name__ == "__main__":
    main()
