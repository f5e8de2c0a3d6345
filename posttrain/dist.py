"""Which process this is when a stage runs as several (`accelerate launch` with `num_processes` > 1).

Every process works on its share; only the main one writes the stage folder (metrics, model, DONE) — the
trainer saves its checkpoints itself. Stages that do not support several processes say so before any model loads.
"""

from __future__ import annotations

import os

from posttrain import registry
from posttrain.errors import StageError


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
        import torch.distributed as td

        process_group()
        td.barrier()


def process_group() -> None:
    """Join the stage's process group (once; accelerate's state, as the trainers set it up). Under DeepSpeed its
    own communication is set up too, which zero.Init needs when a trainer loads a model after this; otherwise a
    machine without GPUs uses gloo."""
    import torch
    import torch.distributed as td
    from accelerate import PartialState

    if td.is_initialized():
        return
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        PartialState()
    else:
        PartialState(cpu=not torch.cuda.is_available())


def part() -> tuple[int, int]:
    """This process's share of work split n ways: (rank, world size)."""
    return rank(), world_size()


def merge_parts(mine: list) -> list:
    """Every process's list with None where another process did the work (same length everywhere) → the whole
    list, on every process. One process: `mine` itself."""
    if world_size() == 1:
        return mine
    import torch.distributed as td

    process_group()
    every: list[list | None] = [None] * world_size()
    td.all_gather_object(every, mine)
    out = list(mine)
    for theirs in every:
        for i, x in enumerate(theirs or []):
            if x is not None:
                out[i] = x
    return out


def check_process_count(stage: str) -> None:
    """A one-process stage (`posttrain.registry`) started as several processes is an error naming the fix."""
    if world_size() > 1 and stage not in registry.MULTI_PROCESS:
        raise StageError(
            f"stage {stage} runs in one process, but it was started in {world_size()} "
            f"(only {', '.join(registry.MULTI_PROCESS)} run in several); give it a one-process launcher "
            f"in the recipe: `launchers: {{{stage}: cpu}}` (or `local`), or a config with num_processes: 1"
        )
