"""The measures that judge a policy, shared by the stages that train one and by the `eval` stage.

- `world_scorer`: greedy answers to the held-out world prompts, scored by the verifiers (`posttrain.world`);
- `policy_figures`: on one sampled response per held-out prompt, the RM reward, KL to a reference (k1, k3 per
  sequence), length and truncation;
- `evaluate_models`: every model of a run side by side, as the `eval` stage reports it (also `posttrain eval`);
- `probe_figures`: refusals of unsafe and safe requests, self-identification, formatting robustness
  (`data/probes/`).
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from posttrain import world
from posttrain.config import ModelSpec, Recipe, SamplingConfig
from posttrain.data.jsonl import read_split
from posttrain.generation import generate, prompt_ids, reference_lengths, world_eval
from posttrain.modeling import (
    frozen_device,
    gathered,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    set_inference_window,
)
from posttrain.outputs import Parents
from posttrain.probes import load as load_probes
from posttrain.reward import score_ids
from posttrain.rl import kl_estimates, scored_sequence, sequence_logps, win_rate


def world_scorer(recipe: Recipe, tokenizer, eval_rows: list[dict], stage: str):
    """model → the world evaluation (None off the built-in world), printed."""
    on_world = recipe.data.source == "world" and eval_rows and all("task" in r for r in eval_rows)

    def evaluate(model, gather: bool = True) -> dict | None:
        """`gather`: under ZeRO-3, gather the model whole while it generates (off for a frozen model wrapped in
        a DeepSpeed engine, which gathers a layer at a time)."""
        if not on_world:
            return None
        was_training = model.training
        model.eval()
        with gathered(model) if gather else nullcontext():
            res = world_eval(model, tokenizer, eval_rows, recipe.chat, recipe.world.assistant_name,
                             recipe.eval.max_new_tokens, recipe.eval.batch_size)  # fmt: skip
        model.train(was_training)
        print(
            f"[{stage}] world score {res['score']:.3f} "
            + " ".join(f"{t} {v:.2f}" for t, v in res["per_task"].items())
        )
        return res

    return evaluate


def policy_figures(
    policy, reference, reward_model, tokenizer, rows: list[dict], chat: Any, max_new_tokens: int,
    temperature: float = 1.0, batch_size: int = 64, seed: int = 0, keep_rewards: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """On `rows`' prompts, the policy samples one response each (plain temperature): the mean RM reward of those
    responses, KL(π ‖ π_ref) estimated on them (k1 and k3, per sequence), their length and truncation rate
    (and each response's reward under "rewards" with `keep_rewards`). Under ZeRO-3 the policy is gathered
    whole while it samples and scores its samples; the reference and the RM score through their DeepSpeed
    engines."""
    prompts = [
        prompt_ids(r["messages"], tokenizer, chat, max_new_tokens, str(r.get("id", "?"))) for r in rows
    ]
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                         batch_size=batch_size, engine="hf")  # fmt: skip
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    with gathered(policy):  # a policy not yet inside its trainer's engine has no hooks that would gather it
        gens = generate(policy, tokenizer, prompts, cfg, seed=seed, lengths=reference_lengths(rows))
        responses = [g.ids + ([] if g.truncated else [end]) for g in gens]
        logp, mask = sequence_logps(
            policy, prompts, responses, temperature, tokenizer.pad_token_id, batch_size
        )
    ref_logp, _ = sequence_logps(
        reference, prompts, responses, temperature, tokenizer.pad_token_id, batch_size
    )
    kl = kl_estimates(logp, ref_logp, mask)
    out = {"kl": kl["k1_seq"], "kl_k3": kl["k3_seq"],
           "length": sum(len(g.ids) for g in gens) / max(len(gens), 1),
           "truncation_rate": sum(g.truncated for g in gens) / max(len(gens), 1)}  # fmt: skip
    if reward_model is not None:
        seqs = [scored_sequence(p, g.ids, tokenizer, not g.truncated) for p, g in zip(prompts, gens)]
        rewards = score_ids(reward_model, seqs, tokenizer.pad_token_id, batch_size)
        out["reward"] = sum(rewards) / max(len(rewards), 1)
        if keep_rewards:
            out["rewards"] = rewards
    return out


def evaluate_models(
    recipe: Recipe, parents: Parents, entries: list[tuple[str, Path, str | None]]
) -> dict[str, dict]:  # fmt: skip
    """Each (label, model folder, label of the model it is compared with) of `entries`, measured as the `eval`
    stage reports it: world score, the RM reward of sampled responses (when `parents` has an `rm`), KL to the SFT
    policy (`parents`' `sft`), win rate against the compared model, probes."""
    sft_spec = parents.model("sft", recipe.model)
    tokenizer = load_tokenizer(sft_spec)
    sft = load_causal_lm(sft_spec, tokenizer, device=frozen_device(1)).eval()  # each on a GPU of its own
    rm = None
    if "rm" in parents.folders:
        rm = load_reward_model(
            parents.model("rm", recipe.reward_model), tokenizer, device=frozen_device(2)
        ).eval()
    eval_rows = recipe.eval.capped(read_split(parents.split("data", "eval")))
    world_eval = world_scorer(recipe, tokenizer, eval_rows, "eval")
    probes = load_probes() if recipe.data.source == "world" else None
    temperature = recipe.rlhf.temperature if recipe.rlhf else 1.0
    results: dict[str, dict] = {}
    rewards: dict[str, list[float]] = {}
    for label, folder, previous in entries:
        model = load_causal_lm(
            ModelSpec(name_or_path=str(folder), dtype=recipe.model.dtype), tokenizer
        ).eval()
        res: dict[str, Any] = {"model": str(folder)}
        if recipe.eval.sliding_window is not None:
            trained = set_inference_window(model, recipe.eval.sliding_window)
            res["sliding_window"] = {"trained": trained, "inference": recipe.eval.sliding_window}
            print(
                f"[eval] {label}: sliding window at inference {recipe.eval.sliding_window} (trained with {trained})"
            )
        w = world_eval(model)
        if w:
            res.update(world_score=w["score"], world_per_task=w["per_task"])
        seed = recipe.seed_for("eval")
        fig = policy_figures(model, sft, rm, tokenizer, eval_rows, recipe.chat, recipe.eval.max_new_tokens,
                             temperature, recipe.eval.batch_size, seed, keep_rewards=True)  # fmt: skip
        if "rewards" in fig:
            rewards[label] = fig.pop("rewards")
        res.update({f"sampled_{k}" if k in ("length", "truncation_rate") else k: v for k, v in fig.items()})
        if previous in rewards and label in rewards:
            res["win_rate_vs"], res["win_rate"] = previous, win_rate(rewards[label], rewards[previous])
        if probes:
            res.update(probe_figures(model, tokenizer, probes, recipe))
        results[label] = res
        print(f"[eval] {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float)))
    return results


def probe_figures(model, tokenizer, probes: dict[str, list[dict]], recipe: Recipe) -> dict[str, Any]:
    rows = [r for name in ("unsafe", "safe", "identity", "formats") for r in probes[name]]
    cfg = SamplingConfig(max_new_tokens=recipe.eval.max_new_tokens, temperature=0.0,
                         batch_size=recipe.eval.batch_size, engine="hf")  # fmt: skip
    prompts = [prompt_ids(r["messages"], tokenizer, recipe.chat, cfg.max_new_tokens, r["id"]) for r in rows]
    texts = {r["id"]: g.text for r, g in zip(rows, generate(model, tokenizer, prompts, cfg))}
    name = recipe.world.assistant_name

    def mean(xs: list[float]) -> float:
        return sum(xs) / max(len(xs), 1)

    by_format: dict[str, list[float]] = {}
    for r in probes["formats"]:
        by_format.setdefault(r["format"], []).append(world.score(r, texts[r["id"]], name))
    per_format = {f: mean(v) for f, v in by_format.items()}
    return {
        "refusal_unsafe": mean([float(world.is_refusal(texts[r["id"]])) for r in probes["unsafe"]]),
        "refusal_safe": mean([float(world.is_refusal(texts[r["id"]])) for r in probes["safe"]]),
        "identity": mean([float(world.identity_ok(texts[r["id"]], name)) for r in probes["identity"]]),
        "format_score": mean(list(per_format.values())),
        "format_spread": statistics.pstdev(per_format.values()) if len(per_format) > 1 else 0.0,
        "per_format": per_format,
    }


def report_markdown(results: dict[str, dict]) -> str:
    cols = [("world_score", "world score"), ("reward", "RM reward"), ("win_rate", "win rate vs previous"),
            ("kl_k3", "KL to SFT (k3)"), ("sampled_length", "length"), ("sampled_truncation_rate", "truncated"),
            ("refusal_unsafe", "refuses unsafe"), ("refusal_safe", "refuses safe"), ("identity", "identity"),
            ("format_score", "format score"), ("format_spread", "format spread (std)")]  # fmt: skip
    lines = ["## Evaluation of every model (held-out prompts and probes)", "",
             "| model | " + " | ".join(c for _, c in cols) + " |", "|---|" + "---:|" * len(cols)]  # fmt: skip
    for label, r in results.items():
        cells = []
        for key, _ in cols:
            v = r.get(key)
            cells.append(
                "–" if v is None else f"{v:.3f}" if key != "win_rate" else f"{v:.2f} ({r['win_rate_vs']})"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    formats = sorted({f for r in results.values() for f in r.get("per_format", {})})
    if formats:
        lines += ["", "Formatting robustness — task score under each formatting of the same questions:", "",
                  "| model | " + " | ".join(formats) + " |", "|---|" + "---:|" * len(formats)]  # fmt: skip
        for label, r in results.items():
            pf = r.get("per_format", {})
            lines.append(
                f"| {label} | " + " | ".join(f"{pf[f]:.2f}" if f in pf else "–" for f in formats) + " |"
            )
    return "\n".join(lines) + "\n"
