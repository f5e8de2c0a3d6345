"""Trainer glue that every training stage shares, over TRL's trainers (which are `transformers.Trainer`s).

- `trainer_args`: the recipe's `TrainConfig` as TrainingArguments (names: steps → max_steps, batch_size →
  per_device_train_batch_size, grad_accum → gradient_accumulation_steps, lr_scheduler → lr_scheduler_type,
  warmup_ratio → warmup_steps, rounded); each stage builds its own TRL config class from them.
- one fixed-format console line per logged step, the same row into `metrics.jsonl` (`use_step_lines`); a tracker
  that fails never stops training (`safe_wandb`);
- resume from the last complete checkpoint, and a checkpoint on SIGTERM (`train_resuming`);
- the end of every training stage (`save_trained`): under ZeRO-3 every process helps gather the weights, the main
  process saves the model, reads it back to check it is the trained one, and deletes the checkpoints.

Guards: a logged step with loss 0 and a non-finite grad norm, or a non-finite loss, stops the run with
`TrainingError`.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.chat import chat_template
from posttrain.config import ChatConfig, TrainConfig
from posttrain.dist import is_main
from posttrain.errors import StageError, Stopped
from posttrain.outputs import trim_metrics


class TrainingError(StageError):
    """Training produced something that must not be saved (no trained tokens, a NaN, …)."""


def trainer_args(cfg: TrainConfig, out_dir: Path, seed: int, bf16: bool, wandb: bool, run_name: str) -> dict:
    """The TrainingArguments every stage's trainer shares, from the recipe's `TrainConfig`."""
    import torch

    return dict(
        output_dir=str(out_dir),
        max_steps=cfg.steps,
        # length_buckets: the batch's rows are drawn together, then cut into micro-batches of similar length
        per_device_train_batch_size=cfg.batch_size // cfg.length_buckets,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum * cfg.length_buckets,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=int(round(cfg.warmup_ratio * cfg.steps)),
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        activation_checkpointing=cfg.gradient_checkpointing,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.keep_checkpoints,
        save_only_model=not cfg.save_optimizer,
        logging_steps=cfg.logging_steps,
        eval_strategy="steps" if cfg.eval_steps else "no",
        eval_steps=cfg.eval_steps or None,
        seed=seed,
        data_seed=seed,
        bf16=bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to=["wandb"] if wandb else [],
        run_name=run_name,
        **({"train_sampling_strategy": "batch_rebalance"} if cfg.length_buckets > 1 else {}),
    )


def use_step_lines(trainer, log: Callable[[dict], None], total: int) -> None:
    """Replace the trainer's progress callback by `step_lines`, and its wandb callback (`tracking.wandb`) by one
    whose failure never stops training."""
    from transformers.integrations import WandbCallback
    from transformers.trainer_callback import ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(step_lines(log, total))
    if trainer.pop_callback(WandbCallback) is not None:
        tracker = safe_wandb()
        if tracker is not None:
            trainer.add_callback(tracker)


def tracking_env(tracking, group: str, stage: str, run_dir: Path) -> None:
    """wandb settings for this stage's process: one run per stage (`run_name` of the trainer), grouped by the
    recipe run, offline (kept in `<run_dir>/wandb/`, `wandb sync` uploads it) unless `tracking.mode: online`.
    A `WANDB_MODE` or `WANDB_DIR` already in the environment wins."""
    import os

    if not tracking.wandb:
        return
    os.environ.setdefault("WANDB_MODE", tracking.mode)
    os.environ["WANDB_PROJECT"] = tracking.project
    os.environ["WANDB_RUN_GROUP"] = group
    os.environ["WANDB_JOB_TYPE"] = stage
    if "WANDB_DIR" not in os.environ:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ["WANDB_DIR"] = str(run_dir)


def safe_wandb():
    """transformers' WandbCallback, except that an error in it (no server, no API key, a full disk) prints one
    warning and turns tracking off for the rest of the run instead of stopping training. None when wandb is not
    installed."""
    import sys

    from transformers.integrations import WandbCallback

    def warn(e: Exception) -> None:
        print(f"[tracking] wandb failed, training goes on without it: {type(e).__name__}: {e}", file=sys.stderr,
              flush=True)  # fmt: skip

    class SafeWandb(WandbCallback):
        failed = False

    def guard(name: str):
        base = getattr(WandbCallback, name)

        def method(self, *args, **kwargs):
            if self.failed:
                return None
            try:
                return base(self, *args, **kwargs)
            except Exception as e:  # a tracker must never end a training run
                self.failed = True
                warn(e)
                return None

        return method

    for name in ["setup", *(n for n in vars(WandbCallback) if n.startswith("on_"))]:
        setattr(SafeWandb, name, guard(name))
    end = SafeWandb.on_train_end

    def on_train_end(
        self, args, state, control, **kwargs
    ):  # one wandb run per training run (rlhf has several)
        end(self, args, state, control, **kwargs)
        if not self.failed and state.is_world_process_zero and self._wandb.run is not None:
            try:
                self._wandb.finish()
            except Exception as e:
                self.failed = True
                warn(e)

    SafeWandb.on_train_end = on_train_end
    try:
        return SafeWandb()
    except Exception as e:  # wandb missing or broken
        warn(e)
        return None


def stop_on_sigterm():
    """A callback that installs a SIGTERM handler: at the end of the step in progress the trainer saves a
    checkpoint and stops; `raise_if_stopped` then ends the stage with `Stopped` (exit 75)."""
    import signal

    from transformers import TrainerCallback

    class StopOnSigterm(TrainerCallback):
        def __init__(self):
            self.requested = False
            signal.signal(signal.SIGTERM, self._request)

        def _request(self, signum, frame) -> None:
            self.requested = True

        def on_step_end(self, args, state, control, **kwargs):
            if self.requested:
                control.should_save = True
                control.should_training_stop = True

        def raise_if_stopped(self, state, where: Path) -> None:
            if self.requested:
                raise Stopped(
                    f"stopped by SIGTERM at step {state.global_step}; checkpoint saved in {where}; "
                    "rerun the same command to resume from it"
                )

    return StopOnSigterm()


def train_resuming(trainer, checkpoints: Path, metrics: Path, label: str, resume: bool = True):
    """`trainer.train()` from the last complete checkpoint in `checkpoints` (when `resume`), after dropping the
    rows of `metrics` logged past it; on SIGTERM the step in progress ends, a checkpoint is saved and `Stopped`
    is raised. Returns the train output."""
    ckpt = last_checkpoint(checkpoints) if resume else None
    if resume and ckpt is None and last_checkpoint(checkpoints, weights_only=True) is not None:
        print(f"[{label}] the checkpoints in {checkpoints} hold no optimizer state (save_optimizer: false): "
              "training starts over")  # fmt: skip
    if ckpt is not None:
        step = int(ckpt.name.split("-")[-1])
        print(f"[{label}] resuming from {ckpt} (step {step})")
        trim_metrics(metrics, step)
    stopper = stop_on_sigterm()
    trainer.add_callback(stopper)
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    stopper.raise_if_stopped(trainer.state, checkpoints)
    return result


def world_eval_callback(evaluate: Callable[[Any], dict | None], every: int, log: Callable[[dict], None]):
    """A callback: every `every` optimizer steps (not the last), `evaluate(model)`'s score as a metrics row."""
    from transformers import TrainerCallback

    class WorldEval(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0 and state.global_step < state.max_steps and model is not None:
                res = evaluate(model)
                if res is not None:
                    log({"step": state.global_step, "world_score": res["score"],
                         **{f"world/{t}": v for t, v in res["per_task"].items()}})  # fmt: skip

    return WorldEval()


def step_lines(log: Callable[[dict], None], total: int):
    """A callback: the progress bar (with ETA) of transformers' ProgressCallback, but each log is one
    fixed-format line, also written to metrics.jsonl through `log`; a loss of 0 with a non-finite grad norm,
    or a non-finite loss, stops the run."""
    from transformers.trainer_callback import ProgressCallback

    class StepLines(ProgressCallback):
        def __init__(self):
            super().__init__()
            self._t0, self._tokens0 = time.time(), 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            row = check_log(state.global_step, dict(logs or {}))
            if "num_tokens" in row:
                row["tok_per_s"] = (row["num_tokens"] - self._tokens0) / max(time.time() - self._t0, 1e-9)
                self._t0, self._tokens0 = time.time(), row["num_tokens"]
            log(row)
            line = format_line(row, total)
            if self.training_bar is not None:
                self.training_bar.write(line)
            elif state.is_world_process_zero:
                print(line, flush=True)

    return StepLines()


def check_log(step: int, logs: dict) -> dict:
    """The numeric entries of a trainer log as a metrics row; raises TrainingError on a degenerate step."""
    loss, gn = logs.get("loss"), logs.get("grad_norm")
    if loss is not None and loss == 0.0 and gn is not None and not math.isfinite(gn):
        raise TrainingError(
            f"step {step}: loss 0.0 with grad norm {gn} — no token was trained; check lengths and masks"
        )
    if loss is not None and not math.isfinite(loss):
        raise TrainingError(f"step {step}: loss is {loss}; lower the learning rate or check the data")
    return {"step": step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}


def format_line(row: dict, total: int) -> str:
    """`step 12/500 | loss 0.412 | lr 1.0e-06 | tok/s 5.1k` — fixed keys first, the rest after."""
    parts = [f"step {row.get('step', '?')}/{total}"]
    names = {"loss": "loss", "eval_loss": "eval_loss", "reward": "reward", "reward_std": "reward_std", "kl": "kl",
             "kl_k3": "kl_k3", "entropy": "entropy", "completions/mean_length": "len",
             "completions/clipped_ratio": "trunc", "grad_norm": "grad_norm", "mean_token_accuracy": "acc",
             "learning_rate": "lr", "tok_per_s": "tok/s"}  # fmt: skip
    for key, label in names.items():
        if key in row:
            v = row[key]
            if key == "learning_rate":
                parts.append(f"{label} {v:.1e}")
            elif key == "tok_per_s":
                parts.append(f"{label} {v / 1000:.1f}k" if v >= 1000 else f"{label} {v:.0f}")
            else:
                parts.append(f"{label} {v:.4g}")
    return " | ".join(parts)


def last_checkpoint(folder: Path, weights_only: bool = False) -> Path | None:
    """The newest complete `checkpoint-N` under `folder` — trainer state, weights and the optimizer state
    (`optimizer.pt`, or DeepSpeed's `global_step*/`) present, or without the optimizer state with `weights_only`
    (what `save_optimizer: false` writes) — else None."""
    best = None
    for p in folder.glob("checkpoint-*"):
        try:
            n = int(p.name.split("-")[-1])
        except ValueError:
            continue
        optimizer = (p / "optimizer.pt").exists() or any(p.glob("global_step*"))
        complete = (
            (p / "trainer_state.json").exists()
            and any(p.glob("*.safetensors"))
            and (optimizer or weights_only)
        )
        if complete and (best is None or n > best[0]):
            best = (n, p)
    return best[1] if best else None


def gathered_state(trainer) -> dict | None:
    """Under DeepSpeed ZeRO-3 each process holds a shard of the weights: every process takes part in gathering
    them and the main one gets the whole state dict (`zero3_save_16bit_model: true` in the launcher). None
    otherwise: the model's own weights are whole."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def end_zero3() -> None:
    """After a ZeRO-3 trainer is done: models loaded from now on load whole, not partitioned by DeepSpeed's
    zero.Init (the stage's next run loads its fixed models before its own trainer exists)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def finalize(trainer, cfg: TrainConfig):
    """The trained model as a plain transformers model (LoRA adapters merged in)."""
    model = trainer.model
    if cfg.lora.enabled:
        model = model.merge_and_unload()
    model.eval()
    return model


def frozen_for_inference(model, trainer):
    """A frozen model used beside a trainer (the RM in RL, a fixed reference): under DeepSpeed prepared by TRL's
    `prepare_deepspeed` — with ZeRO-3 it stays partitioned and its forward gathers a layer at a time; with ZeRO-2
    or less it is whole on each GPU — else returned as it is. None stays None."""
    if model is None or not getattr(trainer, "is_deepspeed_enabled", False):
        return model
    from trl.models.utils import prepare_deepspeed

    return prepare_deepspeed(model, trainer.accelerator)


def save_trained(
    trainer, model, tokenizer, folder: Path, checkpoints: Path | None = None, *, chat: ChatConfig
) -> bool:
    """The end of a training run: under DeepSpeed ZeRO-3 every process takes part in gathering the weights; the
    main process saves `model` (the trained one, `finalize`d) with its tokenizer, whose chat template renders what
    training rendered with `chat.system` (`posttrain.chat.chat_template`), into `folder`, reads it back to check
    that it holds the trained weights (ZeRO-3 can save empty ones) and deletes `checkpoints`. Models loaded
    afterwards load whole (`end_zero3`). Returns whether this process saved (the main one)."""
    from posttrain.modeling import save_model, verify_saved  # torch and transformers: only where a model is

    state = gathered_state(trainer)
    end_zero3()
    if not is_main():
        return False
    save_model(model, tokenizer, folder, state, chat_template(chat.system))
    verify_saved(folder, model, state)
    if checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    return True
