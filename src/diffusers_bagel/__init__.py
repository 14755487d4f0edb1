"""BAGEL for diffusers: `BagelPipeline` and BAGEL's flow-matching scheduler. Importing it imports
`transformers_bagel`, so the components named in a converted folder's `model_index.json` are resolvable."""

import transformers_bagel  # noqa: F401  (registers the model; diffusers looks components up by module path)

from .pipeline_bagel import BagelPipeline
from .pipeline_output import BagelPipelineOutput
from .scheduling_flow_match_euler import FlowMatchEulerScheduler


__all__ = ["BagelPipeline", "BagelPipelineOutput", "FlowMatchEulerScheduler"]
