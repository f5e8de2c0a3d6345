"""TRL's `RLOOTrainer` as the `rlhf` stage uses it: prompts from the prompt table (`posttrain.engines.rollouts`),
the reward read by the RM as it was trained (or the world's verifiers), and the k3 KL estimate logged beside TRL's
k1. The objective is `posttrain.rl`'s; tests/test_rl.py checks TRL's steps against it.

Recipe names → TRL (`trl.RLOOConfig`) names: kl_coef → beta, samples_per_prompt → num_generations, anchor: ema →
sync_ref_model with ref_model_mixup_alpha = ema_rate and ref_model_sync_steps = 1.
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
    return dict(beta=cfg.kl_coef, num_generations=cfg.samples_per_prompt, sync_ref_model=cfg.anchor == "ema",
                ref_model_mixup_alpha=cfg.ema_rate, ref_model_sync_steps=1)  # fmt: skip


def reward_function(rm, tokenizer, table: dict[str, dict], assistant_name: str, max_new_tokens: int) -> Any:
    """A TRL reward function: the RM's score of each (prompt, response), as `posttrain.rl.scored_sequence`; with
    no RM (`rlhf.reward: world`) the world's verifier score of the response (a truncated one scores 0)."""
    if rm is None:
        stops = stop_ids(tokenizer)

        def world_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
            gens = [decode(list(ids), tokenizer, stops, max_new_tokens) for ids in completion_ids]
            return [
                0.0 if g.truncated or g.malformed else world.score(table[p]["row"], g.text, assistant_name)
                for p, g in zip(prompts, gens)
            ]

        return world_reward

    def rm_reward(prompts, completions, completion_ids, **kwargs) -> list[float]:
        seqs = [
            scored_sequence(table[p]["prompt_ids"], ids, tokenizer) for p, ids in zip(prompts, completion_ids)
        ]
        return score_ids(rm, seqs, tokenizer.pad_token_id)

    return rm_reward


def rloo_trainer(base: type) -> type:
    """`base` (TRL's RLOOTrainer) with prompts rendered by `posttrain.chat` from a table of row ids, and the k3 KL
    estimate logged beside TRL's k1."""

    class RLOO(RenderedPrompts, base):
        def setup(self, table: dict[str, dict]) -> None:
            self.use_table(table)
            self._logps = {}

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
