"""Memory and FLOPs planning: will a job fit its GPUs, and what is the smallest layout that does.

Pure Python (importing it does not import torch). See ``docs/scale-out.md`` for the formulas.

* :func:`estimate` / :func:`make_plan` -- a :class:`Plan` (per-GPU :class:`MemoryBreakdown`, FLOPs, the
  smallest fitting layout) for a :class:`PlanInput`;
* :func:`check_fits` -- the trainers' start-up check (refuses on a GPU unless ``--skip-memory-check``);
* :func:`add_plan_parser` -- the ``qrm plan`` subcommand.
"""

from megatron_qrm.planning.check import (
    PlanDoesNotFit,
    add_memory_check_args,
    add_recompute_args,
    check_fits,
)
from megatron_qrm.planning.cli import add_plan_parser
from megatron_qrm.planning.memory import (
    GPUS,
    MemoryBreakdown,
    Plan,
    PlanInput,
    estimate,
    format_plan,
    make_plan,
)
from megatron_qrm.planning.params import stage_parameters, total_parameters

__all__ = [
    "GPUS", "MemoryBreakdown", "Plan", "PlanDoesNotFit", "PlanInput", "add_memory_check_args", "add_plan_parser",
    "add_recompute_args", "check_fits", "estimate", "format_plan", "make_plan", "stage_parameters",
    "total_parameters",
]
