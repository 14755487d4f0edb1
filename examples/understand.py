"""
Image understanding with BAGEL: a question about a picture, the answer streamed token by token, then a follow-up
question in the same conversation.

    python examples/understand.py [--checkpoint CONVERTED_DIR] [--image photo.jpg] [--question "..."]

Without --image a small drawn scene is used. The tiny default model has random weights: its answers are gibberish.
"""

from _shared import base_parser, checkpoint_from, load_image, load_pipeline
from transformers import TextStreamer

from transformers_bagel.chat import generate_answer, understanding_messages


def main():
    parser = base_parser(__doc__)
    parser.add_argument("--image", default=None, help="Image to ask about (default: a drawn scene).")
    parser.add_argument("--question", default="What is in this image?")
    parser.add_argument("--follow_up", default="What colour is the roof?")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Longest answer, in tokens.")
    args = parser.parse_args()

    pipe = load_pipeline(checkpoint_from(args))
    image = load_image(args.image)
    streamer = TextStreamer(pipe.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    history = []
    for question in (args.question, args.follow_up):
        print(f"Q: {question}\nA: ", end="", flush=True)
        reply = generate_answer(
            pipe.model, pipe.processor, understanding_messages(question, [image], history), args.max_new_tokens,
            streamer=streamer,
        )
        history.append((question, reply))
    print(f"answers: {[reply for _, reply in history]!r}")


if __name__ == "__main__":
    main()
