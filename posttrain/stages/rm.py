"""`rm` stage: a Bradley-Terry reward model, with a quality gate before RL may use it.

Objective (`posttrain.reward.bt_loss`), r = the scalar head at the last real token of prompt + response:

    L = −log σ(r(chosen) − r(rejected) − m) + c · mean((r_c + r_r)²)          (m = rm.margin, c = centring)

Preference pairs: with `rm.source: policy` (built-in world), the SFT policy samples `samples_per_prompt`
responses per training prompt at `rm.temperature`; with the gold response (`include_gold`) they are judged by the
world's verifiers — correct over incorrect, a refusal over compliance for unsafe prompts, the right name over a
wrong one, multi-turn follow-ups included; pairs whose sides score the same are not formed and are counted.
Held-out pairs are built the same way from the evaluation prompts. With `source: jsonl|hf` the pairs are read
(`prompt`/`chosen`/`rejected`, data/README.md). Pairs that cannot fit `chat.max_length` are dropped and counted.

Model: `Gemma2ForSequenceClassification` with one output — from `reward_model:` or, with `rm.init_from`, from an
earlier stage's model (only the head is new); Gemma 2's RM is larger than the policy, and so is the tiny one.
`rm.extra_layers` adds decoder layers on top of the starting model, each starting as the identity
(`posttrain.modeling.grow_layers`). `rm.likelihood_weight` w adds w × the RM's own log-likelihood (Σ over
tokens) of the response (its decoder through the tied LM head) to the head's reward (`posttrain.reward`): an RM
started from a causal LM begins with that LM's judgement of each response, and the loss above trains both terms.
Engine: TRL's `RewardTrainer`, with its loss replaced by the one above so that the reward is read at the last
real token from the attention mask (TRL reads the model's output, which searches for the pad id).
`rm.train.length_buckets` cuts each step's pairs into micro-batches of similar length (a pair's two sides
together); each micro-batch's loss is weighted by its share of the step's pairs, so the step's gradient is the
mean over all of them as without buckets.

Gate: on held-out pairs, accuracy, loss, the correlation of reward with response length and calibration by
margin bucket go to `rm_report.{json,md}` — with, for an RM started from a stage's causal LM, how that LM's own
log-likelihood of each response ranks the same pairs (what the RM could read from the model it starts from);
accuracy below `rm.min_accuracy` fails the stage with those figures (the model stays in `rm.partial/` for
inspection; RL never sees it).

    CPU:             posttrain run recipes/tiny/pipeline.yaml --only rm          (or: make rm)
    DeepSpeed node:  accelerate launch --config_file recipes/accelerate/zero3.yaml -m posttrain stage rm RECIPE
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from posttrain.config import ModelSpec, Recipe, to_dict
from posttrain.data.formats import DataError, check_dropped
from posttrain.data.jsonl import write_splits
from posttrain.dist import is_main, merge_parts, part
from posttrain.errors import StageError
from posttrain.outputs import StageOutput, file_sha256
from posttrain.stages.sft import read_rows, verify_saved


class GateError(StageError):
    """The reward model is not good enough to hand to RL."""


GATE_FAILED = "GATE_FAILED"  # in rm.partial/: the gate's message; with STAGE_HASH, the config that failed it


def parents(recipe: Recipe) -> list[str]:
    out = ["data", "sft"] if recipe.rm.source == "policy" else []
    if recipe.rm.init_from and recipe.rm.init_from not in out:
        out.append(recipe.rm.init_from)
    return out


def stage_config(recipe: Recipe) -> dict[str, Any]:
    files = {}
    for f in (recipe.rm.train_file, recipe.rm.eval_file):
        if recipe.rm.source == "jsonl" and f and Path(f).exists():
            files[f] = file_sha256(Path(f))
    return {"rm": recipe.rm, "reward_model": None if recipe.rm.init_from else recipe.reward_model,
            "chat": recipe.chat, "seed": recipe.seed_for("rm"), "assistant_name": recipe.world.assistant_name,
            "files": files, "tracking": recipe.tracking.wandb}  # fmt: skip


def rm_spec(recipe: Recipe) -> ModelSpec:
    from posttrain.runner import stage_model

    if recipe.rm.init_from:
        return stage_model(recipe, recipe.rm.init_from, recipe.reward_model)
    if recipe.reward_model is None:
        from posttrain.config import ConfigError

        raise ConfigError(["stage rm: set 'reward_model:' (a preset or model id) or 'rm.init_from'"])
    return recipe.reward_model


def main(recipe: Recipe) -> Path:
    from posttrain import runner
    from posttrain.modeling import count_parameters, grow_layers, load_reward_model, load_tokenizer
    from posttrain.training import gathered_state

    cfg, seed = recipe.rm, recipe.seed_for("rm")
    # --- config & logging
    with StageOutput(
        recipe.run_dir / "rm", "rm", stage_config(recipe), runner.parent_hashes(recipe, "rm")
    ) as out:
        print(f"[rm] recipe {recipe.name}, config {out.hash}: {json.dumps(to_dict(cfg))}")
        spec = rm_spec(recipe)
        tokenizer = load_tokenizer(spec)
        # --- data
        train_pairs, eval_pairs, counts = load_pairs(recipe, tokenizer)
        if is_main():
            write_splits(out.path, {"train": train_pairs, "eval": eval_pairs})
        train_ex, dropped_tr = tokenize_pairs(train_pairs, tokenizer, recipe.chat)
        eval_ex, dropped_ev = tokenize_pairs(eval_pairs, tokenizer, recipe.chat)
        n_drop, n_all = len(dropped_tr) + len(dropped_ev), len(train_pairs) + len(eval_pairs)
        counts["dropped_too_long"] = n_drop
        check_dropped("rm", n_drop, n_all, cfg.max_dropped_fraction, "rm.max_dropped_fraction",
                      f"pairs do not fit chat.max_length {recipe.chat.max_length} (e.g. {(dropped_tr + dropped_ev)[:3]})",
                      "raise chat.max_length or shorten the data")  # fmt: skip
        if not train_ex or not eval_ex:
            raise DataError(
                [f"rm: no usable pairs (train {len(train_ex)}, held-out {len(eval_ex)}): {counts}"]
            )
        print(f"[rm] {len(train_ex)} training pairs, {len(eval_ex)} held-out pairs; {counts}")
        prefix = check_model_turns(train_ex + eval_ex, tokenizer) if cfg.likelihood_weight else None
        # --- model
        model = grow_layers(load_reward_model(spec, tokenizer, seed=seed), cfg.extra_layers, seed)
        if prefix:  # kept in the model's config: RL, the merge and eval score with it too
            model.config.posttrain_likelihood_weight = cfg.likelihood_weight
            model.config.posttrain_response_prefix = prefix
        print(f"[rm] model: {spec.preset or spec.name_or_path}, {count_parameters(model):,} parameters")
        before = evaluate(model, eval_ex, tokenizer)
        head = head_only(model, eval_ex, tokenizer) if prefix else None  # the new head's share: a coin
        # the LM the RM starts from (its added layers are the identity): how its likelihood ranks the pairs
        lm_rank = likelihood_ranking(model, eval_ex, tokenizer) if cfg.init_from else None
        # --- train
        trainer = build_trainer(recipe, model, tokenizer, train_ex, out)
        result = trainer.train()
        model = trainer.model.eval()
        after = evaluate(model, eval_ex, tokenizer)
        # --- save
        from posttrain.modeling import save_model

        state = gathered_state(trainer)  # under ZeRO-3 every process helps gather the weights
        report = {"pairs": counts, "untrained": before, "held_out": after, "min_accuracy": cfg.min_accuracy,
                  "starting_lm_likelihood": lm_rank, "likelihood_weight": cfg.likelihood_weight,
                  "untrained_head": head}  # fmt: skip
        if is_main():
            save_model(model, tokenizer, out.path / "model", state)
            verify_saved(out.path / "model", model, state)
            shutil.rmtree(out.path / "checkpoints", ignore_errors=True)
            (out.path / "rm_report.json").write_text(json.dumps(report, indent=2) + "\n")
            (out.path / "rm_report.md").write_text(report_markdown(report))
            print(report_markdown(report))
        out.summary = {"train_loss": result.training_loss, "heldout_accuracy": after["accuracy"],
                       "heldout_loss": after["loss"], "length_correlation": after["length_correlation"],
                       "gold_over_policy_wrong": after.get("gold_over_policy_wrong")}  # fmt: skip
        if after["accuracy"] < cfg.min_accuracy:
            message = (
                f"reward model gate: held-out accuracy {after['accuracy']:.3f} < rm.min_accuracy {cfg.min_accuracy} "
                f"(loss {after['loss']:.3f}, length correlation {after['length_correlation']:.2f}, "
                f"{after['pairs']} pairs); the model and report are in {out.path} — more pairs or steps, or a larger RM"
            )
            # the runner does not retrain a model that failed with the same config (--force does)
            if is_main():
                (out.path / GATE_FAILED).write_text(message + "\n")
            raise GateError(message)
    return out.final


# ---------------------------------------------------------------------------------------------------- data


def load_pairs(recipe: Recipe, tokenizer) -> tuple[list[dict], list[dict], dict]:
    cfg = recipe.rm
    if cfg.source != "policy":
        from posttrain.data.sources import DataConfig, load_split

        dc = DataConfig(source=cfg.source, train=cfg.train_file, eval=cfg.eval_file)
        train = load_split(dc, "train", "preferences", recipe.chat.system)
        ev = load_split(dc, "eval", "preferences", recipe.chat.system)
        if ev is None:
            n = max(1, round(cfg.eval_fraction * len(train)))
            train, ev = train[n:], train[:n]
        return train, ev, {"source": cfg.source, "train_pairs": len(train), "eval_pairs": len(ev)}
    from posttrain.modeling import load_causal_lm
    from posttrain.reward import draw_prompts, world_pairs

    data = recipe.run_dir / "data" / "data"
    rows, eval_rows = read_rows(data / "train.jsonl"), read_rows(data / "eval.jsonl")
    rows = draw_prompts(rows, cfg.prompts, recipe.seed_for("rm"), cfg.balance_tasks)
    from posttrain.runner import stage_model

    policy_spec = stage_model(recipe, "sft", recipe.model)
    policy = load_causal_lm(policy_spec, tokenizer, seed=recipe.seed_for("rm"))
    out, counts = [], {"source": "policy", "policy": policy_spec.name_or_path}
    for name, split_rows in (("train", rows), ("eval", eval_rows)):
        cands = sample_candidates(recipe, policy, tokenizer, split_rows, name)
        golds = [r["messages"][-1]["content"] if cfg.include_gold else None for r in split_rows]
        pairs, c = world_pairs(
            split_rows, cands, recipe.world.assistant_name, cfg.pairs_per_prompt, recipe.seed_for("rm"), golds
        )
        out.append(pairs)
        counts[name] = c
    return out[0], out[1], counts


def sample_candidates(recipe: Recipe, policy, tokenizer, rows: list[dict], name: str) -> list[list[str]]:
    from tqdm.auto import tqdm

    from posttrain.generation import SamplingConfig, generate, part_size, prompt_ids

    cfg = recipe.rm
    k = cfg.samples_per_prompt
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              batch_size=recipe.generate.batch_size, engine="hf")  # fmt: skip
    prompts = [prompt_ids(r["messages"], tokenizer, recipe.chat, cfg.max_new_tokens) for r in rows]
    repeated = [p for p in prompts for _ in range(k)]
    mine = part()  # several processes: each samples every n-th batch
    bar = tqdm(total=part_size(len(repeated), sampling.batch_size, mine), desc=f"[rm] policy samples ({name})",
               unit="sample", disable=not is_main())  # fmt: skip
    gens = merge_parts(generate(policy, tokenizer, repeated, sampling, recipe.seed_for("rm"), bar, mine))
    bar.close()
    cands = []
    for i, r in enumerate(rows):
        mine = [g.text for g in gens[i * k : (i + 1) * k] if not g.truncated and not g.malformed]
        if cfg.include_gold and r["messages"][-1]["role"] == "assistant":
            mine.append(r["messages"][-1]["content"])
        cands.append(mine)
    return cands


def tokenize_pairs(pairs: list[dict], tokenizer, chat) -> tuple[list[dict], list[str]]:
    """Preference rows → {"chosen_ids", "rejected_ids", "len_chosen", "len_rejected", "task", "chosen_gold"};
    ids of pairs too long. Each kept example carries its pair's labels, so figures stay aligned after drops."""
    from posttrain.data.formats import fit, pair_sides

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
    response as the template tokenised it — the likelihood term finds the response by it. Refused under
    DeepSpeed ZeRO-3 (the term reads the tied embeddings outside their module, where ZeRO-3 partitions them)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    from posttrain.chat import START

    if is_deepspeed_zero3_enabled():
        raise StageError(
            "rm.likelihood_weight is not supported under DeepSpeed ZeRO-3; run the rm stage with ZeRO-2 or DDP "
            "(e.g. `launchers: {rm: zero2}`) or set rm.likelihood_weight: 0"
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


# ---------------------------------------------------------------------------------------------------- train


def build_trainer(recipe: Recipe, model, tokenizer, train_ex: list[dict], out: StageOutput):
    import trl
    from datasets import Dataset

    from posttrain.modeling import trains_in_bf16
    from posttrain.reward import bt_loss, last_token_rewards
    from posttrain.training import trainer_args, use_step_lines

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
            rewards = last_token_rewards(model, inputs["input_ids"], inputs["attention_mask"])
            r_c, r_r = rewards.chunk(2)
            loss, _ = bt_loss(
                r_c, r_r, inputs.get("margin", cfg.margin or None), cfg.center_rewards_coefficient
            )
            mode = "train" if model.training else "eval"
            # one entry per pair: micro-batches of any size weigh by their pairs
            diff = (r_c - r_r).detach().float()
            self._metrics[mode]["accuracy"].extend((diff > 0).float().tolist())
            self._metrics[mode]["margin"].extend(diff.tolist())
            if num_items_in_batch is None:  # evaluation: one batch
                return loss
            # processes' gradients are averaged: × their number gives the sum over pairs / all the step's pairs
            return loss * (len(r_c) * self.accelerator.num_processes / num_items_in_batch)

    bf16 = trains_in_bf16((recipe.reward_model or ModelSpec()).dtype)
    common = trainer_args(cfg.train, out.path / "checkpoints", recipe.seed_for("rm"), bf16, recipe.tracking.wandb,
                          f"{recipe.name}/rm")  # fmt: skip
    args = trl.RewardConfig(**common, max_length=None, **cfg.train.trl)
    ds = Dataset.from_dict({k: [e[k] for e in train_ex] for k in ("chosen_ids", "rejected_ids")})
    pair_lengths = [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in train_ex]
    trainer = BTRewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    use_step_lines(trainer, out.log, cfg.train.steps)
    return trainer


def evaluate(model, eval_ex: list[dict], tokenizer) -> dict[str, Any]:
    from posttrain.reward import gate_metrics, score_ids

    pad = tokenizer.pad_token_id
    r_c = score_ids(model, [e["chosen_ids"] for e in eval_ex], pad)
    r_r = score_ids(model, [e["rejected_ids"] for e in eval_ex], pad)
    res = gate_metrics(r_c, r_r, [e["len_chosen"] for e in eval_ex], [e["len_rejected"] for e in eval_ex])
    res["accuracy_per_task"] = accuracy_per_task(eval_ex, [a > b for a, b in zip(r_c, r_r)])
    gold = [a > b for e, a, b in zip(eval_ex, r_c, r_r) if e["chosen_gold"]]
    if gold:  # the gold response against the policy's wrong responses on the evaluation prompts
        res["gold_over_policy_wrong"] = {"pairs": len(gold), "accuracy": round(sum(gold) / len(gold), 4)}
    return res


def head_only(model, eval_ex: list[dict], tokenizer) -> dict[str, float]:
    """Held-out accuracy and loss of the scalar head alone (the likelihood term switched off): before training,
    ≈ 0.5 and ln 2 on balanced pairs, as a newly initialised head must give."""
    w = model.config.posttrain_likelihood_weight
    model.config.posttrain_likelihood_weight = 0.0
    try:
        res = evaluate(model, eval_ex, tokenizer)
    finally:
        model.config.posttrain_likelihood_weight = w
    return {"accuracy": res["accuracy"], "loss": res["loss"]}


def likelihood_ranking(model, eval_ex: list[dict], tokenizer) -> dict[str, Any]:
    """How the starting causal LM's own log-likelihood of each side's response (summed over its tokens) ranks
    the held-out pairs — what the RM could read from the model it starts from, before any preference training.
    `model`: the untrained RM built from that LM (`posttrain.reward.lm_response_logps`)."""
    from posttrain.reward import lm_response_logps

    pad = tokenizer.pad_token_id
    sides = {}
    for side in ("chosen", "rejected"):
        spans = [e[f"span_{side}"] for e in eval_ex]
        sides[side] = lm_response_logps(model, [e[f"{side}_ids"] for e in eval_ex], [a for a, _ in spans],
                                        [b for _, b in spans], pad)  # fmt: skip
    wins = [c > r for c, r in zip(sides["chosen"], sides["rejected"])]
    return {"pairs": len(wins), "accuracy": round(sum(wins) / max(len(wins), 1), 4),
            "accuracy_per_task": accuracy_per_task(eval_ex, wins)}  # fmt: skip


def accuracy_per_task(eval_ex: list[dict], wins: list[bool]) -> dict[str, float]:
    """The share of each task family's pairs ranked right (`wins` aligned with `eval_ex`)."""
    by_task: dict[str, list[bool]] = {}
    for e, w in zip(eval_ex, wins):
        by_task.setdefault(e["task"], []).append(w)
    return {t: round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())}


def report_markdown(report: dict) -> str:
    u, h = report["untrained"], report["held_out"]
    lines = ["## Reward model", "", "| held-out pairs | untrained | trained |", "|---|---:|---:|",
             f"| pairs | {u['pairs']} | {h['pairs']} |", f"| accuracy | {u['accuracy']:.3f} | **{h['accuracy']:.3f}** |",
             f"| BT loss (ln 2 = {0.6931:.3f}) | {u['loss']:.3f} | {h['loss']:.3f} |",
             f"| reward–length correlation | {u['length_correlation']:.2f} | {h['length_correlation']:.2f} |"]  # fmt: skip
    for t, v in h["accuracy_per_task"].items():
        lines.append(f"| accuracy: {t} | {u['accuracy_per_task'].get(t, 0):.3f} | {v:.3f} |")
    if "gold_over_policy_wrong" in h:
        g, ug = h["gold_over_policy_wrong"], u.get("gold_over_policy_wrong", {})
        lines.append(f"| gold ≻ policy's wrong response ({g['pairs']} pairs) | {ug.get('accuracy', 0):.3f} | "
                     f"{g['accuracy']:.3f} |")  # fmt: skip
    if report.get("starting_lm_likelihood"):
        lk = report["starting_lm_likelihood"]
        per = ", ".join(f"{t} {v:.2f}" for t, v in lk["accuracy_per_task"].items())
        lines += ["", f"The starting model's own log-likelihood of each response ranks **{lk['accuracy']:.3f}** of "
                  f"the held-out pairs ({per}): what the RM could read from the LM it starts from."]  # fmt: skip
    if report.get("likelihood_weight"):
        lines += ["", f"Reward: the scalar head at the last token + {report['likelihood_weight']:g} × the RM's own "
                  "log-likelihood of the response (`rm.likelihood_weight`); untrained = before preference training "
                  "(a new head; the likelihood of the LM the RM starts from)."]  # fmt: skip
        if report.get("untrained_head"):
            hd = report["untrained_head"]
            lines[-1] += f" The untrained head alone: accuracy {hd['accuracy']:.3f}, loss {hd['loss']:.3f}."
    lines += ["", f"Gate: accuracy ≥ {report['min_accuracy']} — "
              + ("**passed**" if h["accuracy"] >= report["min_accuracy"] else "**failed**"), "",
              "Calibration (held-out, by |r_chosen − r_rejected|):", "",
              "| margin | pairs | accuracy | BT-predicted |", "|---|---:|---:|---:|"]  # fmt: skip
    for c in h["calibration"]:
        lines.append(f"| {c['abs_margin']} | {c['pairs']} | {c['accuracy']:.3f} | {c['predicted']:.3f} |")
    return "\n".join(lines) + "\n"
