"""`rlhf` stage: REINFORCE with a leave-one-out baseline against the reward model, with a KL penalty toward the
starting policy (or toward an EMA of the policy, WARP) — Gemma 2's RLHF, in `posttrain.rl`'s notation:

    R_i = r_RM(x, y_i) − β Σ_t (log π(y_i,t) − log π_ref(y_i,t)),   A_i = R_i − mean_{j≠i} R_j,
    L(θ) = − (1/N) Σ_i A_i Σ_t log π_θ(y_i,t)          (N responses in the batch)

Engine: TRL's `RLOOTrainer` (the KL enters the reward as above). The project's own parts: prompts rendered by
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
import shutil
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, Recipe, to_dict
from posttrain.dist import barrier, is_main
from posttrain.outputs import StageOutput
from posttrain.stages.sft import read_rows, verify_saved, world_scorer


def start_stage(recipe: Recipe) -> str:
    cfg = recipe.rlhf
    if cfg is not None and cfg.init_from != "auto":
        return cfg.init_from
    return "distill" if recipe.distill is not None and recipe.teacher is not None else "sft"


def parents(recipe: Recipe) -> list[str]:
    rm = [] if recipe.rlhf is not None and recipe.rlhf.reward == "world" else ["rm"]
    return ["data", start_stage(recipe), *rm]


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return {"rlhf": recipe.rlhf, "model": recipe.model, "chat": recipe.chat, "eval": recipe.eval.during_training(),
            "seed": recipe.seed_for("rlhf"), "tracking": recipe.tracking.wandb}  # fmt: skip


def main(recipe: Recipe) -> Path:
    from posttrain import runner
    from posttrain.modeling import load_reward_model, load_tokenizer

    if recipe.rlhf is None:
        raise ConfigError(["stage rlhf: the recipe has no 'rlhf:' section"])
    # --- config & logging
    with StageOutput(recipe.run_dir / "rlhf", "rlhf", stage_config(recipe),
                     runner.parent_hashes(recipe, "rlhf"), resume=True) as out:  # fmt: skip
        print(f"[rlhf] recipe {recipe.name}, config {out.hash}: {json.dumps(to_dict(recipe.rlhf))}")
        start = runner.stage_model(recipe, start_stage(recipe), recipe.model)
        tokenizer = load_tokenizer(start)
        # --- data
        rows = [r for r in read_rows(recipe.run_dir / "data" / "data" / "train.jsonl")]
        rows = rows[: recipe.rlhf.prompts] if recipe.rlhf.prompts else rows
        eval_rows = read_rows(recipe.run_dir / "data" / "data" / "eval.jsonl")
        table = prompt_table(rows, tokenizer, recipe)
        print(f"[rlhf] start: {start_stage(recipe)} ({start.name_or_path}); {len(table)} training prompts")
        rm = None
        if recipe.rlhf.reward == "rm":
            rm = load_reward_model(runner.stage_model(recipe, "rm", recipe.reward_model), tokenizer).eval()
            rm.requires_grad_(False)
        else:
            print("[rlhf] reward: the world's verifiers (1 right, 0 wrong), no reward model")
        summary = {}
        for name, cfg in recipe.rlhf.resolved().items():
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


def prompt_table(rows: list[dict], tokenizer, recipe: Recipe) -> dict[str, dict]:
    from posttrain.chat import prompt_messages
    from posttrain.generation import prompt_ids

    return {
        str(r.get("id", i)): {
            "prompt_ids": prompt_ids(r["messages"], tokenizer, recipe.chat, recipe.rlhf.max_new_tokens, str(r.get("id", i))),
            "messages": prompt_messages(r["messages"]),
            "row": {k: r[k] for k in ("task", "answer") if k in r},
        }
        for i, r in enumerate(rows)
    }  # fmt: skip


def reward_function(rm, tokenizer, table: dict[str, dict], recipe: Recipe) -> Any:
    """A TRL reward function: the RM's score of each (prompt, response), as `posttrain.rl.scored_sequence`; with
    no RM (`rlhf.reward: world`) the world's verifier score of the response (a truncated one scores 0)."""
    from posttrain.reward import score_ids
    from posttrain.rl import scored_sequence

    if rm is None:
        from posttrain import world
        from posttrain.generation import decode, stop_ids

        stops, name, max_new = stop_ids(tokenizer), recipe.world.assistant_name, recipe.rlhf.max_new_tokens

        def world_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
            gens = [decode(list(ids), tokenizer, stops, max_new) for ids in completion_ids]
            return [
                0.0 if g.truncated or g.malformed else world.score(table[p]["row"], g.text, name)
                for p, g in zip(prompts, gens)
            ]

        return world_reward

    def rm_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        seqs = [
            scored_sequence(table[p]["prompt_ids"], ids, tokenizer) for p, ids in zip(prompts, completion_ids)
        ]
        return score_ids(rm, seqs, tokenizer.pad_token_id)

    return rm_reward


def train_run(
    recipe, name, cfg, start, tokenizer, rm, table, eval_rows, folder: Path, out: StageOutput
) -> None:
    import trl
    from datasets import Dataset

    from posttrain.data.sources import balanced_prompts
    from posttrain.modeling import load_causal_lm, save_model, trains_in_bf16
    from posttrain.plots import curves_plot
    from posttrain.rl import policy_figures
    from posttrain.training import (
        end_zero3,
        gathered_state,
        train_resuming,
        trainer_args,
        use_step_lines,
        world_eval_callback,
    )

    seed = recipe.rlhf.seed_of(name, recipe.seed_for("rlhf"))
    folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "metrics.jsonl"

    def log(row: dict) -> None:
        row = {"run": name, **row}
        out.log(row)
        if not is_main():
            return
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    policy = load_causal_lm(start, tokenizer, seed=seed)
    reference = load_causal_lm(start, tokenizer, seed=seed).eval().requires_grad_(False)
    evaluate = world_scorer(recipe, tokenizer, eval_rows, f"rlhf/{name}")

    def figures(model) -> dict:
        f = policy_figures(model, reference, rm, tokenizer, eval_rows, recipe.chat, cfg.max_new_tokens,
                           cfg.temperature, recipe.eval.batch_size, seed)  # fmt: skip
        w = evaluate(model)
        return {**f, "world_score": w and w["score"], "world_per_task": w and w["per_task"],
                "world_scores": w and w["scores"]}  # fmt: skip

    before = figures(policy)
    print(f"[rlhf/{name}] kl_coef {cfg.kl_coef}, anchor {cfg.anchor}, seed {seed}; start: RM reward "
          f"{_num(before.get('reward'))}, world {_num(before['world_score'])}")  # fmt: skip
    args = trl.RLOOConfig(
        **trainer_args(cfg.train, folder / "checkpoints", seed, trains_in_bf16(recipe.model.dtype),
                       recipe.tracking.wandb, f"{recipe.name}/rlhf/{name}"),
        beta=cfg.kl_coef, num_generations=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=1.0,
        top_k=0, max_completion_length=cfg.max_new_tokens, sync_ref_model=cfg.anchor == "ema",
        ref_model_mixup_alpha=cfg.ema_rate, ref_model_sync_steps=1,
        gradient_checkpointing=cfg.train.gradient_checkpointing, **cfg.train.trl,
    )  # fmt: skip
    args.eval_strategy = "no"
    keys = list(table)
    if cfg.balance_tasks:  # every task family drawn equally often, the rarer ones repeated
        keys = balanced_prompts({k: table[k]["row"].get("task") for k in keys}, seed)
    trainer = rloo_trainer(trl.RLOOTrainer)(
        model=policy, reward_funcs=[reward_function(rm, tokenizer, table, recipe)], args=args,
        train_dataset=Dataset.from_dict({"prompt": keys}), processing_class=tokenizer,
    )  # fmt: skip
    trainer.setup(table)
    use_step_lines(trainer, log, args.max_steps)
    if cfg.train.eval_steps:
        trainer.add_callback(world_eval_callback(evaluate, cfg.train.eval_steps, log))
    train_resuming(trainer, folder / "checkpoints", metrics, f"rlhf/{name}")
    policy = trainer.model.eval()
    after = figures(policy)
    # under ZeRO-3 every process helps gather the weights; the main one writes
    state = gathered_state(trainer)
    end_zero3()
    if not is_main():
        return
    save_model(policy, tokenizer, folder / "model", state)
    verify_saved(folder / "model", policy, state)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    result = {
        "run": name,
        "kl_coef": cfg.kl_coef,
        "anchor": cfg.anchor,
        "seed": seed,
        "start": before,
        "end": after,
    }
    (folder / "figures.json").write_text(json.dumps(result, indent=2) + "\n")
    curves_plot(metrics, folder / "curves.png", f"rlhf/{name} (kl_coef {cfg.kl_coef}, anchor {cfg.anchor})")
    (folder / "RUN_DONE").write_text("")
    print(f"[rlhf/{name}] RM reward {_num(before.get('reward'))} → {_num(after.get('reward'))}, KL to start "
          f"{after['kl']:.3f}, world {_num(before['world_score'])} → {_num(after['world_score'])}")  # fmt: skip


def _num(v: float | None) -> str:
    """A figure for a log line: three decimals, or – where there is none (no RM, off the built-in world)."""
    return "–" if v is None else f"{v:.3f}"


def rloo_trainer(base: type) -> type:
    """`base` (TRL's RLOOTrainer) with prompts rendered by `posttrain.chat` from a table of row ids, and the k3 KL
    estimate logged beside TRL's k1."""
    from posttrain.rl import kl_estimates

    class RLOO(base):
        def setup(self, table: dict[str, dict]) -> None:
            self._table, self._logps = table, {}

        def _tokenize_prompts(self, prompts: list):
            return [list(self._table[p]["prompt_ids"]) for p in prompts], None, {}

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            out = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            import torch

            if not torch.is_grad_enabled():  # the scoring pass of a fresh batch: remember π and π_ref
                self._logps["ref" if model is self.ref_model else "policy"] = out[0]
            return out

        def _generate_and_score_completions(self, inputs):
            self._logps = {}
            output = super()._generate_and_score_completions(inputs)
            if "ref" in self._logps and "policy" in self._logps:
                mode = "train" if self.model.training else "eval"
                kl = kl_estimates(self._logps["policy"], self._logps["ref"], output["completion_mask"])
                self._metrics[mode]["kl_k3"].append(kl["k3"])
            return output

    return RLOO
