"""`sft` stage: supervised fine-tuning of the policy on conversations (behaviour cloning of the teacher).

Objective: the token-mean negative log-likelihood of the trained tokens — every model turn and its closing
`<end_of_turn>` (or only the last model turn with `chat.train_on: last`) — as rendered by `posttrain.chat`:

    L(θ) = − Σ_{t ∈ trained} log p_θ(x_t | x_<t) / |trained|      (over all micro-batches of one optimizer step)

Data: the teacher's filtered responses (`generate` stage) when the recipe names a teacher, else the `data`
stage's conversations. Engine: TRL's `SFTTrainer` fed with the renderer's ids and labels
(`posttrain.engines.sft`, which the `teacher` stage shares); full fine-tuning or LoRA (`sft.lora.enabled`; the saved model has the adapters merged in,
the adapter itself is kept in `adapter/`). Before and after training the model answers the evaluation prompts
greedily; on the built-in world the verifiers score those answers per task family (`eval.json`).

A killed run resumes from its last complete checkpoint when rerun with the same recipe. Data-parallel over
several processes (e.g. `launchers: {sft: ddp-cpu}`): each process trains on its share of every global batch and
evaluates; the main one writes the stage folder.

Writes `runs/<recipe>/sft/`: `model/`, `eval.json`, `metrics.jsonl`, `config.yaml`, `provenance.json`, `DONE`.

    CPU:             posttrain run recipes/tiny/pipeline.yaml --only sft        (or: make sft)
    one GPU:         posttrain stage sft recipes/gemma2-2b/pipeline.yaml
    DeepSpeed node:  accelerate launch --config_file recipes/accelerate/zero3.yaml -m posttrain stage sft RECIPE
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import Recipe
from posttrain.engines.sft import run_sft, sft_stage_config
from posttrain.outputs import Parents


def parents(recipe: Recipe) -> list[str]:
    return ["generate"] if recipe.teacher is not None else ["data"]


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return sft_stage_config(recipe, recipe.model, recipe.sft, "sft")


def main(recipe: Recipe, parents: Parents) -> Path:
    source = "generate" if recipe.teacher is not None else "data"
    return run_sft(recipe, "sft", recipe.model, recipe.sft, parents, source)
