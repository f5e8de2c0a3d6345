"""Which process this is when a stage runs as several (`accelerate launch` with `num_processes` > 1).

Every process works on its share; only the main one writes the stage folder (metrics, model, DONE) — the
trainer saves its checkpoints itself. Stages that do not support several processes say so before any model loads.
"""

from __future__ import annotations

import os

from posttrain.errors import StageError

MULTI_PROCESS_STAGES = ("teacher", "generate", "sft")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every process of the stage (a no-op in one process)."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()


def check_process_count(stage: str) -> None:
    """A stage outside MULTI_PROCESS_STAGES started as several processes is an error naming the fix."""
    if world_size() > 1 and stage not in MULTI_PROCESS_STAGES:
        raise StageError(
            f"stage {stage} runs in one process, but it was started in {world_size()} "
            f"(only {', '.join(MULTI_PROCESS_STAGES)} run in several); give it a one-process launcher "
            f"in the recipe: `launchers: {{{stage}: cpu}}` (or `local`), or a config with num_processes: 1"
        )
