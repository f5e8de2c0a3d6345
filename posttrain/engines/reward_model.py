"""TRL's `RewardTrainer` as the `rm` stage uses it, and the held-out figures of its quality gate.

Pairs are tokenised by the renderer (`tokenize_pairs`: only the final model turn is the response); the loss is
`posttrain.reward.bt_loss` on rewards read at the last real token from the attention mask (TRL reads the model's
pooled output, which searches for the pad id). With `length_buckets` each step's pairs are cut into micro-batches
of similar length (a pair's two sides together), each micro-batch's loss weighted by its share of the step's
pairs, so that the step's gradient is the mean over all of them as without buckets.

Recipe names → TRL (`trl.RewardConfig`) names: those of `trainer_args`; margin and center_rewards_coefficient
enter `bt_loss` directly.
"""

from __future__ import annotations

from typing import Any

from posttrain.chat import START
from posttrain.config import ModelSpec, Recipe
from posttrain.data.formats import DataError, fit, pair_sides
from posttrain.engines.trainer import trainer_args, use_step_lines
from posttrain.errors import StageError
from posttrain.logits import unwrapped
from posttrain.modeling import trains_in_bf16
from posttrain.reward import (
    bt_loss,
    gate_metrics,
    last_token_rewards,
    likelihood_target_loss,
    likelihood_targets,
    lm_response_logps,
    score_parts,
)


def tokenize_pairs(pairs: list[dict], tokenizer, chat) -> tuple[list[dict], list[str]]:
    """Preference rows → {"chosen_ids", "rejected_ids", "len_chosen", "len_rejected", "task", "chosen_gold"};
    ids of pairs too long. Each kept example carries its pair's labels, so figures stay aligned after drops."""
    out, dropped = [], []
    for p in pairs:
        chosen, rejected = (
            fit(side, tokenizer, chat, p.get("id", "?"), train_on="last") for side in pair_sides(p)
        )
        if chosen is None or rejected is None:
            dropped.append(p.get("id", "?"))
            continue
        # only the final turn is trained and a fitted render keeps it whole: its mask counts the response tokens
        out.append({"id": p.get("id", "?"), "chosen_ids": chosen.input_ids, "rejected_ids": rejected.input_ids,
                    "len_chosen": sum(chosen.loss_mask), "len_rejected": sum(rejected.loss_mask),
                    "span_chosen": _span(chosen.loss_mask), "span_rejected": _span(rejected.loss_mask),
                    "task": p.get("task") or "?", "chosen_gold": bool(p.get("chosen_gold"))})  # fmt: skip
    return out, dropped


def check_model_turns(examples: list[dict], tokenizer) -> list[int]:
    """The final model turn's header as token ids (`<start_of_turn>model\\n`), checked to open every pair side's
    response as the template tokenised it — the likelihood term and targets find the response by it. Refused under
    DeepSpeed ZeRO-3 (they read the tied embeddings outside their module, where ZeRO-3 partitions them)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise StageError(
            "rm.likelihood_weight and rm.likelihood_targets are not supported under DeepSpeed ZeRO-3; run the rm "
            "stage with ZeRO-2 or DDP (e.g. `launchers: {rm: zero2}`) or set them to 0"
        )
    prefix = tokenizer.encode(f"{START}model\n", add_special_tokens=False)
    k = len(prefix)
    for e in examples:
        for side in ("chosen", "rejected"):
            start = e[f"span_{side}"][0]
            if e[f"{side}_ids"][start - k : start] != prefix:
                raise DataError([f"rm: pair {e['id']}: the {side} response does not follow the model-turn header "
                                 f"{prefix} as tokenised on its own; rm.likelihood_weight cannot find responses "
                                 "with this tokenizer — set it to 0"])  # fmt: skip
    return prefix


def _span(mask: list[int]) -> tuple[int, int]:
    """[start, end) of the trained final turn (one contiguous run of 1s: only the last turn is trained)."""
    start = mask.index(1)
    return start, start + sum(mask)


def reward_args(recipe: Recipe, folder: Any):
    """TRL's RewardConfig for the stage, checkpoints in `folder/checkpoints`."""
    import trl

    cfg = recipe.rm
    bf16 = trains_in_bf16((recipe.reward_model or ModelSpec()).dtype)
    common = trainer_args(cfg.train, folder / "checkpoints", recipe.seed_for("rm"), bf16, recipe.tracking.wandb,
                          f"{recipe.name}/rm")  # fmt: skip
    return trl.RewardConfig(**common, max_length=None, **cfg.train.trl)


def pair_loss(model, inputs: dict, cfg, targets=None):
    """A micro-batch's loss: `bt_loss` on the rewards read at the last real token (chosen sides first), plus
    `rm.likelihood_targets` × `likelihood_target_loss` when `targets` (frozen LM, model-turn prefix) is given
    (`posttrain.stages.rm.build_model` gives them exactly when that weight is set).
    → (loss, r_chosen, r_rejected, the targets' distance as a float or None)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rewards, scores = last_token_rewards(model, ids, mask, per_position=True)
    r_c, r_r = rewards.chunk(2)
    loss, _ = bt_loss(r_c, r_r, inputs.get("margin", cfg.margin or None), cfg.center_rewards_coefficient)
    if targets is None:
        return loss, r_c, r_r, None
    lm, prefix = targets
    distance = likelihood_target_loss(scores, *likelihood_targets(lm, ids, mask, prefix))
    return loss + cfg.likelihood_targets * distance, r_c, r_r, distance.item()


def build_trainer(recipe: Recipe, model, tokenizer, train_ex: list[dict], out: Any, args=None, targets=None):
    """TRL's RewardTrainer on tokenised pairs (`tokenize_pairs`), its loss `posttrain.reward.bt_loss` read at the
    last real token, checkpoints in `out.path/checkpoints`, one line per logged step into `out.log`. `args`:
    `reward_args`' (built first by the stage, so that its model is created under them). `targets`: (frozen LM,
    model-turn prefix) for `rm.likelihood_targets`, whose term `posttrain.reward.likelihood_target_loss` adds."""
    import trl
    from datasets import Dataset

    cfg = recipe.rm

    class BTRewardTrainer(trl.RewardTrainer):
        # Each micro-batch's loss is weighted by its share of the step's pairs (over every process), so that a
        # step's gradient is that of the mean loss over all its pairs however they are cut into micro-batches
        # (`length_buckets` cuts them by length, into micro-batches of different sizes).
        loss_is_scaled_for_ga = True

        def _get_num_items_in_batch(self, batch_samples: list, device):
            import torch

            n = torch.tensor(sum(len(b["input_ids"]) // 2 for b in batch_samples), device=device)
            return self.accelerator.gather(n).sum() if self.args.world_size > 1 else n

        def _get_train_sampler(self, train_dataset=None):
            if cfg.train.length_buckets == 1:
                return super()._get_train_sampler(train_dataset)
            from transformers.trainer_pt_utils import BatchRebalanceSampler

            # a pair's two sides share a micro-batch and are padded together: its cost is its longer side
            return BatchRebalanceSampler(
                lengths=pair_lengths, dp_size=max(1, self.args.world_size),
                effective_batch_size=self.args.train_batch_size * self.args.gradient_accumulation_steps
                * max(1, self.args.world_size), grad_accum=self.args.gradient_accumulation_steps,
                seed=self.args.data_seed, rank=self.args.process_index, drop_last=self.args.dataloader_drop_last,
            )  # fmt: skip

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, r_c, r_r, distance = pair_loss(model, inputs, cfg, targets)
            mode = "train" if model.training else "eval"
            if distance is not None:
                self._metrics[mode]["likelihood_mse"].extend([distance] * len(r_c))
            # one entry per pair: micro-batches of any size weigh by their pairs
            diff = (r_c - r_r).detach().float()
            self._metrics[mode]["accuracy"].extend((diff > 0).float().tolist())
            self._metrics[mode]["margin"].extend(diff.tolist())
            if num_items_in_batch is None:  # evaluation: one batch
                return loss
            # processes' gradients are averaged: × their number gives the sum over pairs / all the step's pairs
            return loss * (len(r_c) * self.accelerator.num_processes / num_items_in_batch)

    args = args if args is not None else reward_args(recipe, out.path)
    ds = Dataset.from_dict({k: [e[k] for e in train_ex] for k in ("chosen_ids", "rejected_ids")})
    pair_lengths = [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in train_ex]
    trainer = BTRewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    use_step_lines(trainer, out.log, cfg.train.steps)
    return trainer


def evaluate(model, eval_ex: list[dict], tokenizer) -> dict[str, Any]:
    """Held-out figures of the reward as the stage reads it (with the likelihood term when the model has one)."""
    return held_out_reads(model, eval_ex, tokenizer)["reward"]


def held_out_reads(model, eval_ex: list[dict], tokenizer) -> dict[str, Any]:
    """Every read of the held-out pairs from one forward pass over their sides (`posttrain.reward.score_parts`):
    {"reward": figures of the reward (head + w × log-likelihood), and, when the model has a likelihood weight w,
    "head": accuracy and loss of the scalar head alone (what any library reads from the saved model) and
    "likelihood": how the log-likelihood term alone ranks the pairs (`likelihood_figures`) — summed over the final
    model turn as the reward reads it, from its header to the last token (the newline after `<end_of_turn>`
    included, which `likelihood_ranking`'s loss-mask span leaves out)}."""
    pad = tokenizer.pad_token_id
    (h_c, l_c), (h_r, l_r) = (score_parts(model, [e[f"{side}_ids"] for e in eval_ex], pad)
                              for side in ("chosen", "rejected"))  # fmt: skip
    if l_c is None or l_r is None:  # no likelihood weight: the reward is the head
        return {"reward": figures(eval_ex, h_c, h_r)}
    w = unwrapped(model).config.posttrain_likelihood_weight
    reward = figures(eval_ex, [h + w * x for h, x in zip(h_c, l_c)], [h + w * x for h, x in zip(h_r, l_r)])
    head = figures(eval_ex, h_c, h_r)
    return {"reward": reward, "head": {"accuracy": head["accuracy"], "loss": head["loss"]},
            "likelihood": likelihood_figures(eval_ex, l_c, l_r)}  # fmt: skip


def figures(eval_ex: list[dict], r_c: list[float], r_r: list[float]) -> dict[str, Any]:
    """The gate's figures for rewards of the held-out pairs' sides (aligned with `eval_ex`)."""
    res = gate_metrics(r_c, r_r, [e["len_chosen"] for e in eval_ex], [e["len_rejected"] for e in eval_ex])
    res["accuracy_per_task"] = accuracy_per_task(eval_ex, [a > b for a, b in zip(r_c, r_r)])
    gold = [a > b for e, a, b in zip(eval_ex, r_c, r_r) if e["chosen_gold"]]
    if gold:  # the gold response against the policy's wrong responses on the evaluation prompts
        res["gold_over_policy_wrong"] = {"pairs": len(gold), "accuracy": round(sum(gold) / len(gold), 4)}
    return res


def likelihood_ranking(model, eval_ex: list[dict], tokenizer) -> dict[str, Any]:
    """How the starting causal LM's own log-likelihood of each side's response (summed over its tokens) ranks
    the held-out pairs — what the RM could read from the model it starts from, before any preference training.
    `model`: the untrained RM built from that LM (`posttrain.reward.lm_response_logps`), summed over each
    response's loss-mask span. (An RM with a likelihood weight gives them from `held_out_reads`, in the pass that
    scores the pairs, over the turn as its reward reads it.)"""
    pad = tokenizer.pad_token_id
    sides = {}
    for side in ("chosen", "rejected"):
        spans = [e[f"span_{side}"] for e in eval_ex]
        sides[side] = lm_response_logps(model, [e[f"{side}_ids"] for e in eval_ex], [a for a, _ in spans],
                                        [b for _, b in spans], pad)  # fmt: skip
    return likelihood_figures(eval_ex, sides["chosen"], sides["rejected"])


def likelihood_figures(eval_ex: list[dict], l_c: list[float], l_r: list[float]) -> dict[str, Any]:
    """How log-likelihoods of the held-out pairs' sides rank them: pairs, accuracy, accuracy per task."""
    wins = [c > r for c, r in zip(l_c, l_r)]
    return {"pairs": len(wins), "accuracy": round(sum(wins) / max(len(wins), 1), 4),
            "accuracy_per_task": accuracy_per_task(eval_ex, wins)}  # fmt: skip


def accuracy_per_task(eval_ex: list[dict], wins: list[bool]) -> dict[str, float]:
    """The share of each task family's pairs ranked right (`wins` aligned with `eval_ex`)."""
    by_task: dict[str, list[bool]] = {}
    for e, w in zip(eval_ex, wins):
        by_task.setdefault(e["task"], []).append(w)
    return {t: round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())}
