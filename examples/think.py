"""
Thinking mode: BAGEL first writes a plan (or its reasoning) as text, then draws the image (or answers) from it.

    python examples/think.py [--checkpoint CONVERTED_DIR] [--prompt "..."] [--question "..."] [--steps 50]

Prints the plan, the image's path, then a reasoned answer to a question about that image.
"""

import torch
from _shared import base_parser, checkpoint_from, load_pipeline

from transformers_bagel.chat import generate_answer, understanding_messages


def main():
    parser = base_parser(__doc__)
    parser.add_argument("--prompt", default="A poster for a jazz night in a small bar.")
    parser.add_argument("--question", default="Which instrument is on the poster, and why would it be chosen?")
    parser.add_argument("--max_think_tokens", type=int, default=1000, help="Longest plan / reasoning, in tokens.")
    args = parser.parse_args()

    pipe = load_pipeline(checkpoint_from(args))
    output = pipe(
        args.prompt,
        think=True,
        max_think_tokens=args.max_think_tokens,
        num_inference_steps=args.steps,
        generator=torch.Generator().manual_seed(args.seed),
    )
    image = output.images[0]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / "think.png"
    image.save(path)
    print(f"plan: {output.text[0]!r}")
    print(f"thinking text-to-image ({image.width}x{image.height}): {path}")
    reasoning = generate_answer(
        pipe.model, pipe.processor, understanding_messages(args.question, [image], think=True), args.max_think_tokens
    )
    print(f"reasoned answer: {reasoning!r}")


if __name__ == "__main__":
    main()
