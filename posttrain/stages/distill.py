"""`distill` stage: on-policy distillation of the SFT student from the teacher (Gemma 2 §4, GKD).

The student samples a response y ~ π_s(· | x) to a training prompt x; the teacher scores every sampled token; the
student minimises, on its own samples, the divergence chosen in `distill.divergence` (`posttrain.distill`):

    L(θ) = E_x E_{y ~ π_s} [ Σ_t D( p_teacher(· | x, y_<t) ‖ p_θ(· | x, y_<t) ) ] / |y|

with both distributions after Gemma 2's final logit soft-cap and the temperature. With `on_policy_fraction` < 1,
that share of batches samples from the student and the rest use the teacher's own responses from the `generate`
stage (GKD's mix of on-policy and fixed data).

Engine: TRL's `DistillationTrainer`. Two things are the project's own: prompts are rendered by
`posttrain.chat` (one `<bos>`, the generation prompt), not by the tokenizer's chat template, and the fixed-response
batches (TRL's trainer is on-policy only). The teacher runs in eval mode without gradients; teacher and student
must share the tokenizer (checked before any model loads).

Metrics per logged step: the divergence (`loss`), the sampled length and the truncation rate; every
`train.eval_steps` and at both ends: the student's world score (`eval.json` holds student-after-SFT,
student-after-distillation and the teacher side by side, and the share of the gap closed).

    CPU:             posttrain run recipes/tiny/pipeline.yaml --only distill     (or: make distill)
    DeepSpeed node:  accelerate launch --config_file recipes/accelerate/zero3.yaml -m posttrain stage distill RECIPE
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, ModelSpec, Recipe, to_dict
from posttrain.dist import is_main
from posttrain.outputs import StageOutput
from posttrain.stages.sft import read_rows, verify_saved, world_scorer


def parents(recipe: Recipe) -> list[str]:
    out = ["sft", "generate"]
    if recipe.teacher_train is not None:
        out.append("teacher")
    return out


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return {"distill": recipe.distill, "model": recipe.model, "teacher": recipe.teacher, "chat": recipe.chat,
            "eval": recipe.eval.during_training(), "seed": recipe.seed_for("distill"),
            "tracking": recipe.tracking.wandb}  # fmt: skip


def teacher_spec(recipe: Recipe) -> ModelSpec:
    from posttrain.runner import stage_model

    if recipe.teacher is None:
        raise ConfigError(["stage distill needs a 'teacher:' model"])
    return stage_model(recipe, "teacher", recipe.teacher) if recipe.teacher_train else recipe.teacher


def check_same_vocabulary(student_tok, teacher_tok, student_name: str, teacher_name: str) -> None:
    """Distillation compares distributions token by token: the two vocabularies must be the same, id for id."""
    vs, vt = student_tok.get_vocab(), teacher_tok.get_vocab()
    if vs == vt:
        return
    only_s = sorted(set(vs) - set(vt))[:5]
    only_t = sorted(set(vt) - set(vs))[:5]
    moved = sorted(k for k in set(vs) & set(vt) if vs[k] != vt[k])[:5]
    raise ConfigError([
        f"distill: the student ({student_name}) and the teacher ({teacher_name}) tokenizers differ: "
        f"{len(vs)} vs {len(vt)} tokens; only in the student {only_s}, only in the teacher {only_t}, "
        f"different ids for {moved}; distillation needs one tokenizer — pick a teacher of the same family"
    ])  # fmt: skip


def prompt_table(rows: list[dict], tokenizer, recipe: Recipe, max_new: int) -> dict[str, dict]:
    """Row id → {"prompt_ids", "fixed_ids"}: the rendered prompt and the teacher's response (+ `<end_of_turn>`)."""
    from posttrain.chat import render
    from posttrain.generation import prompt_ids

    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    table = {}
    for i, r in enumerate(rows):
        key = str(r.get("id", i))
        p = prompt_ids(r["messages"], tokenizer, recipe.chat, max_new, key)
        full = render(r["messages"], tokenizer, system=recipe.chat.system, where=key).input_ids
        fixed = full[len(p) :] if full[: len(p)] == p else []
        cut = fixed.index(end) + 1 if end in fixed else len(fixed)
        table[key] = {"prompt_ids": p, "fixed_ids": fixed[: min(cut, max_new)]}
    return table


def main(recipe: Recipe) -> Path:
    from posttrain import runner
    from posttrain.distill import beta_of
    from posttrain.modeling import (
        count_parameters,
        load_causal_lm,
        load_tokenizer,
        save_model,
        trains_in_bf16,
    )
    from posttrain.training import (
        gathered_state,
        train_resuming,
        trainer_args,
        use_step_lines,
        world_eval_callback,
    )

    cfg, seed = recipe.distill, recipe.seed_for("distill")
    if cfg is None:
        raise ConfigError(["stage distill: the recipe has no 'distill:' section"])
    # --- config & logging
    with StageOutput(recipe.run_dir / "distill", "distill", stage_config(recipe),
                     runner.parent_hashes(recipe, "distill"), resume=True) as out:  # fmt: skip
        print(f"[distill] recipe {recipe.name}, config {out.hash}: {json.dumps(to_dict(cfg))}")
        student_spec, t_spec = runner.stage_model(recipe, "sft", recipe.model), teacher_spec(recipe)
        tokenizer, t_tok = load_tokenizer(student_spec), load_tokenizer(t_spec)
        check_same_vocabulary(
            tokenizer, t_tok, str(student_spec.name_or_path), str(t_spec.name_or_path or t_spec.preset)
        )
        # --- data
        src = recipe.run_dir / "generate" / "data"
        rows = [r for r in read_rows(src / "train.jsonl") if r["messages"][-1]["role"] == "assistant"]
        rows = rows[: cfg.prompts] if cfg.prompts else rows
        eval_rows = read_rows(recipe.run_dir / "data" / "data" / "eval.jsonl")
        table = prompt_table(rows, tokenizer, recipe, cfg.max_new_tokens)
        print(
            f"[distill] {len(table)} training prompts from {src}; on-policy fraction {cfg.on_policy_fraction}"
        )
        # --- models
        student = load_causal_lm(student_spec, tokenizer, seed=seed)
        teacher = load_causal_lm(t_spec, t_tok, seed=seed).eval().requires_grad_(False)
        print(
            f"[distill] student {count_parameters(student):,} parameters, teacher {count_parameters(teacher):,}"
        )
        evaluate = world_scorer(recipe, tokenizer, eval_rows, "distill")
        before, teacher_eval = evaluate(student), evaluate(teacher)
        # --- train
        import trl
        from datasets import Dataset

        from posttrain.data.sources import balanced_prompts

        args = trl.DistillationConfig(
            **trainer_args(cfg.train, out.path / "checkpoints", seed, trains_in_bf16(recipe.model.dtype),
                           recipe.tracking.wandb, f"{recipe.name}/distill"),
            beta=beta_of(cfg.divergence, cfg.beta), temperature=cfg.temperature, top_p=1.0, top_k=0,
            max_completion_length=cfg.max_new_tokens, gradient_checkpointing=cfg.train.gradient_checkpointing,
            **cfg.train.trl,
        )  # fmt: skip
        args.eval_strategy = "no"
        keys = list(table)
        if cfg.balance_tasks:  # every task family drawn equally often, the rarer ones repeated
            keys = balanced_prompts({str(r.get("id", i)): r.get("task") for i, r in enumerate(rows)}, seed)
        trainer = mixed_policy_trainer(trl.DistillationTrainer)(
            model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": keys}),
        )  # fmt: skip
        trainer.setup(table, cfg.on_policy_fraction, seed)
        use_step_lines(trainer, out.log, args.max_steps)
        if cfg.train.eval_steps:
            trainer.add_callback(world_eval_callback(evaluate, cfg.train.eval_steps, out.log))
        result = train_resuming(trainer, out.path / "checkpoints", out.path / "metrics.jsonl", "distill",
                                out.resumed)  # fmt: skip
        student = trainer.model.eval()
        after = evaluate(student)
        # --- save (by the main process; under ZeRO-3 every process first helps gather the weights)
        state = gathered_state(trainer)
        report = {"sft": before, "distill": after, "teacher": teacher_eval}
        if before and after and teacher_eval:
            gap = teacher_eval["score"] - before["score"]
            report["gap_closed"] = (after["score"] - before["score"]) / gap if abs(gap) > 1e-9 else None
        if is_main():
            save_model(student, tokenizer, out.path / "model", state)
            verify_saved(out.path / "model", student, state)
            shutil.rmtree(out.path / "checkpoints", ignore_errors=True)
            (out.path / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        out.summary = {
            "train_loss": result.training_loss, "world_score_before": before and before["score"],
            "world_score": after and after["score"], "teacher_world_score": teacher_eval and teacher_eval["score"],
            "gap_closed": report.get("gap_closed"), "world_per_task": after and after["per_task"],
        }  # fmt: skip
        if report.get("gap_closed") is not None and is_main():
            print(f"[distill] world score: student after SFT {before['score']:.3f}, after distillation "
                  f"{after['score']:.3f}, teacher {teacher_eval['score']:.3f}: "
                  f"{report['gap_closed']:.0%} of the gap closed")  # fmt: skip
    return out.final


def mixed_policy_trainer(base: type) -> type:
    """`base` (TRL's DistillationTrainer) with prompts rendered by `posttrain.chat` from a table of row ids, and a
    share `1 − on_policy_fraction` of generation batches answered with the teacher's fixed responses."""

    class MixedPolicyDistillation(base):
        def setup(self, table: dict[str, dict], on_policy_fraction: float, seed: int) -> None:
            self._table, self._fraction = table, on_policy_fraction
            self._rng = random.Random(seed)
            self._by_prompt = {tuple(v["prompt_ids"]): v["fixed_ids"] for v in table.values()}

        def _tokenize_prompts(self, prompts: list):
            return [list(self._table[p]["prompt_ids"]) for p in prompts], None, {}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            fixed = [self._by_prompt.get(tuple(p)) for p in prompt_ids]
            if self._rng.random() < self._fraction or not all(fixed):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            return [list(f) for f in fixed]

    return MixedPolicyDistillation
