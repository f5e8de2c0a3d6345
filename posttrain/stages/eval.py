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
from pathlib import Path
from typing import Any

from posttrain.config import Recipe
from posttrain.files import file_sha256
from posttrain.outputs import Parents, StageOutput
from posttrain.probes import PROBES


def parents(recipe: Recipe) -> list[str]:
    return [s for s in ("data", "sft", "distill", "rm", "rlhf", "merge") if recipe.has_stage(s)]


def stage_config(recipe: Recipe) -> dict[str, Any]:
    probes = {p.name: file_sha256(p) for p in sorted(PROBES.glob("*.jsonl"))}
    return {"eval": recipe.eval, "chat": recipe.chat, "seed": recipe.seed_for("eval"), "probes": probes,
            "temperature": recipe.rlhf.temperature if recipe.rlhf else 1.0}  # fmt: skip


def models(recipe: Recipe, parents: Parents) -> list[tuple[str, Path, str | None]]:
    """(label, model folder, label of the model it is compared with) in pipeline order."""
    folders = parents.folders
    out: list[tuple[str, Path, str | None]] = [("sft", folders["sft"] / "model", None)]
    if "distill" in folders and (folders["distill"] / "model").exists():
        out.append(("distill", folders["distill"] / "model", "sft"))
    rl_runs = sorted(p.parent for p in folders["rlhf"].glob("*/RUN_DONE")) if "rlhf" in folders else []
    out += [(f"rlhf/{p.name}", p / "model", recipe.rl_start()) for p in rl_runs]
    if "merge" in folders and rl_runs:
        out.append(("merge", folders["merge"] / "model", f"rlhf/{rl_runs[0].name}"))
    return out


def main(recipe: Recipe, parents: Parents) -> Path:
    from posttrain.engines.evaluation import evaluate_models, report_markdown

    with StageOutput(recipe.run_dir / "eval", "eval", stage_config(recipe), parents.hashes) as out:
        results = evaluate_models(recipe, parents, models(recipe, parents))
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
