"""`data` stage: the training and evaluation splits, validated and filtered, with a report.

Reads the recipe's `data:` source (the built-in world, JSONL files or a Hugging Face dataset), checks every row
before any model loads (all bad rows are reported as `file:line: reason` in one error), checks lengths after
rendering with the policy's tokenizer (prompts are cut from the left; rows whose response cannot fit are dropped
and counted; above `data.max_dropped_fraction` the stage fails), then runs the Gemma 2 filters on the training
split (personal data, unsafe content, wrong self-identification, contamination with the evaluation prompts,
exact and near duplicates).

Writes `runs/<recipe>/data/`: `data/train.jsonl`, `data/eval.jsonl`, `data_report.json`, `data_report.md`.

    CPU:        posttrain stage data recipes/tiny/pipeline.yaml      (or: make data)
    any node:   the same; this stage loads no model and runs in one process
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from posttrain import world
from posttrain.config import Recipe
from posttrain.data.filters import apply_filters
from posttrain.data.formats import check_dropped, length_check
from posttrain.data.jsonl import write_splits
from posttrain.data.sources import load_split
from posttrain.outputs import Parents, StageOutput


def parents(recipe: Recipe) -> list[str]:
    return []


def stage_config(recipe: Recipe) -> dict[str, Any]:
    """What this stage's output depends on (its hash decides whether it reruns)."""
    return {
        "seed": recipe.seed_for("data"),
        "world": recipe.world if recipe.data.source == "world" else None,
        "data": recipe.data,
        "chat": recipe.chat,
        "tokenizer": recipe.model.tokenizer or recipe.model.name_or_path,
    }


def load_rows(recipe: Recipe) -> tuple[list[dict], list[dict], dict[str, list[str]]]:
    """(train rows, eval rows, {split: the bad rows dropped}) from the configured source, every row validated
    (bad rows dropped up to `data.max_bad_fraction`)."""
    cfg, system = recipe.data, recipe.chat.system
    if cfg.source == "world":
        ev = world.eval_split(recipe.world, recipe.seed_for("data"))
        d = recipe.world.defects
        if any(v > 0 for v in d.__dict__.values()):
            tr = world.raw_dataset(recipe.world, recipe.world.n_train, recipe.seed_for("data"), ev)
        else:
            tr = world.train_split(recipe.world, recipe.seed_for("data"), eval_rows=ev)
        return tr, ev, {}
    train, bad_train = load_split(cfg, "train", "conversations", system)
    held = load_split(cfg, "eval", "conversations", system)
    if held is None:
        n_eval = max(1, round(cfg.eval_fraction * len(train)))
        train, held = train[n_eval:], (train[:n_eval], [])
    bad = {"train": bad_train, "eval": held[1]}
    for split, errors in bad.items():
        if errors:
            print(f"[data] {split}: dropped {len(errors)} bad row(s) (data.max_bad_fraction "
                  f"{cfg.max_bad_fraction}): " + "; ".join(errors[:3]))  # fmt: skip
    return train, held[0], bad


def main(recipe: Recipe, parents: Parents) -> Path:
    from posttrain.modeling import load_tokenizer

    # --- config & logging
    cfg = stage_config(recipe)
    with StageOutput(recipe.run_dir / "data", "data", cfg, parents.hashes) as out:
        print(f"[data] recipe {recipe.name}: source={recipe.data.source}, config {out.hash}")
        # --- data
        train, ev, bad = load_rows(recipe)
        tokenizer = load_tokenizer(recipe.model)
        report: dict[str, Any] = {"source": recipe.data.source, "max_length": recipe.chat.max_length}
        if bad:
            report["bad_rows"] = {k: {"count": len(v), "examples": v[:5]} for k, v in bad.items()}
        splits = {}
        for name, rows in (("train", train), ("eval", ev)):
            kept, dropped, truncated = length_check(rows, "conversations", tokenizer, recipe.chat)
            n_drop = sum(len(v) for v in dropped.values())
            report[f"{name}_length"] = {
                "rows": len(rows), "dropped": {k: {"count": len(v), "examples": v[:5]} for k, v in dropped.items()},
                "prompts_cut_from_left": truncated,
            }  # fmt: skip
            check_dropped(name, n_drop, len(rows), recipe.data.max_dropped_fraction, "data.max_dropped_fraction",
                          f"rows do not fit chat.max_length {recipe.chat.max_length}",
                          "raise chat.max_length or shorten the data")  # fmt: skip
            splits[name] = kept
        # --- filters (training split; the evaluation prompts are the contamination reference)
        train_kept, filt = apply_filters(splits["train"], recipe.data.filters, splits["eval"])
        report["filters"] = filt
        report["tasks"] = {
            "train": dict(Counter(r.get("task", "?") for r in train_kept)),
            "eval": dict(Counter(r.get("task", "?") for r in splits["eval"])),
        }
        if recipe.data.source == "world":
            report["mix"] = world.mix_check(train, recipe.world)
            for t, m in report["mix"].items():
                if m["short"]:
                    print(f"[data] warning: task {t}: {m['drawn']} distinct training prompts of the {m['asked']} its "
                          f"mix weight asks for — its prompts run out (widen {m['widen']}); the other families "
                          "got the rest")  # fmt: skip
        labelled = [r for r in splits["train"] if "defect" in r.get("meta", {})]
        if labelled:
            report["filter_check"] = defect_check(labelled, {r["id"] for r in train_kept})
        # --- save
        write_splits(out.path, {"train": train_kept, "eval": splits["eval"]})
        (out.path / "data_report.json").write_text(json.dumps(report, indent=2) + "\n")
        (out.path / "data_report.md").write_text(
            report_markdown(report, len(train), len(train_kept), len(splits["eval"]))
        )
        out.summary = {"train_rows": len(train_kept), "eval_rows": len(splits["eval"]), "rows_in": len(train)}
        print(report_markdown(report, len(train), len(train_kept), len(splits["eval"])))
    return out.final


def defect_check(rows: list[dict], kept_ids: set[str]) -> dict[str, dict[str, float]]:
    """On the world's labelled raw data: the share of each defect (and of clean rows) that was removed."""
    by = Counter(r["meta"]["defect"] or "clean" for r in rows)
    removed = Counter(r["meta"]["defect"] or "clean" for r in rows if r["id"] not in kept_ids)
    return {
        k: {"rows": n, "removed": removed[k], "removed_fraction": round(removed[k] / n, 4)}
        for k, n in by.items()
    }


def report_markdown(report: dict, rows_in: int, rows_out: int, n_eval: int) -> str:
    lines = [
        "## Data", "", "| | rows |", "|---|---:|", f"| training rows in | {rows_in} |",
    ]  # fmt: skip
    if report.get("bad_rows", {}).get("train", {}).get("count"):
        lines.append(
            f"| dropped: bad rows (data.max_bad_fraction) | {report['bad_rows']['train']['count']} |"
        )
    for k, v in report["train_length"]["dropped"].items():
        lines.append(f"| dropped: {k} | {v['count']} |")
    for k, v in report["filters"]["removed"].items():
        lines.append(f"| removed: {k} (e.g. {', '.join(v['examples'][:2])}) | {v['count']} |")
    lines += [f"| **training rows out** | **{rows_out}** |", f"| evaluation rows | {n_eval} |", ""]
    if "mix" in report:
        lines += ["World task families — distinct training prompts drawn (before filtering) against the mix:", "",
                  "| family | mix asks | drawn | |", "|---|---:|---:|---|"]  # fmt: skip
        for t, m in report["mix"].items():
            note = f"**short**: its prompts run out; widen {m['widen']}" if m["short"] else ""
            lines.append(f"| {t} | {m['asked']} | {m['drawn']} | {note} |")
        lines.append("")
    if "filter_check" in report:
        lines += ["World labels — share of each injected defect removed by the filters:", "",
                  "| defect | rows | removed |", "|---|---:|---:|"]  # fmt: skip
        for k, v in sorted(report["filter_check"].items()):
            lines.append(f"| {k} | {v['rows']} | {v['removed_fraction']:.1%} |")
        lines.append("")
    return "\n".join(lines) + "\n"
