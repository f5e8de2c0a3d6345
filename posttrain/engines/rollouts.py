"""What TRL's two rollout trainers share here — `RLOOTrainer` (the `rlhf` stage) and `DistillationTrainer` (the
`distill` stage): prompts rendered by `posttrain.chat` (one `<bos>`, the generation prompt) and looked up by row
id instead of TRL's chat template, their sampling settings (plain temperature: no top-k, no top-p, so the sampled
distribution is the one scored), and prompts drawn per task family.

Recipe names → TRL names: temperature → temperature, max_new_tokens → max_completion_length, and `trainer_args`'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.config import TrainConfig
from posttrain.data.sources import balanced_prompts
from posttrain.engines.trainer import trainer_args
from posttrain.generation import prompt_ids


def prompt_table(
    rows: list[dict], tokenizer: Any, chat: Any, max_new: int, fixed: bool = False
) -> dict[str, dict]:
    """Row id → {"prompt_ids", "row": {"task", "answer"} (what the world's verifiers read)}, the prompt rendered
    with the generation prompt and cut to leave `max_new` tokens; with `fixed`, also "fixed_ids": the row's own
    final model turn and its `<end_of_turn>`, at most `max_new` tokens (the teacher's response, for distillation's
    off-policy batches)."""
    from posttrain.chat import render

    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    table = {}
    for i, r in enumerate(rows):
        key = str(r.get("id", i))
        p = prompt_ids(r["messages"], tokenizer, chat, max_new, key)
        entry = {"prompt_ids": p, "row": {k: r[k] for k in ("task", "answer") if k in r}}
        if fixed:
            full = render(r["messages"], tokenizer, system=chat.system, where=key).input_ids
            response = full[len(p) :] if full[: len(p)] == p else []
            cut = response.index(end) + 1 if end in response else len(response)
            entry["fixed_ids"] = response[: min(cut, max_new)]
        table[key] = entry
    return table


def prompt_keys(table: dict[str, dict], balance_tasks: bool, seed: int) -> list[str]:
    """The training dataset's prompts (row ids): every row once, or with `balance_tasks` every task family equally
    often, the rarer ones repeated."""
    keys = list(table)
    if balance_tasks:
        keys = balanced_prompts({k: table[k]["row"].get("task") for k in keys}, seed)
    return keys


def rollout_args(config_class: type, train: TrainConfig, folder: Path, seed: int, bf16: bool, wandb: bool,
                 run_name: str, temperature: float, max_new_tokens: int, **extra: Any):  # fmt: skip
    """A TRL rollout trainer's config (`config_class`: `trl.RLOOConfig`, `trl.DistillationConfig`): the shared
    training arguments, plain-temperature sampling, checkpoints in `folder/checkpoints`, the stage's own `extra`
    fields and the recipe's `trl:` keys; no evaluation loop (the stage evaluates with the world's verifiers)."""
    args = config_class(
        **trainer_args(train, folder / "checkpoints", seed, bf16, wandb, run_name),
        temperature=temperature, top_p=1.0, top_k=0, max_completion_length=max_new_tokens,
        gradient_checkpointing=train.gradient_checkpointing, **extra, **train.trl,
    )  # fmt: skip
    args.eval_strategy = "no"
    return args


def engine_fields(engine: str, vllm_mode: str, stage: str) -> dict[str, Any]:
    """TRL's names for how a rollout trainer samples: `use_vllm` (the stage's `engine`, `auto` resolved here, in
    the stage's process) and `vllm_mode`; the stage log says which."""
    from posttrain.dist import is_main
    from posttrain.generation import use_vllm

    vllm = use_vllm(engine, f"{stage}.engine")
    if is_main():
        how = (
            f"vllm (TRL's vLLM integration, {vllm_mode})" if vllm else "hf (HF generate inside TRL's trainer)"
        )
        print(f"[{stage}] sampling engine: {how}; {stage}.engine: {engine}", flush=True)
    return {"use_vllm": True, "vllm_mode": vllm_mode} if vllm else {"use_vllm": False}


class RenderedPrompts:
    """Mixed into a TRL rollout trainer: the dataset's `prompt` column holds row ids, each tokenised as the
    prompt table rendered it (`prompt_table`), set with `use_table` before training."""

    _table: dict[str, dict]

    def use_table(self, table: dict[str, dict]) -> None:
        self._table = table

    def _tokenize_prompts(self, prompts: list):
        return [list(self._table[p]["prompt_ids"]) for p in prompts], None, {}
