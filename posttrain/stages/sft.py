"""`sft` stage: supervised fine-tuning of the policy on conversations (behaviour cloning of the teacher).

Objective: the token-mean negative log-likelihood of the trained tokens — every model turn and its closing
`<end_of_turn>` (or only the last model turn with `chat.train_on: last`) — as rendered by `posttrain.chat`:

    L(θ) = − Σ_{t ∈ trained} log p_θ(x_t | x_<t) / |trained|      (over all micro-batches of one optimizer step)

Data: the teacher's filtered responses (`generate` stage) when the recipe names a teacher, else the `data`
stage's conversations. Engine: TRL's `SFTTrainer` fed with the renderer's ids and labels
(`posttrain.training`); full fine-tuning or LoRA (`sft.lora.enabled`; the saved model has the adapters merged in,
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

import json
import shutil
from pathlib import Path
from typing import Any

from posttrain.config import ModelSpec, Recipe, to_dict
from posttrain.data.formats import DataError
from posttrain.data.jsonl import read_jsonl
from posttrain.dist import is_main, world_size
from posttrain.outputs import StageOutput
from posttrain.training import TrainConfig


def parents(recipe: Recipe) -> list[str]:
    return ["generate"] if recipe.teacher is not None else ["data"]


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return train_stage_config(recipe, recipe.model, recipe.sft, "sft")


def train_stage_config(
    recipe: Recipe, spec: ModelSpec | None, train: TrainConfig | None, stage: str
) -> dict[str, Any]:
    """What an SFT-trained model depends on (the `sft` and `teacher` stages)."""
    return {"model": spec, "train": train, "chat": recipe.chat, "eval": recipe.eval.during_training(),
            "seed": recipe.seed_for(stage),
            "tracking": recipe.tracking.wandb}  # fmt: skip


def main(recipe: Recipe) -> Path:
    return train_stage(recipe, "sft", recipe.model, recipe.sft, stage_config(recipe), parents(recipe)[0])


def read_rows(path: Path) -> list[dict]:
    errors: list[str] = []
    rows = [row for _, row in read_jsonl(path.read_text().splitlines(), str(path), errors)]
    if errors:
        raise DataError(errors, str(path))
    return rows


def train_stage(
    recipe: Recipe, stage: str, spec: ModelSpec, cfg: TrainConfig, config: dict, source: str
) -> Path:
    """SFT of `spec` on `<run>/<source>/data/{train,eval}.jsonl` into `<run>/<stage>/` (teacher and sft)."""
    from posttrain import runner
    from posttrain.modeling import count_parameters, load_causal_lm, load_tokenizer, trains_in_bf16
    from posttrain.training import (
        finalize,
        gathered_state,
        make_trainer,
        sft_args,
        to_dataset,
        tokenize_rows,
        train_resuming,
    )

    # --- config & logging
    seed = recipe.seed_for(stage)
    parent_hashes = runner.parent_hashes(recipe, stage)
    with StageOutput(recipe.run_dir / stage, stage, config, parent_hashes, resume=True) as out:
        print(f"[{stage}] recipe {recipe.name}, config {out.hash}:\n{json.dumps(to_dict(config), indent=1)}")
        # --- data
        src = recipe.run_dir / source / "data"
        train_rows, eval_rows = read_rows(src / "train.jsonl"), read_rows(src / "eval.jsonl")
        tokenizer = load_tokenizer(spec)
        train_ex = tokenize_rows(train_rows, tokenizer, recipe.chat)
        eval_ex = tokenize_rows([r for r in eval_rows if r["messages"][-1]["role"] == "assistant"], tokenizer,
                                recipe.chat)  # fmt: skip
        n_tok = sum(len(e["input_ids"]) for e in train_ex)
        n_trained = sum(sum(x != -100 for x in e["labels"]) for e in train_ex)
        print(f"[{stage}] {len(train_ex)} training conversations from {src}: {n_tok} tokens, "
              f"{n_trained} trained ({n_trained / max(n_tok, 1):.0%})")  # fmt: skip
        # --- models
        model = load_causal_lm(spec, tokenizer, seed=seed)
        print(f"[{stage}] model: {spec.preset or spec.name_or_path}, {count_parameters(model):,} parameters")
        if world_size() > 1 and is_main():
            print(f"[{stage}] data parallel over {world_size()} processes: global batch "
                  f"{cfg.batch_size * cfg.grad_accum * world_size()}")  # fmt: skip
        evaluate = world_scorer(recipe, tokenizer, eval_rows, stage)
        before = evaluate(model)
        # --- train
        args = sft_args(cfg, out.path / "checkpoints", seed, recipe.chat.max_length, trains_in_bf16(spec.dtype),
                        recipe.tracking.wandb, f"{recipe.name}/{stage}")  # fmt: skip
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
        from posttrain.modeling import save_model

        state = gathered_state(trainer)
        if is_main():
            save_model(model, tokenizer, out.path / "model", state)
            verify_saved(out.path / "model", model, state)
            shutil.rmtree(out.path / "checkpoints", ignore_errors=True)
            report = {"before": before, "after": after, "eval_loss": eval_loss}
            (out.path / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        out.summary = {
            "train_loss": result.training_loss, "eval_loss": eval_loss, "train_rows": len(train_ex),
            "trained_tokens_per_epoch": n_trained, "parameters": count_parameters(model),
            "world_score_before": before and before["score"], "world_score": after and after["score"],
            "world_per_task": after and after["per_task"],
        }  # fmt: skip
    return out.final


def verify_saved(folder: Path, model, state: dict | None = None) -> None:
    """Every tensor of the saved model is present, non-empty and equal to the trained one (`state`: the gathered
    weights under ZeRO-3, whose saves can otherwise be empty; tied weights must stay tied)."""
    import torch
    from safetensors.torch import load_file

    saved: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        saved.update(load_file(f))
    state = state if state is not None else model.state_dict()
    missing = [k for k in state if k not in saved and not k.endswith("lm_head.weight")]
    empty = [k for k, v in saved.items() if v.numel() == 0]
    differ = [k for k, v in saved.items() if k in state and not torch.equal(v.cpu(), state[k].detach().cpu())]
    if missing or empty or differ:
        raise RuntimeError(
            f"{folder}: the saved model is not the trained one (missing {missing[:3]}, empty {empty[:3]}, "
            f"different {differ[:3]})"
        )


def world_scorer(recipe: Recipe, tokenizer, eval_rows: list[dict], stage: str):
    """model → the world evaluation (None off the built-in world), printed."""
    from posttrain.generation import world_eval

    on_world = recipe.data.source == "world" and eval_rows and all("task" in r for r in eval_rows)

    def evaluate(model) -> dict | None:
        if not on_world:
            return None
        was_training = model.training
        model.eval()
        res = world_eval(model, tokenizer, eval_rows, recipe.chat, recipe.world.assistant_name,
                         recipe.eval.max_new_tokens, recipe.eval.batch_size)  # fmt: skip
        model.train(was_training)
        print(
            f"[{stage}] world score {res['score']:.3f} "
            + " ".join(f"{t} {v:.2f}" for t, v in res["per_task"].items())
        )
        return res

    return evaluate
