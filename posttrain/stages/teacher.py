"""`teacher` stage: train the teacher with SFT on the data stage's conversations.

Only recipes that set `teacher_train:` have it — `recipes/tiny/tiny-models.yaml`, whose teacher is a larger tiny
preset trained here on the world's gold conversations (`make tiny-models` ships it in data/models/, and the tiny
recipe starts from that copy), and the smoke recipe. Real recipes name a trained teacher (e.g. a Gemma 2 27B
instruction model) in `teacher:` and skip this stage, as the tiny recipe does with its shipped one.
The objective, engine, checkpoints and evaluation are the `sft` stage's (`posttrain.engines.sft.run_sft`).

Writes `runs/<recipe>/teacher/`: `model/`, `eval.json`, `metrics.jsonl`, `config.yaml`, `provenance.json`, `DONE`.

    CPU:  posttrain run recipes/tiny/tiny-models.yaml --only teacher
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, Recipe
from posttrain.engines.sft import run_sft, sft_stage_config
from posttrain.outputs import Parents


def parents(recipe: Recipe) -> list[str]:
    return ["data"]


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return sft_stage_config(recipe, recipe.teacher, recipe.teacher_train, "teacher")


def main(recipe: Recipe, parents: Parents) -> Path:
    if recipe.teacher is None or recipe.teacher_train is None:
        raise ConfigError(["stage teacher: set both 'teacher:' and 'teacher_train:' in the recipe"])
    return run_sft(recipe, "teacher", recipe.teacher, recipe.teacher_train, parents, source="data")
