"""`eval` stage: every model the run produced, side by side, on the held-out prompts and the probe sets.

For each of `sft`, `distill`, each `rlhf/<run>` and `merge` (those the recipe has):
- world score per task family (greedy answers, the verifiers) — built-in world only;
- on one sampled response per held-out prompt (plain temperature, fixed seed, so the models answer the same
  prompts under the same randomness): mean RM reward, KL(π ‖ π_SFT) (k1 and k3, per response), length, truncation;
- win rate against the previous stage judged by the RM (distill vs sft, an RL run vs its start, merge vs the
  first RL run), prompt by prompt, ties counted half;
- probes (`data/probes/`, `posttrain.probes`): refusal rate on unsafe requests (should be high) and on safe ones
  (should be low), self-identification accuracy, and formatting robustness — the task score under five
  formattings of the same questions and a system message, with its spread.

Writes `runs/<recipe>/eval/`: `eval.json`, `eval_report.md`. `posttrain eval MODEL --recipe R` runs the same
measures on one model folder.

    CPU:  posttrain run recipes/tiny/pipeline.yaml --only eval      (or: make eval)
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from posttrain.config import ModelSpec, Recipe
from posttrain.outputs import StageOutput
from posttrain.stages.sft import read_rows


def parents(recipe: Recipe) -> list[str]:
    from posttrain.runner import applies

    return [s for s in ("data", "sft", "distill", "rm", "rlhf", "merge") if applies(recipe, s)]


def stage_config(recipe: Recipe) -> dict[str, Any]:
    from posttrain.outputs import file_sha256
    from posttrain.probes import PROBES

    probes = {p.name: file_sha256(p) for p in sorted(PROBES.glob("*.jsonl"))}
    return {"eval": recipe.eval, "chat": recipe.chat, "seed": recipe.seed_for("eval"), "probes": probes,
            "temperature": recipe.rlhf.temperature if recipe.rlhf else 1.0}  # fmt: skip


def models(recipe: Recipe) -> list[tuple[str, Path, str | None]]:
    """(label, model folder, label of the model it is compared with) in pipeline order."""
    from posttrain.stages.rlhf import start_stage

    run = recipe.run_dir
    out: list[tuple[str, Path, str | None]] = [("sft", run / "sft" / "model", None)]
    if (run / "distill" / "model").exists() and "distill" in parents(recipe):
        out.append(("distill", run / "distill" / "model", "sft"))
    rl_runs = sorted(p.parent for p in (run / "rlhf").glob("*/RUN_DONE")) if "rlhf" in parents(recipe) else []
    out += [(f"rlhf/{p.name}", p / "model", start_stage(recipe)) for p in rl_runs]
    if "merge" in parents(recipe) and rl_runs:
        out.append(("merge", run / "merge" / "model", f"rlhf/{rl_runs[0].name}"))
    return out


def main(recipe: Recipe) -> Path:
    from posttrain import runner

    with StageOutput(
        recipe.run_dir / "eval", "eval", stage_config(recipe), runner.parent_hashes(recipe, "eval")
    ) as out:
        results = evaluate_models(recipe, models(recipe))
        for label, res in results.items():
            out.log({"model": label, **{k: v for k, v in res.items() if isinstance(v, (int, float))}})
        (out.path / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        md = report_markdown(results)
        (out.path / "eval_report.md").write_text(md)
        print(md)
        out.summary = {
            label: {k: v for k, v in r.items() if isinstance(v, (int, float))} for label, r in results.items()
        }
    return out.final


def evaluate_models(recipe: Recipe, entries: list[tuple[str, Path, str | None]]) -> dict[str, dict]:
    from posttrain import runner
    from posttrain.modeling import load_causal_lm, load_reward_model, load_tokenizer, set_inference_window
    from posttrain.outputs import read_done
    from posttrain.probes import load
    from posttrain.rl import policy_figures, win_rate
    from posttrain.stages.sft import world_scorer

    sft_spec = runner.stage_model(recipe, "sft", recipe.model)
    tokenizer = load_tokenizer(sft_spec)
    sft = load_causal_lm(sft_spec, tokenizer).eval()
    rm = None
    if read_done(recipe.run_dir / "rm") is not None:
        rm = load_reward_model(runner.stage_model(recipe, "rm", recipe.reward_model), tokenizer).eval()
    eval_rows = read_rows(recipe.run_dir / "data" / "data" / "eval.jsonl")
    world_eval = world_scorer(recipe, tokenizer, eval_rows, "eval")
    probes = load() if recipe.data.source == "world" else None
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
    from posttrain import world
    from posttrain.generation import SamplingConfig, generate, prompt_ids

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
