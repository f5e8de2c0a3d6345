"""Supervised fine-tuning on rendered conversations, over TRL's `SFTTrainer`.

The trainer is fed the project's renderer output: `input_ids` and `labels` (the token id where the loss mask is 1,
-100 elsewhere), so what is trained is exactly what `posttrain render --pretty` shows; TRL's own chat-template
path is not used. TRL's loss is the token-mean over every trained token of all micro-batches of an optimizer step
(`num_items_in_batch`), so gradient accumulation does not change the loss scale.

Guards: every row has at least one trained token (checked before training); a micro-batch without a trained
token, or a logged step with loss 0 and a non-finite grad norm, stops the run with `TrainingError`.

Recipe names → TRL (`trl.SFTConfig`) names: steps → max_steps, batch_size → per_device_train_batch_size,
grad_accum → gradient_accumulation_steps, lr_scheduler → lr_scheduler_type, warmup_ratio → warmup_steps
(rounded), lora.* → peft.LoraConfig(r, lora_alpha, lora_dropout, target_modules). Any other `trl.SFTConfig`
field can be set under `trl:`; its keys are checked against SFTConfig's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from posttrain.data.formats import fit
from posttrain.errors import StageError

# Field metadata for a key added after runs were made whose default is the earlier behaviour: the key enters a
# stage's config hash only when set to something else, so that finished stages stay valid (`config_hash`).
IF_SET = {"hash": "if_set"}


class TrainingError(StageError):
    """Training produced something that must not be saved (no trained tokens, a NaN, …)."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA adapters (peft). The saved `model/` is the merged full model; the adapter is kept in `adapter/`."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )

    def problems(self) -> list[str]:
        out = [] if self.r >= 1 else [f"lora.r: {self.r} must be at least 1"]
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora.dropout: {self.dropout} must be in [0, 1)")
        return out


@dataclass(frozen=True)
class TrainConfig:
    """One SFT run. The global batch is batch_size × grad_accum × number of processes.

    steps: optimizer steps. save_steps: checkpoint period (a killed run resumes from the last one).
    logging_steps: one console line and one metrics.jsonl row per this many steps. eval_steps: eval loss on the
    evaluation split every this many steps (0: at the end only). trl: extra `trl.SFTConfig` fields.
    length_buckets (SFT stages and rm): each step's batch — the same randomly drawn examples — is cut into this
    many micro-batches of similar length, each padded only to its own longest row; the loss is still the token
    mean (rm: the pair mean) over the whole batch, so only the padding changes (transformers' `batch_rebalance`
    sampler, seeded by the stage's seed). Sorting whole batches by length instead (`group_by_length`) makes a
    batch one task family.
    """

    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    learning_rate: float = 2e-5
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    packing: bool = False
    length_buckets: int = field(default=1, metadata=IF_SET)
    gradient_checkpointing: bool = False
    save_steps: int = 200
    logging_steps: int = 10
    eval_steps: int = 0
    lora: LoraSpec = field(default_factory=LoraSpec)
    trl: dict[str, Any] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        for k in ("steps", "batch_size", "grad_accum", "save_steps", "logging_steps", "length_buckets"):
            if getattr(self, k) < 1:
                out.append(f"{k}: {getattr(self, k)} must be at least 1")
        if self.eval_steps < 0:
            out.append(f"eval_steps: {self.eval_steps} must be 0 (end only) or positive")
        if not self.learning_rate > 0:
            out.append(f"learning_rate: {self.learning_rate} must be positive")
        if not 0.0 <= self.warmup_ratio < 1.0:
            out.append(f"warmup_ratio: {self.warmup_ratio} must be in [0, 1)")
        if self.length_buckets > 1:
            if self.batch_size % self.length_buckets:
                out.append(
                    f"length_buckets: {self.length_buckets} must divide batch_size ({self.batch_size})"
                )
            if self.packing:
                out.append("length_buckets: packed rows have no padding to save; set length_buckets: 1")
            if "train_sampling_strategy" in self.trl:
                out.append("trl.train_sampling_strategy: length_buckets sets it; leave one of them out")
        out += trl_key_problems(self.trl)
        return out


# Fields the stage sets itself; setting them under `trl:` would silently fight the recipe's own keys.
_OWNED = {
    "output_dir", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
    "lr_scheduler_type", "warmup_steps", "weight_decay", "max_grad_norm", "packing", "gradient_checkpointing",
    "activation_checkpointing",
    "save_steps", "logging_steps", "eval_steps", "seed", "bf16", "fp16", "use_cpu", "report_to", "max_length",
}  # fmt: skip


def trl_key_problems(extra: dict[str, Any]) -> list[str]:
    import trl

    names = {f.name for f in dataclasses.fields(trl.SFTConfig)}
    out = []
    for k in extra:
        if k in _OWNED:
            out.append(f"trl.{k}: set by the recipe's own key; set that instead")
        elif k not in names:
            close = difflib.get_close_matches(k, sorted(names), n=1)
            out.append(
                f"trl.{k}: not a trl.SFTConfig field" + (f"; did you mean {close[0]!r}?" if close else "")
            )
    return out


# ---------------------------------------------------------------------------------------------------- data


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


# ---------------------------------------------------------------------------------------------------- trainer


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
        save_total_limit=2,
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
                from posttrain.errors import Stopped

                raise Stopped(
                    f"stopped by SIGTERM at step {state.global_step}; checkpoint saved in {where}; "
                    "rerun the same command to resume from it"
                )

    return StopOnSigterm()


def train_resuming(trainer, checkpoints: Path, metrics: Path, label: str, resume: bool = True):
    """`trainer.train()` from the last complete checkpoint in `checkpoints` (when `resume`), after dropping the
    rows of `metrics` logged past it; on SIGTERM the step in progress ends, a checkpoint is saved and `Stopped`
    is raised. Returns the train output."""
    from posttrain.outputs import trim_metrics

    ckpt = last_checkpoint(checkpoints) if resume else None
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


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete `checkpoint-N` (trainer state and weights present) under `folder`, else None."""
    best = None
    for p in folder.glob("checkpoint-*"):
        try:
            n = int(p.name.split("-")[-1])
        except ValueError:
            continue
        complete = (p / "trainer_state.json").exists() and any(p.glob("*.safetensors"))
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
