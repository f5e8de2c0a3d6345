"""Supervised fine-tuning on rendered conversations, over TRL's `SFTTrainer` (the `teacher` and `sft` stages).

The trainer is fed the project's renderer output: `input_ids` and `labels` (the token id where the loss mask is 1,
-100 elsewhere), so what is trained is exactly what `posttrain render --pretty` shows; TRL's own chat-template
path is not used. TRL's loss is the token-mean over every trained token of all micro-batches of an optimizer step
(`num_items_in_batch`), so gradient accumulation does not change the loss scale.

Guards: every row has at least one trained token (checked before training); a micro-batch without a trained
token stops the run with `TrainingError` (and so does a degenerate logged step, `posttrain.engines.trainer`).

Recipe names → TRL (`trl.SFTConfig`) names: those of `trainer_args`, and lora.* → peft.LoraConfig(r, lora_alpha,
lora_dropout, target_modules). Any other `trl.SFTConfig` field can be set under `trl:`; its keys are checked
against SFTConfig's fields.

Libraries that load a model (torch, transformers) are imported where a model is made, so that computing a stage's
hash (`sft_stage_config`) stays quick.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.config import ModelSpec, Recipe, TrainConfig, to_dict
from posttrain.data.formats import fit
from posttrain.data.jsonl import read_split
from posttrain.dist import is_main, world_size
from posttrain.engines.trainer import (
    TrainingError,
    finalize,
    save_trained,
    train_resuming,
    trainer_args,
    use_step_lines,
)
from posttrain.outputs import Parents, StageOutput


def tokenize_rows(rows: list[dict], tokenizer: Any, chat: Any) -> list[dict[str, list[int]]]:
    """Conversations → [{"input_ids", "labels"}] via the renderer; prompts cut from the left to fit.

    Raises TrainingError naming the row when a row has no trained token or cannot fit `chat.max_length`."""
    out = []
    for row in rows:
        where = row.get("_where", row.get("id", "?"))
        cut = fit(row["messages"], tokenizer, chat, where)
        if cut is None or not any(cut.loss_mask):
            raise TrainingError(
                f"{where}: no trained token fits chat.max_length {chat.max_length}; the data stage should have "
                "dropped this row — rerun it with the same chat settings"
            )
        out.append(
            {
                "input_ids": cut.input_ids,
                "labels": [t if m else -100 for t, m in zip(cut.input_ids, cut.loss_mask)],
            }
        )
    return out


def to_dataset(examples: list[dict[str, list[int]]]):
    from datasets import Dataset

    return Dataset.from_dict({k: [e[k] for e in examples] for k in ("input_ids", "labels")})


def sft_args(
    cfg: TrainConfig, out_dir: Path, seed: int, max_length: int, bf16: bool, wandb: bool, run_name: str
):
    import trl

    common = trainer_args(cfg, out_dir, seed, bf16, wandb, run_name)
    return trl.SFTConfig(
        **common, max_length=max_length, packing=cfg.packing, dataset_num_proc=None, **cfg.trl
    )


def make_trainer(model, tokenizer, train_ds, eval_ds, cfg: TrainConfig, args, log: Callable[[dict], None]):
    """An SFTTrainer with the project's guards and one console line per logged step."""
    import trl

    class GuardedSFTTrainer(trl.SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            if int((inputs["labels"] != -100).sum()) == 0:
                raise TrainingError(
                    f"step {self.state.global_step + 1}: a micro-batch has no trained token (all labels -100); "
                    "check the loss mask with `posttrain render --pretty`"
                )
            return super().training_step(model, inputs, num_items_in_batch)

        def _get_train_sampler(self, train_dataset=None):
            from transformers.trainer_pt_utils import BatchRebalanceSampler

            sampler = super()._get_train_sampler(train_dataset)
            if isinstance(sampler, BatchRebalanceSampler):  # length_buckets; transformers seeds it with 42
                sampler.seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return sampler

    peft_config = None
    if cfg.lora.enabled:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
        )  # fmt: skip
    trainer = GuardedSFTTrainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
        peft_config=peft_config,
    )  # fmt: skip
    use_step_lines(trainer, log, args.max_steps)
    return trainer


def sft_stage_config(
    recipe: Recipe, spec: ModelSpec | None, train: TrainConfig | None, stage: str
) -> dict[str, Any]:
    """What an SFT-trained model depends on (the `sft` and `teacher` stages)."""
    return {"model": spec, "train": train, "chat": recipe.chat, "eval": recipe.eval.during_training(),
            "seed": recipe.seed_for(stage), "tracking": recipe.tracking.wandb}  # fmt: skip


def run_sft(
    recipe: Recipe, stage: str, spec: ModelSpec, cfg: TrainConfig, parents: Parents, source: str
) -> Path:
    """SFT of `spec` on the conversations the `source` parent wrote (its train and eval splits) into
    `<run>/<stage>/`: the model, `eval.json` (the world score before and after), metrics. A killed run resumes
    from its last checkpoint."""
    # torch and transformers load here, not when a stage's hash is computed (`sft_stage_config`)
    from posttrain.engines.evaluation import world_scorer
    from posttrain.modeling import count_parameters, load_causal_lm, load_tokenizer, trains_in_bf16

    # --- config & logging
    seed = recipe.seed_for(stage)
    config = sft_stage_config(recipe, spec, cfg, stage)
    with StageOutput(recipe.run_dir / stage, stage, config, parents.hashes, resume=True) as out:
        print(f"[{stage}] recipe {recipe.name}, config {out.hash}:\n{json.dumps(to_dict(config), indent=1)}")
        # --- data
        train_rows, eval_rows = (
            read_split(parents.split(source, "train")),
            recipe.eval.capped(read_split(parents.split(source, "eval"))),
        )
        tokenizer = load_tokenizer(spec)
        train_ex = tokenize_rows(train_rows, tokenizer, recipe.chat)
        eval_ex = tokenize_rows([r for r in eval_rows if r["messages"][-1]["role"] == "assistant"], tokenizer,
                                recipe.chat)  # fmt: skip
        n_tok = sum(len(e["input_ids"]) for e in train_ex)
        n_trained = sum(sum(x != -100 for x in e["labels"]) for e in train_ex)
        print(f"[{stage}] {len(train_ex)} training conversations from {parents.folders[source]}: {n_tok} tokens, "
              f"{n_trained} trained ({n_trained / max(n_tok, 1):.0%})")  # fmt: skip
        # --- models (after the trainer's config: under ZeRO-3 it makes them partitioned from the start)
        args = sft_args(cfg, out.path / "checkpoints", seed, recipe.chat.max_length, trains_in_bf16(spec.dtype),
                        recipe.tracking.wandb, f"{recipe.name}/{stage}")  # fmt: skip
        model = load_causal_lm(spec, tokenizer, seed=seed, trainable=True)
        print(f"[{stage}] model: {spec.preset or spec.name_or_path}, {count_parameters(model):,} parameters")
        if world_size() > 1 and is_main():
            print(f"[{stage}] data parallel over {world_size()} processes: global batch "
                  f"{cfg.batch_size * cfg.grad_accum * world_size()}")  # fmt: skip
        evaluate = world_scorer(recipe, tokenizer, eval_rows, stage)
        before = evaluate(model)
        # --- train
        trainer = make_trainer(model, tokenizer, to_dataset(train_ex), to_dataset(eval_ex) if eval_ex else None,
                               cfg, args, out.log)  # fmt: skip
        result = train_resuming(
            trainer, out.path / "checkpoints", out.path / "metrics.jsonl", stage, out.resumed
        )
        eval_loss = trainer.evaluate()["eval_loss"] if eval_ex else None
        if cfg.lora.enabled and is_main():
            trainer.model.save_pretrained(out.path / "adapter")
        model = finalize(trainer, cfg)
        after = evaluate(model)
        # --- save (by the main process; under ZeRO-3 every process first helps gather the weights)
        if save_trained(trainer, model, tokenizer, out.path / "model", out.path / "checkpoints", chat=recipe.chat):  # fmt: skip
            report = {"before": before, "after": after, "eval_loss": eval_loss}
            (out.path / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        out.summary = {
            "train_loss": result.training_loss, "eval_loss": eval_loss, "train_rows": len(train_ex),
            "trained_tokens_per_epoch": n_trained, "parameters": count_parameters(model),
            "world_score_before": before and before["score"], "world_score": after and after["score"],
            "world_per_task": after and after["per_task"],
        }  # fmt: skip
    return out.final
