"""`rlhf` stage: REINFORCE with a leave-one-out baseline against the reward model, with a KL penalty toward the
starting policy (or toward an EMA of the policy, WARP) — Gemma 2's RLHF, in `posttrain.rl`'s notation:

    R_i = r_RM(x, y_i) − β Σ_t (log π(y_i,t) − log π_ref(y_i,t)),   A_i = R_i − mean_{j≠i} R_j,
    L(θ) = − (1/N) Σ_i A_i Σ_t log π_θ(y_i,t)          (N responses in the batch)

Engine: TRL's `RLOOTrainer` (the KL enters the reward as above; `posttrain.engines.rloo`). The project's own parts: prompts rendered by
`posttrain.chat`; the reward read by `posttrain.reward` at the last real token of the conversation rendered as the
RM was trained on; the k3 KL estimate logged beside TRL's k1; the world score — the true reward, which the RM only
approximates — measured every `train.eval_steps` and at both ends, so that reward hacking shows.

With `rlhf.reward: world` (built-in world) the reward is the verifiers' 0/1 score of each response instead of the
RM's: the stage then needs no `rm` stage, and shows what RL does when its reward is the true one.

Runs: `rlhf.runs` lists variants (seed, kl_coef, anchor …); each is trained from the same start and written to
`rlhf/<run>/model/`, ready for the `merge` stage. A killed stage resumes: finished runs are kept, the run in
progress continues from its last checkpoint. Each run's folder has `figures.json` (reward, KL to the starting
policy, world score, before and after) and `curves.png` (reward and KL against step).

    CPU:             posttrain run recipes/tiny/pipeline.yaml --only rlhf     (or: make rlhf)
    DeepSpeed node:  accelerate launch --config_file recipes/accelerate/zero3.yaml -m posttrain stage rlhf RECIPE
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, ModelSpec, Recipe, RLConfig, to_dict
from posttrain.data.jsonl import read_split
from posttrain.dist import barrier, is_main
from posttrain.outputs import Parents, StageOutput


def parents(recipe: Recipe) -> list[str]:
    rm = [] if recipe.rlhf is not None and recipe.rlhf.reward == "world" else ["rm"]
    return ["data", recipe.rl_start(), *rm]


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return {"rlhf": recipe.rlhf, "model": recipe.model, "chat": recipe.chat, "eval": recipe.eval.during_training(),
            "seed": recipe.seed_for("rlhf"), "tracking": recipe.tracking.wandb}  # fmt: skip


def main(recipe: Recipe, parents: Parents) -> Path:
    from posttrain.engines.rollouts import prompt_table
    from posttrain.modeling import load_tokenizer

    if recipe.rlhf is None:
        raise ConfigError(["stage rlhf: the recipe has no 'rlhf:' section"])
    # --- config & logging
    with StageOutput(
        recipe.run_dir / "rlhf", "rlhf", stage_config(recipe), parents.hashes, resume=True
    ) as out:
        print(f"[rlhf] recipe {recipe.name}, config {out.hash}: {json.dumps(to_dict(recipe.rlhf))}")
        start = parents.model(recipe.rl_start(), recipe.model)
        tokenizer = load_tokenizer(start)
        # --- data
        rows = read_split(parents.split("data", "train"))
        rows = rows[: recipe.rlhf.prompts] if recipe.rlhf.prompts else rows
        eval_rows = recipe.eval.capped(read_split(parents.split("data", "eval")))
        table = prompt_table(rows, tokenizer, recipe.chat, recipe.rlhf.max_new_tokens)
        print(f"[rlhf] start: {recipe.rl_start()} ({start.name_or_path}); {len(table)} training prompts")
        # --- models and training: each run loads its policy and reward model after its trainer's config
        rm = parents.model("rm", recipe.reward_model) if recipe.rlhf.reward == "rm" else None
        if rm is None:
            print("[rlhf] reward: the world's verifiers (1 right, 0 wrong), no reward model")
        summary = {}
        for name, cfg in recipe.rlhf.resolved().items():  # every run from the same start
            folder = out.path / name
            if (folder / "RUN_DONE").exists():
                print(f"[rlhf] run {name}: finished earlier, kept")
            else:
                train_run(recipe, name, cfg, start, tokenizer, rm, table, eval_rows, folder, out)
            barrier()  # the run's folder is written before any process goes on
            if is_main():
                summary[name] = json.loads((folder / "figures.json").read_text())
        out.summary = {"runs": summary}
    return out.final


def train_run(recipe: Recipe, name: str, cfg: RLConfig, start: ModelSpec, tokenizer, rm_spec: ModelSpec | None,
              table: dict[str, dict], eval_rows: list[dict], folder: Path, out: StageOutput) -> None:  # fmt: skip
    """One RL run from `start` into `folder`: figures before, training, figures after, the model and its curves.
    The trainer's config comes first, so that under ZeRO-3 every model is created partitioned: the policy, the RM
    (then prepared for ZeRO-3 inference) and TRL's own reference — the KL anchor, and the start the figures'
    KL is measured against (with `anchor: ema`, whose reference moves, a frozen copy of the start instead)."""
    from trl.models.utils import unwrap_model_for_generation

    from posttrain.engines.evaluation import policy_figures, world_scorer
    from posttrain.engines.trainer import frozen_for_inference, save_trained, train_resuming
    from posttrain.modeling import load_causal_lm, load_reward_model

    seed = recipe.rlhf.seed_of(name, recipe.seed_for("rlhf"))
    folder.mkdir(parents=True, exist_ok=True)
    log = run_log(out, name, folder / "metrics.jsonl")
    args = rloo_args(recipe, name, cfg, folder)
    policy = load_causal_lm(start, tokenizer, seed=seed, trainable=True)
    rm = load_reward_model(rm_spec, tokenizer).eval().requires_grad_(False) if rm_spec else None
    evaluate = world_scorer(recipe, tokenizer, eval_rows, f"rlhf/{name}")
    trainer = build_trainer(recipe, name, cfg, args, policy, tokenizer, rm, table, log, evaluate)
    rm = frozen_for_inference(rm, trainer)
    trainer.use_reward_model(rm)
    reference = trainer.ref_model
    if cfg.anchor == "ema":
        reference = frozen_for_inference(
            load_causal_lm(start, tokenizer).eval().requires_grad_(False), trainer
        )

    def figures(model) -> dict:
        f = policy_figures(model, reference, rm, tokenizer, eval_rows, recipe.chat, cfg.max_new_tokens,
                           cfg.temperature, recipe.eval.batch_size, seed)  # fmt: skip
        w = evaluate(model)
        return {**f, "world_score": w and w["score"], "world_per_task": w and w["per_task"],
                "world_scores": w and w["scores"], "world_tasks": w and [r["task"] for r in eval_rows]}  # fmt: skip

    before = figures(policy)
    print(f"[rlhf/{name}] kl_coef {cfg.kl_coef}, anchor {cfg.anchor}, seed {seed}; start: RM reward "
          f"{_num(before.get('reward'))}, world {_num(before['world_score'])}")  # fmt: skip
    train_resuming(trainer, folder / "checkpoints", folder / "metrics.jsonl", f"rlhf/{name}")
    policy = trainer.model.eval()
    # TRL's unwrapping for generation: under ZeRO-3 the policy gathered whole with the engine's hooks lifted, so
    # that no hook releases a layer while the figures read the LM head directly
    with unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as whole:
        after = figures(whole)
    # under ZeRO-3 every process helps gather the weights; the main one writes
    if not save_trained(trainer, policy, tokenizer, folder / "model", folder / "checkpoints", chat=recipe.chat):  # fmt: skip
        return
    write_run(folder, name, cfg, seed, before, after)


def write_run(folder: Path, name: str, cfg: RLConfig, seed: int, before: dict, after: dict) -> None:
    """A finished run's figures (start and end), its curves, and its completion marker, written last."""
    from posttrain.plots import curves_plot

    result = {"run": name, "kl_coef": cfg.kl_coef, "anchor": cfg.anchor, "seed": seed, "start": before,
              "end": after}  # fmt: skip
    (folder / "figures.json").write_text(json.dumps(result, indent=2) + "\n")
    curves_plot(folder / "metrics.jsonl", folder / "curves.png",
                f"rlhf/{name} (kl_coef {cfg.kl_coef}, anchor {cfg.anchor})")  # fmt: skip
    (folder / "RUN_DONE").write_text("")
    print(f"[rlhf/{name}] RM reward {_num(before.get('reward'))} → {_num(after.get('reward'))}, KL to start "
          f"{after['kl']:.3f}, world {_num(before['world_score'])} → {_num(after['world_score'])}")  # fmt: skip


def rloo_args(recipe: Recipe, name: str, cfg: RLConfig, folder: Path):
    """TRL's RLOOConfig for run `name` (checkpoints in `folder/checkpoints`)."""
    import trl

    from posttrain.engines.rloo import rloo_extra
    from posttrain.engines.rollouts import engine_fields, rollout_args
    from posttrain.modeling import trains_in_bf16

    seed = recipe.rlhf.seed_of(name, recipe.seed_for("rlhf"))
    return rollout_args(trl.RLOOConfig, cfg.train, folder, seed, trains_in_bf16(recipe.model.dtype),
                        recipe.tracking.wandb, f"{recipe.name}/rlhf/{name}", cfg.temperature, cfg.max_new_tokens,
                        **rloo_extra(cfg), **engine_fields(cfg.engine, cfg.vllm_mode, "rlhf"))  # fmt: skip


def build_trainer(recipe: Recipe, name: str, cfg: RLConfig, args, policy, tokenizer, rm, table: dict[str, dict],
                  log, evaluate):  # fmt: skip
    """TRL's RLOOTrainer for run `name` over the prompt table, rewarded by `rm` (or the world's verifiers), one
    line per logged step into `log`, the world score every `train.eval_steps`."""
    import trl
    from datasets import Dataset

    from posttrain.engines.rloo import reward_function, rloo_trainer
    from posttrain.engines.rollouts import prompt_keys
    from posttrain.engines.trainer import use_step_lines, world_eval_callback

    seed = recipe.rlhf.seed_of(name, recipe.seed_for("rlhf"))
    reward = reward_function(rm, tokenizer, table, recipe.world.assistant_name, cfg.max_new_tokens)
    trainer = rloo_trainer(trl.RLOOTrainer)(
        model=policy, reward_funcs=[reward], args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": prompt_keys(table, cfg.balance_tasks, seed)}),
    )  # fmt: skip
    trainer.setup(table)
    use_step_lines(trainer, log, args.max_steps)
    if cfg.train.eval_steps:
        trainer.add_callback(world_eval_callback(evaluate, cfg.train.eval_steps, log))
    return trainer


def run_log(out: StageOutput, name: str, metrics: Path):
    """A run's rows, tagged with its name, into the stage's metrics and its own `metrics.jsonl` (main process)."""

    def log(row: dict) -> None:
        row = {"run": name, **row}
        out.log(row)
        if is_main():
            with open(metrics, "a") as f:
                f.write(json.dumps(row) + "\n")

    return log


def _num(v: float | None) -> str:
    """A figure for a log line: three decimals, or – where there is none (no RM, off the built-in world)."""
    return "–" if v is None else f"{v:.3f}"
