"""TRL's `DistillationTrainer` as the `distill` stage uses it: prompts from the prompt table
(`posttrain.engines.rollouts`), and a share `1 − on_policy_fraction` of generation batches answered with the
teacher's own responses instead of the student's samples (GKD's mix; TRL's trainer is on-policy only). The loss
is TRL's (chunked, soft-capped); tests/test_distill.py checks it against `posttrain.distill`.

Recipe names → TRL (`trl.DistillationConfig`) names: divergence → beta (`posttrain.distill.beta_of`).
"""

from __future__ import annotations

import random

from posttrain.config import ConfigError
from posttrain.engines.rollouts import RenderedPrompts


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


def mixed_policy_trainer(base: type) -> type:
    """`base` (TRL's DistillationTrainer) with prompts rendered by `posttrain.chat` from a table of row ids, and a
    share `1 − on_policy_fraction` of generation batches answered with the teacher's fixed responses."""

    class MixedPolicyDistillation(RenderedPrompts, base):
        def setup(self, table: dict[str, dict], on_policy_fraction: float, seed: int) -> None:
            self.use_table(table)
            self._fraction = on_policy_fraction
            self._rng = random.Random(seed)
            self._by_prompt = {tuple(v["prompt_ids"]): v["fixed_ids"] for v in table.values()}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            fixed = [self._by_prompt.get(tuple(p)) for p in prompt_ids]
            if self._rng.random() < self._fraction or not all(fixed):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            return [list(f) for f in fixed]

    return MixedPolicyDistillation
