"""
WISE (`PKU-YuanGroup/WISE`): knowledge-informed text-to-image prompts.

Input: `final_data.json` (as shipped in ByteDance-Seed/Bagel `eval/gen/wise/`), a JSON list of objects with at least
`Prompt` and `prompt_id`. Output, as the original BAGEL script writes it and `eval/gen/wise/gpt_eval_mp.py` reads it
(`--image_dir OUT`):

    OUT/<prompt_id>.png
    OUT/<prompt_id>.txt     with --think: the plan
"""

from __future__ import annotations

from diffusers.utils import logging

from ._inputs import check_name, check_single_sample, entry_where, read_json_entries, require_field
from .runner import Benchmark, EvalItem, original_settings


logger = logging.get_logger(__name__)

__all__ = ["load_wise", "WISE"]


def load_wise(data, image_root=None, n_samples: int = 1) -> list[EvalItem]:
    """The entries of WISE's `final_data.json` (`prompt_id` names the output file: it must be a plain name)."""
    check_single_sample("wise", n_samples)
    entries, lines = read_json_entries(data, "WISE's final_data.json")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--data {str(data)!r}: expected a non-empty JSON list of WISE entries.")
    items = []
    for index, entry in enumerate(entries):
        where = entry_where(data, lines, index)
        prompt = require_field(entry, "Prompt", where)
        prompt_id = check_name(require_field(entry, "prompt_id", where, (int, str)), "prompt_id", where)
        items.append(EvalItem(index=index, prompt=prompt, outputs=[f"{prompt_id}.png"], source=where))
    return items


WISE = Benchmark(
    name="wise",
    load=load_wise,
    task="text_to_image",
    # eval/gen/gen_images_mp_wise.py: 50 timesteps, shift 3, text CFG 4 on t in (0.4, 1], global renorm, min 0, 1024.
    pipeline_kwargs=original_settings("global", cfg_interval=(0.4, 1.0)),
    think=True,
    n_samples=1,
    resolution=1024,
    data_help="WISE's final_data.json (ByteDance-Seed/Bagel eval/gen/wise/final_data.json)",
    source="ByteDance-Seed/Bagel eval/gen/gen_images_mp_wise.py, scripts/eval/run_wise.sh (--think)",
)
