"""`merge` stage: weight averaging of the `rlhf` runs (Gemma 2's model averaging; WARP's SLERP + LITI).

With θ_init the policy RL started from and θ_m the runs' policies (`posttrain.merging`):

    δ_m = θ_m − θ_init,   θ_slerp = θ_init + SLERP(δ_1, …, δ_M),   θ(η) = (1 − η) θ_init + η θ_slerp      (liti)

`merge.sweep` lists the η values evaluated; each merged model answers the held-out prompts and is scored as the
RL runs were (mean RM reward of its samples, KL to θ_init on them, world score). `merge_report.md` tables the runs
and the merges, `reward_kl.png` plots them together; the model at `merge.eta` is saved as `merge/model`.
Merging streams tensor by tensor (peak memory: a few tensors, not whole models).

    CPU:  posttrain run recipes/tiny/pipeline.yaml --only merge      (or: make merge)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from posttrain.config import ConfigError, ModelSpec, Recipe, to_dict
from posttrain.data.jsonl import read_split
from posttrain.outputs import Parents, StageOutput


def parents(recipe: Recipe) -> list[str]:
    return ["data", recipe.rl_start(), "rm", "rlhf"]


def stage_config(recipe: Recipe) -> dict[str, Any]:
    return {"merge": recipe.merge, "chat": recipe.chat, "eval": recipe.eval.during_training(),
            "seed": recipe.seed_for("merge"), "max_new_tokens": recipe.rlhf and recipe.rlhf.max_new_tokens}  # fmt: skip


def main(recipe: Recipe, parents: Parents) -> Path:
    from posttrain.engines.evaluation import policy_figures, world_scorer
    from posttrain.modeling import frozen_device, load_causal_lm, load_reward_model, load_tokenizer
    from posttrain.plots import reward_kl_plot

    cfg = recipe.merge
    if cfg is None or recipe.rlhf is None:
        raise ConfigError(["stage merge: the recipe needs 'merge:' and 'rlhf:' sections"])
    # --- config & logging
    with StageOutput(recipe.run_dir / "merge", "merge", stage_config(recipe), parents.hashes) as out:
        print(f"[merge] recipe {recipe.name}, config {out.hash}: {json.dumps(to_dict(cfg))}")
        rl_dir = parents.folders["rlhf"]
        runs = sorted(p.parent for p in rl_dir.glob("*/figures.json"))
        if not runs:
            raise ConfigError([f"stage merge: no finished RL run in {rl_dir}"])
        init = parents.model(recipe.rl_start(), recipe.model)
        tokenizer = load_tokenizer(init)
        reference = load_causal_lm(
            init, tokenizer, device=frozen_device(1)
        ).eval()  # each on a GPU of its own
        rm = load_reward_model(
            parents.model("rm", recipe.reward_model), tokenizer, device=frozen_device(2)
        ).eval()
        eval_rows = recipe.eval.capped(read_split(parents.split("data", "eval")))
        evaluate = world_scorer(recipe, tokenizer, eval_rows, "merge")
        rl = recipe.rlhf

        def figures(model) -> dict:
            f = policy_figures(model, reference, rm, tokenizer, eval_rows, recipe.chat, rl.max_new_tokens,
                               rl.temperature, recipe.eval.batch_size, recipe.seed_for("merge"))  # fmt: skip
            w = evaluate(model)
            return {**f, "world_score": w and w["score"], "world_per_task": w and w["per_task"],
                    "world_scores": w and w["scores"]}  # fmt: skip

        # the start and the runs are measured again here, on the same samples' seed as the merges
        points = [{"label": recipe.rl_start(), "kind": "start", **figures(reference)}]
        log_point(out, points[-1])
        for r in runs:
            model = load_causal_lm(
                ModelSpec(name_or_path=str(r / "model"), dtype=recipe.model.dtype), tokenizer
            )
            points.append({"label": r.name, "kind": "run", **figures(model.eval())})
            log_point(out, points[-1])
        # --- merge and evaluate
        for point in merge_sweep(recipe, [r / "model" for r in runs], init, tokenizer, figures, out.path):
            points.append(point)
            log_point(out, point)
        # --- report
        reward_kl_plot(points, out.path / "reward_kl.png")
        (out.path / "points.json").write_text(json.dumps(points, indent=2) + "\n")
        (out.path / "merge_report.md").write_text(report_markdown(points, cfg))
        print(report_markdown(points, cfg))
        shutil.rmtree(out.path / "sweep")
        chosen = next(p for p in points if p["kind"] == "merge" and p["eta"] == cfg.eta)
        out.summary = {"method": cfg.method, "eta": cfg.eta, "runs": [r.name for r in runs],
                       "reward": chosen.get("reward"), "kl": chosen["kl"], "world_score": chosen["world_score"]}  # fmt: skip
    return out.final


def merge_sweep(recipe: Recipe, models: list[Path], init: ModelSpec, tokenizer, figures, folder: Path):
    """Each η of `merge.sweep` (and `merge.eta`; one point for slerp and linear): the runs merged into
    `folder/sweep/`, measured by `figures`; the model at `merge.eta` copied to `folder/model`. Yields the points."""
    from posttrain.merging import merge_models
    from posttrain.modeling import load_causal_lm

    cfg = recipe.merge
    etas = sorted(set(cfg.sweep) | {cfg.eta}) if cfg.method == "liti" else [cfg.eta]
    for eta in etas:
        merged = folder / "sweep" / f"eta_{eta:g}"
        merge_models(models, merged, cfg.method, list(cfg.weights) if cfg.weights else None,
                     base=init.name_or_path if cfg.method != "linear" else None, eta=eta)  # fmt: skip
        model = load_causal_lm(ModelSpec(name_or_path=str(merged), dtype=recipe.model.dtype), tokenizer)
        label = f"{cfg.method} η={eta:g}" if cfg.method == "liti" else cfg.method
        yield {"label": label, "kind": "merge", "eta": eta, **figures(model.eval())}
        if eta == cfg.eta:
            shutil.copytree(merged, folder / "model")


def log_point(out: StageOutput, p: dict) -> None:
    out.log({k: v for k, v in p.items() if isinstance(v, (int, float, str))})
    print(f"[merge] {p['label']}: reward {p.get('reward', float('nan')):.3f}, KL {p['kl']:.3f}, "
          f"world {p['world_score']}")  # fmt: skip


def report_markdown(points: list[dict], cfg) -> str:
    lines = ["## Merge: RL runs and their merges", "",
             "| model | kind | mean RM reward | KL to start (k1) | KL (k3) | world score | length |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for p in points:
        ws = "–" if p.get("world_score") is None else f"{p['world_score']:.3f}"
        lines.append(f"| {p['label']} | {p['kind']} | {p.get('reward', float('nan')):.3f} | {p['kl']:.3f} | "
                     f"{p['kl_k3']:.3f} | {ws} | {p['length']:.1f} |")  # fmt: skip
    lines += ["", f"Saved: {cfg.method} at η = {cfg.eta:g} (`merge/model`). Plot: `reward_kl.png`.", ""]
    return "\n".join(lines)
