"""
Image editing with BAGEL: an input picture and an instruction, the original app's edit preset (image guidance 2.0,
text-channel renormalisation), the result written as PNG and its path printed.

    python examples/edit.py [--checkpoint CONVERTED_DIR] [--image in.png] [--prompt "..."] [--steps 50]

Without --image a small drawn scene is edited (and saved as edit_input.png beside the result).
"""

import torch
from _shared import base_parser, checkpoint_from, load_image, load_pipeline



def main():
    parser = base_parser(__doc__)
    parser.add_argument("--image", default=None, help="Image to edit (default: a drawn scene).")
    parser.add_argument("--prompt", default="Make it a snowy winter night.")
    parser.add_argument("--cfg_img_scale", type=float, default=2.0, help="How closely the input image is kept.")
    args = parser.parse_args()

    pipe = load_pipeline(checkpoint_from(args))
    source = load_image(args.image)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    source_path = args.output_dir / "edit_input.png"
    source.save(source_path)
    edited = pipe(
        args.prompt,
        image=source,
        num_inference_steps=args.steps,
        cfg_img_scale=args.cfg_img_scale,
        generator=torch.Generator().manual_seed(args.seed),
    ).images[0]
    path = args.output_dir / "edit.png"
    edited.save(path)
    print(f"input ({source.width}x{source.height}): {source_path}")
    print(f"edit ({edited.width}x{edited.height}): {path}")


if __name__ == "__main__":
    main()
