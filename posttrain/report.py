"""The run's figures side by side: one markdown table over every finished (or gate-failed) stage folder."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import world


def _wall(folder: Path) -> str:
    try:
        rows = folder.joinpath("metrics.jsonl").read_text().splitlines()
        return f"{json.loads(rows[-1]).get('wall_time_s', 0) / 60:.1f} min"
    except (OSError, IndexError, ValueError):
        return ""


def world_table(run_dir: Path) -> str:
    """Held-out world scores before and after each training stage, per task family, with wall time."""
    tasks = list(world.TASKS)
    lines = [
        "| model | world score | " + " | ".join(tasks) + " | wall |",
        "|---|---:|" + "---:|" * (len(tasks) + 1),
    ]
    found = False
    for stage in ("teacher", "sft"):
        path = run_dir / stage / "eval.json"
        if not path.exists():
            continue
        ev = json.loads(path.read_text())
        for label, key in ((f"{stage}: untrained", "before"), (f"{stage}: trained", "after")):
            res = ev.get(key)
            if not res:
                continue
            found = True
            cells = [f"{res['per_task'][t]:.2f}" if t in res["per_task"] else "" for t in tasks]
            wall = _wall(run_dir / stage) if key == "after" else ""
            lines.append(f"| {label} | **{res['score']:.3f}** | " + " | ".join(cells) + f" | {wall} |")
    if not found:
        return ""
    return "## World evaluation (held-out prompts, greedy)\n\n" + "\n".join(lines) + "\n"
