"""`distill` stage: on-policy distillation of the SFT student from the teacher (Gemma 2 §4, GKD).

The student samples a response y ~ π_s(· | x) to a training prompt x; the teacher scores every sampled token; the
student minimises, on its own samples, the divergence chosen in `distill.divergence` (`posttrain.distill`):

    L(θ) = E_x E_{y ~ π_s} [ Σ_t D( p_teacher(· | x, y_<t) ‖ p_θ(· | x, y_<t) ) ] / |y|

with both distributions after Gemma 2's final logit soft-cap and the temperature. With `on_policy_fraction` < 1,
that share of batches samples from the student and the rest use the teacher's own responses from the `generate`
stage (GKD's mix of on-policy and fixed data).

Engine: TRL's `DistillationTrainer` (`posttrain.engines.distillation`). Two things are the project's own:
prompts are rendered by `posttrain.chat` (one `<bos>`, the generation prompt), not by the tokenizer's chat
template, the fixed-response batches (TRL's trainer is on-policy only), and with `distill.train_until_teacher_below`
each response trained only through its first token the teacher finds unlikely. The teacher runs in eval mode
without gradients; teacher and student must share the tokenizer (checked before any model loads).

Metrics per logged step: the divergence (`loss`), the sampled length and the truncation rate; every
`train.eval_steps` and at both ends: the student's world score (`eval.json` holds student-after-SFT,
student-after-distillation and the teacher side by side, and the share of the gap closed).

    CPU:             posttrain run recipes/tiny/pipeline.yaml --only distill     (or: make distill)
    DeepSpeed node:  accelerate launch --config_file recipes/accelerate/zero3.yaml -m posttrain stage distill RECIPE
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, Recipe, to_dict
from posttrain.data.jsonl import read_split
from posttrain.dist import is_main
from posttrain.outputs import Parents, StageOutput, teacher_spec


def parents(recipe: Recipe) -> list[str]:
    out = ["sft", "generate"]
    if recipe.teacher_train is not None:
        out.append("teacher")
    return out


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return {"distill": recipe.distill, "model": recipe.model, "teacher": recipe.teacher, "chat": recipe.chat,
            "eval": recipe.eval.during_training(), "seed": recipe.seed_for("distill"),
            "tracking": recipe.tracking.wandb}  # fmt: skip


def main(recipe: Recipe, parents: Parents) -> Path:
    from posttrain.engines.distillation import check_same_vocabulary
    from posttrain.engines.evaluation import world_scorer
    from posttrain.engines.rollouts import prompt_table
    from posttrain.engines.trainer import save_trained, train_resuming
    from posttrain.modeling import count_parameters, load_causal_lm, load_tokenizer

    cfg, seed = recipe.distill, recipe.seed_for("distill")
    if cfg is None:
        raise ConfigError(["stage distill: the recipe has no 'distill:' section"])
    # --- config & logging
    with StageOutput(recipe.run_dir / "distill", "distill", stage_config(recipe), parents.hashes,
                     resume=True) as out:  # fmt: skip
        print(f"[distill] recipe {recipe.name}, config {out.hash}: {json.dumps(to_dict(cfg))}")
        student_spec, t_spec = parents.model("sft", recipe.model), teacher_spec(recipe, parents)
        tokenizer, t_tok = load_tokenizer(student_spec), load_tokenizer(t_spec)
        check_same_vocabulary(
            tokenizer, t_tok, str(student_spec.name_or_path), str(t_spec.name_or_path or t_spec.preset)
        )
        # --- data
        rows, eval_rows = distill_rows(recipe, parents)
        table = prompt_table(rows, tokenizer, recipe.chat, cfg.max_new_tokens, fixed=True)
        print(f"[distill] {len(table)} training prompts from {parents.folders['generate']}; on-policy fraction "
              f"{cfg.on_policy_fraction}")  # fmt: skip
        # --- models (after the trainer's config: under ZeRO-3 it makes them partitioned from the start)
        args = distill_args(recipe, out.path)
        student = load_causal_lm(student_spec, tokenizer, seed=seed, trainable=True)
        teacher = load_causal_lm(t_spec, t_tok, seed=seed).eval().requires_grad_(False)
        print(f"[distill] student {count_parameters(student):,} parameters, teacher {count_parameters(teacher):,}")  # fmt: skip
        evaluate = world_scorer(recipe, tokenizer, eval_rows, "distill")
        before = evaluate(student)
        # --- train (the trainer prepares the frozen teacher for ZeRO-3 inference)
        trainer = build_trainer(recipe, args, student, teacher, tokenizer, table, out.log, evaluate)
        teacher_eval = evaluate(trainer.teacher_model, gather=False)
        result = train_resuming(trainer, out.path / "checkpoints", out.path / "metrics.jsonl", "distill",
                                out.resumed)  # fmt: skip
        student = trainer.model.eval()
        after = evaluate(student)
        # --- save (by the main process; under ZeRO-3 every process first helps gather the weights)
        report = gap_report(before, after, teacher_eval)
        if save_trained(
            trainer, student, tokenizer, out.path / "model", out.path / "checkpoints", chat=recipe.chat
        ):
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


def distill_rows(recipe: Recipe, parents: Parents) -> tuple[list[dict], list[dict]]:
    """The training prompts (the generate stage's conversations, at most `distill.prompts`) and the evaluation
    rows (the data stage's, handed on by generate)."""
    rows = [
        r for r in read_split(parents.split("generate", "train")) if r["messages"][-1]["role"] == "assistant"
    ]
    rows = rows[: recipe.distill.prompts] if recipe.distill.prompts else rows
    return rows, recipe.eval.capped(read_split(parents.split("generate", "eval")))


def distill_args(recipe: Recipe, folder: Path):
    """TRL's DistillationConfig for the stage (checkpoints in `folder/checkpoints`)."""
    import trl

    from posttrain.distill import beta_of
    from posttrain.engines.rollouts import engine_fields, rollout_args
    from posttrain.modeling import trains_in_bf16

    cfg = recipe.distill
    return rollout_args(trl.DistillationConfig, cfg.train, folder, recipe.seed_for("distill"),
                        trains_in_bf16(recipe.model.dtype), recipe.tracking.wandb, f"{recipe.name}/distill",
                        cfg.temperature, cfg.max_new_tokens, beta=beta_of(cfg.divergence, cfg.beta),
                        **engine_fields(cfg.engine, cfg.vllm_mode, "distill"))  # fmt: skip


def build_trainer(recipe: Recipe, args, student, teacher, tokenizer, table: dict[str, dict], log, evaluate):
    """TRL's DistillationTrainer over the prompt table, one line per logged step into `log`, the world score every
    `train.eval_steps` (`evaluate`)."""
    import trl
    from datasets import Dataset

    from posttrain.engines.distillation import mixed_policy_trainer
    from posttrain.engines.rollouts import prompt_keys
    from posttrain.engines.trainer import use_step_lines, world_eval_callback

    cfg, seed = recipe.distill, recipe.seed_for("distill")
    trainer = mixed_policy_trainer(trl.DistillationTrainer)(
        model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
        train_dataset=Dataset.from_dict({"prompt": prompt_keys(table, cfg.balance_tasks, seed)}),
    )  # fmt: skip
    trainer.setup(table, cfg.on_policy_fraction, seed, cfg.train_until_teacher_below)
    use_step_lines(trainer, log, args.max_steps)
    if cfg.train.eval_steps:
        trainer.add_callback(world_eval_callback(evaluate, cfg.train.eval_steps, log))
    return trainer


def gap_report(before: dict | None, after: dict | None, teacher: dict | None) -> dict[str, Any]:
    """The student after SFT, after distillation and the teacher side by side, with the share of the gap closed:
    (after − before) / (teacher − before)."""
    report: dict[str, Any] = {"sft": before, "distill": after, "teacher": teacher}
    if before and after and teacher:
        gap = teacher["score"] - before["score"]
        report["gap_closed"] = (after["score"] - before["score"]) / gap if abs(gap) > 1e-9 else None
    return report
