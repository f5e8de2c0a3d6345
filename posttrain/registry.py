"""The stages, in pipeline order: the one list that the config, the runner, the launcher, the report and the CLI
read. Each stage's code is `posttrain.stages.<name>` (`parents`, `stage_config`, `main`).

    processes  `many`: the stage may run as several processes (data parallel, DeepSpeed); `one`: a plain process
    trains     it has a training loop: a killed run resumes from its last checkpoint, SIGTERM saves one first
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Stage:
    name: str
    processes: Literal["one", "many"]
    trains: bool
    does: str


STAGES: tuple[Stage, ...] = (
    Stage("data", "one", False, "training and evaluation splits, validated and filtered"),
    Stage(
        "teacher",
        "many",
        True,
        "SFT of the teacher on the data stage's conversations (recipes with teacher_train)",
    ),
    Stage("generate", "many", False, "the teacher's responses to the training prompts, filtered"),
    Stage("sft", "many", True, "SFT of the policy on the teacher's responses"),
    Stage("distill", "many", True, "on-policy distillation of the SFT policy from the teacher"),
    Stage("rm", "many", True, "a Bradley-Terry reward model, with a held-out gate"),
    Stage("rlhf", "many", True, "REINFORCE (leave-one-out) against the RM with a KL penalty, several runs"),
    Stage("merge", "one", False, "WARP: SLERP of the RL runs' task vectors, then LITI toward the start"),
    Stage("eval", "one", False, "every model side by side: world, RM reward, KL, probes"),
)
NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
MULTI_PROCESS: tuple[str, ...] = tuple(s.name for s in STAGES if s.processes == "many")
TRAINING: tuple[str, ...] = tuple(s.name for s in STAGES if s.trains)


def module_name(stage: str) -> str:
    """The module that holds a stage's code."""
    return f"posttrain.stages.{stage}"
