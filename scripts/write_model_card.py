"""Writes the repository's `model_card.md`: the Hub model card that `bagel convert` writes (as `README.md`) for the
converted BAGEL-7B-MoT release, from the template shipped in `diffusers_bagel` and BagelConfig's defaults (the 7B).

    python scripts/write_model_card.py            # rewrite model_card.md
    python scripts/write_model_card.py --check    # exit 1 if model_card.md is not what the template gives
"""

import argparse
import sys
from pathlib import Path

from diffusers_bagel.convert_bagel_to_diffusers import model_card_text
from transformers_bagel import BagelConfig


ROOT = Path(__file__).resolve().parent.parent
CARD = ROOT / "model_card.md"
MODEL_ID = "bagel-7b-hf"  # the folder name the README's `bagel convert` command writes


def rendered_card() -> str:
    """The card of the converted 7B release, as `bagel convert --output_dir bagel-7b-hf` writes it."""
    return model_card_text(MODEL_ID, BagelConfig())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that model_card.md is up to date")
    args = parser.parse_args(argv)
    card = rendered_card()
    if args.check:
        if CARD.read_text(encoding="utf-8") != card:
            sys.stderr.write(f"{CARD} is out of date: run `python scripts/write_model_card.py`.\n")
            return 1
        return 0
    CARD.write_text(card, encoding="utf-8")
    sys.stdout.write(f"wrote {CARD}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
