"""`rm` stage: a Bradley-Terry reward model, with a quality gate before RL may use it.

Objective (`posttrain.reward.bt_loss`), r = the scalar head at the last real token of prompt + response:

    L = −log σ(r(chosen) − r(rejected) − m) + c · mean((r_c + r_r)²)          (m = rm.margin, c = centring)

Preference pairs: with `rm.source: policy` (built-in world), the policy RL starts from (`Recipe.rm_policy`: the
distilled student when the recipe distils, else the SFT one) samples `samples_per_prompt`
responses per training prompt at `rm.temperature`; with the gold response (`include_gold`) they are judged by the
world's verifiers — correct over incorrect, a refusal over compliance for unsafe prompts, the right name over a
wrong one, multi-turn follow-ups included; pairs whose sides score the same are not formed and are counted.
Held-out pairs are built the same way from the evaluation prompts. With `source: jsonl|hf` the pairs are read
(`prompt`/`chosen`/`rejected`, data/README.md). Pairs that cannot fit `chat.max_length` are dropped and counted.

Model: `Gemma2ForSequenceClassification` with one output — from `reward_model:` or, with `rm.init_from`, from an
earlier stage's model, or `init_from: teacher` with a teacher the recipe names rather than trains (the tiny
recipe's shipped one), from that model (only the head is new); Gemma 2's RM is larger than the policy, and so is the tiny one.
`rm.extra_layers` adds decoder layers on top of the starting model, each starting as the identity
(`posttrain.modeling.grow_layers`). `rm.freeze_base` keeps the starting model's own weights and trains only the
added layers and the head (Gemma 2's RM is trained whole; the tiny recipe's keeps its teacher: trained whole,
its held-out accuracy fell). `rm.likelihood_weight` w adds w × the RM's own log-likelihood (Σ over
tokens) of the response (its decoder through the tied LM head) to the head's reward (`posttrain.reward`): an RM
started from a causal LM begins with that LM's judgement of each response, and the loss above trains both terms.
`rm.likelihood_targets` c keeps the standard read (the head alone) and adds c × the head's squared distance, at
every response position, to the starting LM's log-probability of that token (a frozen copy of the model as
built) to the loss: dense targets that teach the layers under the head where a response goes wrong.
Engine: TRL's `RewardTrainer`, with its loss replaced by the one above so that the reward is read at the last
real token from the attention mask (`posttrain.engines.reward_model`, which also cuts a step's pairs by length
with `rm.train.length_buckets`). A killed run resumes from its last checkpoint (the pairs it drew are kept in
`rm.partial/`); SIGTERM saves a checkpoint first.

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
from dataclasses import replace
from pathlib import Path
from typing import Any

from posttrain.chat import final_response
from posttrain.config import ConfigError, ModelSpec, Recipe, SamplingConfig, to_dict
from posttrain.data.formats import DataError, check_dropped
from posttrain.data.jsonl import read_split, write_splits
from posttrain.data.pairs import draw_prompts, world_pairs
from posttrain.data.sources import read_source
from posttrain.dist import is_main, merge_parts, part
from posttrain.errors import StageError
from posttrain.files import file_sha256, write_atomic
from posttrain.outputs import GATE_FAILED, Parents, StageOutput, teacher_spec


class GateError(StageError):
    """The reward model is not good enough to hand to RL."""


PAIR_COUNTS = "pair_counts.json"  # beside the pairs in data/: what was drawn, kept for a resumed run


def _from_named_teacher(recipe: Recipe) -> bool:
    """The RM starts from a teacher the recipe names rather than trains (the tiny recipe's shipped one)."""
    return recipe.rm.init_from == "teacher" and not recipe.has_stage("teacher")


def parents(recipe: Recipe) -> list[str]:
    out = ["data", recipe.rm_policy()] if recipe.rm.source == "policy" else []
    if recipe.rm.init_from and recipe.rm.init_from not in out and recipe.has_stage(recipe.rm.init_from):
        out.append(recipe.rm.init_from)  # a teacher the recipe names (not trains) is read from the recipe
    return out


def stage_config(recipe: Recipe) -> dict[str, Any]:
    files = {}
    for f in (recipe.rm.train_file, recipe.rm.eval_file):
        if recipe.rm.source == "jsonl" and f and Path(f).exists():
            files[f] = file_sha256(Path(f))
    return {"rm": recipe.rm, "reward_model": None if recipe.rm.init_from else recipe.reward_model,
            **({"teacher": recipe.teacher} if _from_named_teacher(recipe) else {}),
            "chat": recipe.chat, "seed": recipe.seed_for("rm"), "assistant_name": recipe.world.assistant_name,
            "files": files, "tracking": recipe.tracking.wandb}  # fmt: skip


def rm_spec(recipe: Recipe, parents: Parents) -> ModelSpec:
    if _from_named_teacher(recipe):
        # the recipe's own teacher (e.g. a shipped checkpoint), with the dtype and attention of `reward_model:`
        like = recipe.reward_model or ModelSpec()
        return replace(
            teacher_spec(recipe, parents), dtype=like.dtype, attn_implementation=like.attn_implementation
        )
    if recipe.rm.init_from:
        return parents.model(recipe.rm.init_from, recipe.reward_model)
    if recipe.reward_model is None:
        raise ConfigError(["stage rm: set 'reward_model:' (a preset or model id) or 'rm.init_from'"])
    return recipe.reward_model


def main(recipe: Recipe, parents: Parents) -> Path:
    from posttrain.engines.reward_model import build_trainer, held_out_reads, likelihood_ranking, reward_args
    from posttrain.engines.trainer import save_trained, train_resuming
    from posttrain.modeling import count_parameters, gathered, load_tokenizer

    cfg = recipe.rm
    # --- config & logging
    with StageOutput(recipe.run_dir / "rm", "rm", stage_config(recipe), parents.hashes, resume=True) as out:
        print(f"[rm] recipe {recipe.name}, config {out.hash}: {json.dumps(to_dict(cfg))}")
        if is_main():
            (out.path / GATE_FAILED).unlink(missing_ok=True)  # an earlier attempt's verdict is not this one's
        spec = rm_spec(recipe, parents)
        tokenizer = load_tokenizer(spec)
        # --- data
        train_ex, eval_ex, counts = pairs_for_training(recipe, parents, tokenizer, out)
        # --- model (after the trainer's config: under ZeRO-3 it is created partitioned)
        args = reward_args(recipe, out.path)
        model, targets = build_model(recipe, spec, tokenizer, train_ex + eval_ex)
        trained = f", {count_parameters(model, trained_only=True):,} of them trained (rm.freeze_base)"
        print(f"[rm] model: {spec.preset or spec.name_or_path}, {count_parameters(model):,} parameters"
              + (trained if cfg.freeze_base else ""))  # fmt: skip
        with gathered(model):
            # one pass: the reward; with a likelihood term, the new head alone (a coin) and the term alone — the
            # likelihood of the LM the RM starts from (its added layers are the identity)
            reads = held_out_reads(model, eval_ex, tokenizer)
            before, head = reads["reward"], reads.get("head")
            lm_rank = None
            if cfg.init_from:  # how the starting LM's likelihood ranks the pairs
                lm_rank = reads.get("likelihood") or likelihood_ranking(model, eval_ex, tokenizer)
        # --- train
        trainer = build_trainer(recipe, model, tokenizer, train_ex, out, args, targets)
        result = train_resuming(
            trainer, out.path / "checkpoints", out.path / "metrics.jsonl", "rm", out.resumed
        )
        model = trainer.model.eval()
        with gathered(model):
            # and what any library reads from the saved model: the head alone, without the likelihood term
            reads = held_out_reads(model, eval_ex, tokenizer)
            after, head_after = reads["reward"], reads.get("head")
        # --- save, then the gate
        report = {"pairs": counts, "untrained": before, "held_out": after, "min_accuracy": cfg.min_accuracy,
                  "starting_lm_likelihood": lm_rank, "likelihood_weight": cfg.likelihood_weight,
                  "likelihood_targets": cfg.likelihood_targets,
                  "untrained_head": head, "trained_head": head_after}  # fmt: skip
        if save_trained(
            trainer, model, tokenizer, out.path / "model", out.path / "checkpoints", chat=recipe.chat
        ):
            (out.path / "rm_report.json").write_text(json.dumps(report, indent=2) + "\n")
            (out.path / "rm_report.md").write_text(report_markdown(report))
            print(report_markdown(report))
        out.summary = {"train_loss": result.training_loss, "heldout_accuracy": after["accuracy"],
                       "heldout_loss": after["loss"], "length_correlation": after["length_correlation"],
                       "gold_over_policy_wrong": after.get("gold_over_policy_wrong"),
                       "standard_read_accuracy": (head_after or after)["accuracy"]}  # fmt: skip
        check_gate(after, cfg.min_accuracy, out.path)
    return out.final


def build_model(recipe: Recipe, spec: ModelSpec, tokenizer, examples: list[dict]):
    """The RM to train (`spec`, with `rm.extra_layers` grown on top, the likelihood term's weight and the model
    turn's header in its config when `rm.likelihood_weight` is set), and the targets of `rm.likelihood_targets`:
    (a frozen copy of the model as built — whose log-probabilities the head learns to read —, the header), or None."""
    from posttrain.engines.reward_model import check_model_turns
    from posttrain.modeling import grow_layers, load_reward_model

    cfg, seed = recipe.rm, recipe.seed_for("rm")
    likelihood = cfg.likelihood_weight or cfg.likelihood_targets
    prefix = check_model_turns(examples, tokenizer) if likelihood else None
    model = load_reward_model(spec, tokenizer, seed=seed, trainable=True)
    if cfg.freeze_base:  # before the layers are grown: everything the starting model had, the head excepted
        model.model.requires_grad_(False)
    model = grow_layers(model, cfg.extra_layers, seed)
    targets = (frozen_copy(model), prefix) if cfg.likelihood_targets else None
    if cfg.likelihood_weight:  # kept in the model's config: RL, the merge and eval score with it too
        model.config.posttrain_likelihood_weight = cfg.likelihood_weight
        model.config.posttrain_response_prefix = prefix
    return model, targets


def frozen_copy(model):
    """A copy of `model` for reading only: evaluation mode, no gradients."""
    import copy

    frozen = copy.deepcopy(model).eval()
    frozen.requires_grad_(False)
    return frozen


def check_gate(held_out: dict, min_accuracy: float, folder: Path) -> None:
    """Held-out accuracy below `rm.min_accuracy` raises GateError with the figures; the message is kept in
    `folder` (GATE_FAILED), so that the runner does not retrain a model that failed with the same config."""
    if held_out["accuracy"] >= min_accuracy:
        return
    message = (
        f"reward model gate: held-out accuracy {held_out['accuracy']:.3f} < rm.min_accuracy {min_accuracy} "
        f"(loss {held_out['loss']:.3f}, length correlation {held_out['length_correlation']:.2f}, "
        f"{held_out['pairs']} pairs); the model and report are in {folder} — more pairs or steps, or a larger RM"
    )
    if is_main():
        (folder / GATE_FAILED).write_text(message + "\n")
    raise GateError(message)


def pairs_for_training(recipe: Recipe, parents: Parents, tokenizer, out: StageOutput):
    """The pairs, tokenised: (training examples, held-out examples, counts). A resumed run takes the pairs its
    first attempt drew (in `out.path/data/`); pairs that cannot fit `chat.max_length` are dropped and counted,
    and the stage fails past `rm.max_dropped_fraction`."""
    from posttrain.engines.reward_model import tokenize_pairs

    cfg = recipe.rm
    kept = out.path / "data" / PAIR_COUNTS
    if out.resumed and kept.exists():
        train_pairs, eval_pairs = (read_split(out.path / "data" / f"{s}.jsonl") for s in ("train", "eval"))
        counts = json.loads(kept.read_text())
        print(
            f"[rm] resuming: the {len(train_pairs)} training and {len(eval_pairs)} held-out pairs drawn before"
        )
    else:
        train_pairs, eval_pairs, counts = load_pairs(recipe, parents, tokenizer)
        if is_main():
            write_splits(out.path, {"train": train_pairs, "eval": eval_pairs})
            write_atomic(kept, json.dumps(counts) + "\n")
    train_ex, dropped_tr = tokenize_pairs(train_pairs, tokenizer, recipe.chat)
    eval_ex, dropped_ev = tokenize_pairs(eval_pairs, tokenizer, recipe.chat)
    n_drop, n_all = len(dropped_tr) + len(dropped_ev), len(train_pairs) + len(eval_pairs)
    counts["dropped_too_long"] = n_drop
    check_dropped("rm", n_drop, n_all, cfg.max_dropped_fraction, "rm.max_dropped_fraction",
                  f"pairs do not fit chat.max_length {recipe.chat.max_length} (e.g. {(dropped_tr + dropped_ev)[:3]})",
                  "raise chat.max_length or shorten the data")  # fmt: skip
    if not train_ex or not eval_ex:
        raise DataError([f"rm: no usable pairs (train {len(train_ex)}, held-out {len(eval_ex)}): {counts}"])
    print(f"[rm] {len(train_ex)} training pairs, {len(eval_ex)} held-out pairs; {counts}")
    return train_ex, eval_ex, counts


# ---------------------------------------------------------------------------------------------------- data


def load_pairs(recipe: Recipe, parents: Parents, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """(training pairs, held-out pairs, counts): read (`source: jsonl|hf`) or sampled from the policy and judged
    by the world's verifiers (`source: policy`)."""
    cfg = recipe.rm
    if cfg.source != "policy":
        return read_pairs(cfg, recipe.chat.system)
    from posttrain.modeling import load_causal_lm

    rows, eval_rows = read_split(parents.split("data", "train")), read_split(parents.split("data", "eval"))
    rows = draw_prompts(rows, cfg.prompts, recipe.seed_for("rm"), cfg.balance_tasks)
    policy_spec = parents.model(recipe.rm_policy(), recipe.model)
    policy = load_causal_lm(policy_spec, tokenizer, seed=recipe.seed_for("rm"))
    out, counts = [], {"source": "policy", "policy": policy_spec.name_or_path}
    for name, split_rows in (("train", rows), ("eval", eval_rows)):
        cands = sample_candidates(recipe, policy, tokenizer, split_rows, name)
        golds = [final_response(r["messages"]) if cfg.include_gold else None for r in split_rows]
        pairs, c = world_pairs(
            split_rows, cands, recipe.world.assistant_name, cfg.pairs_per_prompt, recipe.seed_for("rm"), golds
        )
        out.append(pairs)
        counts[name] = c
    return out[0], out[1], counts


def read_pairs(cfg, system: str) -> tuple[list[dict], list[dict], dict]:
    """Preference rows from `rm.train_file` (and `rm.eval_file`, else `rm.eval_fraction` of train held out):
    JSONL files or datasets' splits (`rm.hf_train_split`, `rm.hf_eval_split`), bad rows dropped up to
    `rm.max_bad_fraction`."""
    read = {name: read_source(cfg.source, f, split, "preferences", system, cfg.max_bad_fraction, "rm.max_bad_fraction")
            for name, f, split in (("train", cfg.train_file, cfg.hf_train_split),
                                   ("eval", cfg.eval_file, cfg.hf_eval_split)) if f}  # fmt: skip
    train, bad = read["train"][0], list(read["train"][1])
    if "eval" in read:
        ev, bad = read["eval"][0], bad + read["eval"][1]
    else:
        n = max(1, round(cfg.eval_fraction * len(train)))
        train, ev = train[n:], train[:n]
    if bad:
        print(f"[rm] dropped {len(bad)} bad preference row(s) (rm.max_bad_fraction {cfg.max_bad_fraction}): "
              + "; ".join(bad[:3]))  # fmt: skip
    return (
        train,
        ev,
        {"source": cfg.source, "train_pairs": len(train), "eval_pairs": len(ev), "bad_rows": len(bad)},
    )


def sample_candidates(recipe: Recipe, policy, tokenizer, rows: list[dict], name: str) -> list[list[str]]:
    from tqdm.auto import tqdm

    from posttrain.generation import generate, part_size, prompt_ids, reference_lengths

    cfg = recipe.rm
    k = cfg.samples_per_prompt
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                              batch_size=recipe.generate.batch_size, engine="hf")  # fmt: skip
    prompts = [prompt_ids(r["messages"], tokenizer, recipe.chat, cfg.max_new_tokens) for r in rows]
    repeated = [p for p in prompts for _ in range(k)]
    mine = part()  # several processes: each samples every n-th batch
    bar = tqdm(total=part_size(len(repeated), sampling.batch_size, mine), desc=f"[rm] policy samples ({name})",
               unit="sample", disable=not is_main())  # fmt: skip
    expected = [n for n in reference_lengths(rows) for _ in range(k)]
    gens = merge_parts(
        generate(policy, tokenizer, repeated, sampling, recipe.seed_for("rm"), bar, mine, expected)
    )
    bar.close()
    cands = []
    for i, r in enumerate(rows):
        mine = [g.text for g in gens[i * k : (i + 1) * k] if not g.truncated and not g.malformed]
        gold = final_response(r["messages"])
        if cfg.include_gold and gold is not None:
            mine.append(gold)
        cands.append(mine)
    return cands


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
    if report.get("likelihood_targets"):
        lines += ["", f"Training added {report['likelihood_targets']:g} × the head's squared distance, at every "
                  "response position, to the starting LM's log-probability of that token "
                  "(`rm.likelihood_targets`); the reward is the head's logit at the last token alone, as "
                  "`AutoModelForSequenceClassification` reads it."]  # fmt: skip
    if report.get("likelihood_weight"):
        lines += ["", f"Reward: the scalar head at the last token + {report['likelihood_weight']:g} × the RM's own "
                  "log-likelihood of the response (`rm.likelihood_weight`); untrained = before preference training "
                  "(a new head; the likelihood of the LM the RM starts from)."]  # fmt: skip
        if report.get("untrained_head"):
            hd = report["untrained_head"]
            lines[-1] += f" The untrained head alone: accuracy {hd['accuracy']:.3f}, loss {hd['loss']:.3f}."
        if report.get("trained_head"):
            hd = report["trained_head"]
            lines += ["", f"**Read as any library reads the saved model** (`AutoModelForSequenceClassification`: the "
                      f"head's logit at the last token, no likelihood term): held-out accuracy **{hd['accuracy']:.3f}**, "
                      f"loss {hd['loss']:.3f}. The gate counts the reward with the likelihood term."]  # fmt: skip
    lines += ["", f"Gate: accuracy ≥ {report['min_accuracy']} — "
              + ("**passed**" if h["accuracy"] >= report["min_accuracy"] else "**failed**"), "",
              "Calibration (held-out, by |r_chosen − r_rejected|):", "",
              "| margin | pairs | accuracy | BT-predicted |", "|---|---:|---:|---:|"]  # fmt: skip
    for c in h["calibration"]:
        lines.append(f"| {c['abs_margin']} | {c['pairs']} | {c['accuracy']:.3f} | {c['predicted']:.3f} |")
    return "\n".join(lines) + "\n"
