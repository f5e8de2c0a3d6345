"""TRL's `DistillationTrainer` as the `distill` stage uses it: prompts from the prompt table
(`posttrain.engines.rollouts`), and a share `1 − on_policy_fraction` of generation batches answered with the
teacher's own responses instead of the student's samples (GKD's mix; TRL's trainer is on-policy only). The loss
is TRL's (chunked, soft-capped); tests/test_distill.py checks it against `posttrain.distill`. With
`distill.train_until_teacher_below` each response is trained only through its first token the teacher finds
unlikely (through TRL's `tool_mask`, which multiplies the completion mask), and the trained share is logged; the
teacher's fixed responses of off-policy batches pass through the same cut (the teacher finds them likely).

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
        def setup(
            self, table: dict[str, dict], on_policy_fraction: float, seed: int, until_below: float = 0.0
        ) -> None:
            self.use_table(table)
            self._fraction = on_policy_fraction
            self._until_below = until_below
            self._rng = random.Random(seed)
            self._by_prompt = {tuple(v["prompt_ids"]): v["fixed_ids"] for v in table.values()}

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
            fixed = [self._by_prompt.get(tuple(p)) for p in prompt_ids]
            if self._rng.random() < self._fraction or not all(fixed):
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
            return [list(f) for f in fixed]

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if not self._until_below:
                return output
            keep = self._until_unlikely(output)
            output["tool_mask"] = keep  # TRL trains completion_mask × tool_mask
            kept = self.accelerator.gather((output["completion_mask"] * keep).sum()).sum()
            output["num_items_in_batch"] = kept
            mode = "train" if self.model.training else "eval"
            share = kept / self.accelerator.gather(output["completion_mask"].sum()).sum().clamp(min=1)
            self._metrics[mode]["trained_token_share"].append(share.item())
            return output

        def _until_unlikely(self, output):
            """(B, C) 1 up to and including each completion's first token the teacher gives probability below
            `until_below` (its own distribution, temperature 1), 0 after it (1 throughout a completion the teacher
            finds likely everywhere). The teacher reads one micro-batch at a time, as in TRL's loss."""
            import torch

            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            step = self.args.per_device_train_batch_size
            parts = []
            with torch.no_grad():
                for b in range(0, ids.shape[0], step):
                    parts.append(self._forward_redirection(
                        self.teacher_model, teacher, completion_token_logps, teacher, ids[b : b + step],
                        mask[b : b + step], output["completion_ids"][b : b + step],
                    ))  # fmt: skip
            return until_unlikely(torch.cat(parts), output["completion_mask"], self._until_below)

    return MixedPolicyDistillation


def completion_token_logps(model, input_ids, attention_mask, completion_ids):
    """log p(token) of each completion token (B, C) under a causal LM, its final logit soft-cap applied, projected
    a tile at a time (`posttrain.logits`); under ZeRO-3 the output projection is gathered for the projection."""
    from posttrain.logits import backbone, lm_head, token_logps
    from posttrain.modeling import gathered

    c = completion_ids.shape[1]
    hidden = backbone(model)(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    hidden = hidden[:, -c - 1 : -1]  # position t predicts token t + 1
    weight, cap = lm_head(model)
    with gathered(model.get_output_embeddings()):
        flat = token_logps(hidden.reshape(-1, hidden.shape[-1]), weight, completion_ids.reshape(-1), cap)
    return flat.view(completion_ids.shape)


def until_unlikely(logps, completion_mask, below: float):
    """(B, C) token log-probs → (B, C) long mask: 1 through the first real token with probability < `below`
    (inclusive), 0 after; 1 throughout where there is none."""
    import math

    unlikely = (logps < math.log(below)) & completion_mask.bool()
    before = unlikely.long().cumsum(-1) - unlikely.long()  # unlikely tokens strictly before each position
    return (before == 0).long()
