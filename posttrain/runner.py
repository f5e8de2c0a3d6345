"""Recipe → ordered stages, their expected hashes, and the parents' outputs a stage reads.

Every stage module has `stage_config(recipe)` (what its output depends on), `parents(recipe)` (the stages whose
outputs it reads) and `main(recipe) -> Path`. A stage's hash covers its own config and its parents' hashes, so a
change anywhere reruns that stage and everything downstream of it, and nothing else.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from posttrain.config import ConfigError, ModelSpec, Recipe
from posttrain.outputs import read_done, stage_hash

# Stages in pipeline order.
STAGES = {
    "data": "posttrain.stages.data",
    "teacher": "posttrain.stages.teacher",
    "generate": "posttrain.stages.generate",
    "sft": "posttrain.stages.sft",
    "distill": "posttrain.stages.distill",
    "rm": "posttrain.stages.rm",
    "rlhf": "posttrain.stages.rlhf",
    "merge": "posttrain.stages.merge",
    "eval": "posttrain.stages.eval",
}


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise ConfigError([f"unknown stage {name!r}; stages: {', '.join(STAGES)}"])
    return importlib.import_module(STAGES[name])


def applies(recipe: Recipe, name: str) -> bool:
    """Whether the recipe has this stage: `teacher` only when `teacher_train:` is set (the tiny recipe trains its
    own teacher), `generate` and `distill` only when a teacher is named, `distill`, `rlhf` and `merge` only when
    their sections are set."""
    if name == "teacher":
        return recipe.teacher is not None and recipe.teacher_train is not None
    if name == "generate":
        return recipe.teacher is not None
    if name == "distill":
        return recipe.distill is not None and recipe.teacher is not None
    if name == "rlhf":
        return recipe.rlhf is not None
    if name == "merge":
        return recipe.merge is not None and recipe.rlhf is not None
    return True


def plan(recipe: Recipe) -> list[str]:
    return [s for s in STAGES if applies(recipe, s)]


def expected_hash(recipe: Recipe, name: str, _memo: dict[str, str] | None = None) -> str:
    """The hash a finished, up-to-date output of `name` carries in its DONE file."""
    memo = {} if _memo is None else _memo
    if name not in memo:
        module = stage_module(name)
        parents = {p: expected_hash(recipe, p, memo) for p in module.parents(recipe)}
        memo[name] = stage_hash(module.stage_config(recipe), parents)
    return memo[name]


def with_parents(recipe: Recipe, names: list[str]) -> list[str]:
    """`names` and every stage they depend on, in pipeline order."""
    need: set[str] = set()

    def add(n: str) -> None:
        if n not in need:
            need.add(n)
            for p in stage_module(n).parents(recipe):
                add(p)

    for n in names:
        add(n)
    return [s for s in plan(recipe) if s in need]


def parent_hashes(recipe: Recipe, name: str) -> dict[str, str]:
    """For a stage about to run: each parent's DONE hash. A missing or stale parent is an error saying what to run."""
    out = {}
    for p in stage_module(name).parents(recipe):
        folder = recipe.run_dir / p
        done = read_done(folder)
        if done is None:
            raise ConfigError(
                [f"stage {name} needs {folder}/ (stage {p}), which is not finished; "
                 f"run `posttrain run <recipe> --only {name}` to run it with its parents"]
            )  # fmt: skip
        if done["config_hash"] != expected_hash(recipe, p):
            raise ConfigError(
                [f"stage {name} needs stage {p}, but {folder}/ was made with another config; "
                 f"rerun it first (`posttrain run <recipe> --only {name}`)"]
            )  # fmt: skip
        out[p] = done["config_hash"]
    return out


def stage_model(recipe: Recipe, stage: str, like: ModelSpec | None = None) -> ModelSpec:
    """The model a finished stage saved (`<run>/<stage>/model`, its tokenizer beside it), loaded with the dtype
    and attention of `like` (the recipe's spec for that role)."""
    folder = str(recipe.run_dir / stage / "model")
    like = like or ModelSpec()
    return ModelSpec(
        name_or_path=folder, tokenizer=folder, dtype=like.dtype, attn_implementation=like.attn_implementation
    )


def launch_command(recipe: Recipe, name: str, recipe_path: str, sets: list[str]) -> list[str]:
    """The command that runs stage `name` as its own job: `accelerate launch --config_file <launcher> -m posttrain
    stage …`, or a plain process with the `local` launcher."""
    import sys

    from posttrain.config import launcher_file

    launcher = recipe.launcher_for(name)
    stage = ["-m", "posttrain", "stage", name, recipe_path] + [f"--set={s}" for s in sets]
    if launcher == "local":
        return [sys.executable, *stage]
    path = launcher_file(launcher)
    if path is None:
        raise ConfigError([f"launcher {launcher!r} for stage {name}: no such accelerate config"])
    return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", str(path), *stage]
