"""TRL's `RLOOTrainer` as the `rlhf` stage uses it: prompts from the prompt table (`posttrain.engines.rollouts`),
the reward read by the RM as it was trained (or the world's verifiers), and the k3 KL estimate logged beside TRL's
k1. The objective is `posttrain.rl`'s; tests/test_rl.py checks TRL's steps against it.

Recipe names → TRL (`trl.RLOOConfig`) names: kl_coef → beta, samples_per_prompt → num_generations, anchor: ema →
sync_ref_model with ref_model_mixup_alpha = ema_rate, ref_model_sync_steps = ema_sync_steps, and with ema_dtype
fp32 the reference TRL builds is loaded in fp32 (`model_init_kwargs`, which TRL uses for it when the policy is
passed as a model).
"""

from __future__ import annotations

from typing import Any

from posttrain import world
from posttrain.chat import stop_ids
from posttrain.config import RLConfig
from posttrain.engines.rollouts import RenderedPrompts
from posttrain.generation import decode
from posttrain.reward import score_ids
from posttrain.rl import kl_estimates, scored_sequence


def rloo_extra(cfg: RLConfig) -> dict[str, Any]:
    """The `trl.RLOOConfig` fields of an RL run beyond the shared rollout ones."""
    extra = dict(beta=cfg.kl_coef, num_generations=cfg.samples_per_prompt, sync_ref_model=cfg.anchor == "ema",
                 ref_model_mixup_alpha=cfg.ema_rate, ref_model_sync_steps=cfg.ema_sync_steps)  # fmt: skip
    if cfg.anchor == "ema" and cfg.ema_dtype == "fp32":
        extra["model_init_kwargs"] = {"dtype": "float32"}
    return extra


def reward_function(rm, tokenizer, table: dict[str, dict], assistant_name: str, max_new_tokens: int) -> Any:
    """A TRL reward function: the RM's score of each (prompt, response), as `posttrain.rl.scored_sequence`; with
    no RM (`rlhf.reward: world`) the world's verifier score of the response (a truncated one scores 0)."""
    return RMReward(rm, tokenizer, table) if rm is not None else WorldReward(tokenizer, table, assistant_name,
                                                                             max_new_tokens)  # fmt: skip


class RMReward:
    """The RM's score of each sampled response. `model` may be replaced by the same RM prepared for DeepSpeed
    inference once the trainer exists (`RLOO.use_reward_model`)."""

    __name__ = "rm_reward"  # the name TRL logs the reward under

    def __init__(self, model, tokenizer, table: dict[str, dict]):
        self.model, self.tokenizer, self.table = model, tokenizer, table

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        seqs = [scored_sequence(self.table[p]["prompt_ids"], ids, self.tokenizer)
                for p, ids in zip(prompts, completion_ids)]  # fmt: skip
        return score_ids(self.model, seqs, self.tokenizer.pad_token_id)


class WorldReward:
    """The world's verifiers: 1 for a right response, 0 for a wrong, truncated or malformed one."""

    __name__ = "world_reward"

    def __init__(self, tokenizer, table: dict[str, dict], assistant_name: str, max_new_tokens: int):
        self.tokenizer, self.table, self.name, self.max_new = tokenizer, table, assistant_name, max_new_tokens
        self.stops = stop_ids(tokenizer)

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float]:
        gens = [decode(list(ids), self.tokenizer, self.stops, self.max_new) for ids in completion_ids]
        return [
            0.0 if g.truncated or g.malformed else world.score(self.table[p]["row"], g.text, self.name)
            for p, g in zip(prompts, gens)
        ]


def rloo_trainer(base: type) -> type:
    """`base` (TRL's RLOOTrainer) with prompts rendered by `posttrain.chat` from a table of row ids, and the k3 KL
    estimate logged beside TRL's k1."""

    class RLOO(RenderedPrompts, base):
        def setup(self, table: dict[str, dict]) -> None:
            self.use_table(table)
            self._logps = {}

        def use_reward_model(self, model) -> None:
            """Score with `model` (the RM prepared for ZeRO-3 inference once the trainer's accelerator exists)."""
            for f in self.reward_funcs:
                if isinstance(f, RMReward):
                    f.model = model

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
