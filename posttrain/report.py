"""The run's figures side by side: one markdown table over every finished (or gate-failed) stage folder."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain import registry, world
from posttrain.files import read_summary
from posttrain.outputs import GATE_FAILED, read_done
from posttrain.rl import world_change


def _wall(folder: Path) -> str:
    try:
        rows = folder.joinpath("metrics.jsonl").read_text().splitlines()
        return f"{json.loads(rows[-1]).get('wall_time_s', 0) / 60:.1f} min"
    except (OSError, IndexError, ValueError):
        return ""


def _scored(figures: dict) -> dict | None:
    """An RL run's or a merge point's world figures as `world_rows` holds them; None without per-task scores."""
    if not figures.get("world_per_task"):
        return None
    return {"score": figures["world_score"], "per_task": figures["world_per_task"],
            "scores": figures.get("world_scores")}  # fmt: skip


def _versus(res: dict | None, base: dict | None, label: str, comparisons: int = 1) -> dict | None:
    """`res` with the per-prompt scores of the model it started from (`base`), where both have them."""
    if not res or not base or not res.get("scores") or not base.get("scores"):
        return res
    return {**res, "base": label, "base_scores": base["scores"], "comparisons": comparisons}


def world_rows(run_dir: Path) -> list[tuple[str, dict, str]]:
    """(label, {"score", "per_task", …}, wall) for every model of the run that was scored on the world. Where the
    per-prompt scores of the model and of the one it started from are both kept, the figures also hold
    `scores`, `base_scores` (the start's), `base` (its label) and `comparisons` (how many models are compared with
    that start together: the RL runs, the merges)."""
    out: list[tuple[str, dict, str]] = []
    current = current_stages(run_dir)
    distilled = read_done(run_dir / "distill")
    given = distilled is not None and "teacher" not in distilled.get("parents", {})  # not trained by this run

    for stage in ("teacher", "sft"):
        path = run_dir / stage / "eval.json"
        if path.exists() and stage in current and not (given and stage == "teacher"):
            ev = json.loads(path.read_text())
            out += [
                (f"{stage}: untrained", ev.get("before"), ""),
                (
                    f"{stage}: trained",
                    _versus(ev.get("after"), ev.get("before"), "untrained"),
                    _wall(run_dir / stage),
                ),
            ]
    path = run_dir / "distill" / "eval.json"
    if path.exists() and "distill" in current:
        ev = json.loads(path.read_text())
        if given:  # a teacher the recipe names (e.g. a shipped one), scored by the distill stage
            out.insert(0, ("teacher: from the recipe", ev.get("teacher"), ""))
        out.append(("distill", _versus(ev.get("distill"), ev.get("sft"), "sft"), _wall(run_dir / "distill")))
    out += _rl_and_merge_rows(run_dir, current)
    return [(label, res, wall) for label, res, wall in out if res]


def _rl_and_merge_rows(run_dir: Path, current: set[str]) -> list[tuple[str, dict | None, str]]:
    """The RL runs' and the merges' rows of `world_rows`, each against the policy RL started from."""
    out: list[tuple[str, dict | None, str]] = []
    figs = sorted((run_dir / "rlhf").glob("*/figures.json")) if "rlhf" in current else []
    for fig in figs:
        r = json.loads(fig.read_text())
        out.append(
            (
                f"rlhf: {fig.parent.name}",
                _versus(_scored(r["end"]), _scored(r["start"]), "start", len(figs)),
                "",
            )
        )
    path = run_dir / "merge" / "points.json"
    if path.exists() and "merge" in current:
        points = json.loads(path.read_text())
        start = _scored(next((p for p in points if p["kind"] == "start"), {}))
        merges = [p for p in points if p["kind"] == "merge" and p.get("world_per_task")]
        for p in merges:
            out.append((f"merge: {p['label']}", _versus(_scored(p), start, "start", len(merges)), ""))
    return out


def change_cell(res: dict) -> str:
    """The gain over the model a row started from, with its 95% band and the sign test's verdict
    (`posttrain.rl.world_change`): "+0.036 ± 0.029 (+14 / −4, p 0.031, corrected × 2): **better**"."""
    if not res.get("base_scores"):
        return ""
    c = world_change(res["base_scores"], res["scores"], res["comparisons"])
    p = c["p_better"] if c["gain"] >= 0 else c["p_worse"]
    verdict = "noise" if c["verdict"] == "noise" else f"**{c['verdict']}**"
    corrected = f", corrected × {c['comparisons']}" if c["comparisons"] > 1 else ""
    return (f"{c['gain']:+.3f} ± {c['band']:.3f} (+{c['better']} / −{c['worse']}, p {p:.3g}{corrected}): "
            f"{verdict}")  # fmt: skip


def world_table(run_dir: Path) -> str:
    """Held-out world scores of every trained model of the run, per task family, with wall time, and each
    model's gain over the one it started from with its noise band (`change_cell`)."""
    tasks = list(world.TASKS)
    lines = [
        "| model | world score | "
        + " | ".join(tasks)
        + " | gain over its start (95% band; sign test) | wall |",
        "|---|---:|" + "---:|" * len(tasks) + "---|---:|",
    ]
    rows = world_rows(run_dir)
    for label, res, wall in rows:
        cells = [f"{res['per_task'][t]:.2f}" if t in res["per_task"] else "" for t in tasks]
        start = f"{res['base']}: " if res.get("base") else ""
        lines.append(f"| {label} | **{res['score']:.3f}** | " + " | ".join(cells)
                     + f" | {start}{change_cell(res)} | {wall} |")  # fmt: skip
    if not rows:
        return ""
    return (
        "## World evaluation (held-out prompts, greedy)\n\n" + "\n".join(lines) + "\n\n"
        "A gain is beyond noise when a one-sided exact sign test over the prompts whose score changed gives "
        "p < 0.05 (Bonferroni-corrected for the runs or merges compared with the same start); the band is "
        "± 1.96 standard errors of the mean per-prompt difference.\n"
    )


# ------------------------------------------------------------------------------------------ the run report

REPORTS = {
    "data": "data_report.md",
    "generate": "generate_report.md",
    "rm": "rm_report.md",
    "merge": "merge_report.md",
    "eval": "eval_report.md",
}
KEY_FIGURES = {  # summary keys worth a column in the stage table, per stage
    "data": ("rows_out",), "teacher": ("world_score",), "generate": ("rows_out", "teacher_correct", "tokens_per_s"),
    "sft": ("world_score", "train_loss"), "distill": ("world_score", "gap_closed"),
    "rm": ("heldout_accuracy", "standard_read_accuracy", "heldout_loss", "length_correlation"),
    "merge": ("reward", "kl", "world_score"),
}  # fmt: skip


def _fmt(v) -> str:
    if v is None:  # a figure the run does not have, e.g. the RM reward of RL against the verifiers
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


GATE_STATUS = "failed its quality gate"  # a `.partial` folder holding GATE_FAILED (the `rm` stage)


def stage_states(run_dir: Path) -> dict[str, tuple[Path, str]]:
    """Each stage with an output folder → (folder, status): `done`; `stale (made from an older X)` when a parent X
    was rerun after it (its DONE names parent hashes the parents no longer have) or X is not current itself; and
    `failed or incomplete` — its `.partial` folder — when there is no current finished output beside it (a
    `.partial` next to a current output is an attempt with another config that failed; the output stands), or
    `failed its quality gate` when that folder records a gate failure (`GATE_FAILED`, the `rm` stage)."""
    records = {stage: read_done(run_dir / stage) for stage in registry.NAMES}
    out: dict[str, tuple[Path, str]] = {}
    for stage in registry.NAMES:
        done, partial = run_dir / stage, run_dir / f"{stage}.partial"
        record, status = records[stage], None
        if record is not None:
            older = [
                p for p, h in record.get("parents", {}).items()
                if (records.get(p) or {}).get("config_hash") != h or out.get(p, (0, "done"))[1] != "done"
            ]  # fmt: skip
            status = f"stale (made from an older {', '.join(older)})" if older else "done"
        if partial.exists() and status != "done":
            gate = (partial / GATE_FAILED).exists()
            out[stage] = (partial, GATE_STATUS if gate else "failed or incomplete")
        elif status is not None:
            out[stage] = (done, status)
    return out


def current_stages(run_dir: Path) -> set[str]:
    """The stages whose finished output is current (`stage_states` says `done`)."""
    return {stage for stage, (_, status) in stage_states(run_dir).items() if status == "done"}


def stage_table(run_dir: Path) -> str:
    lines = ["| stage | status | wall | figures |", "|---|---|---:|---|"]
    for stage, (folder, status) in stage_states(run_dir).items():
        s = read_summary(folder)
        figs = ", ".join(f"{k} {_fmt(s[k])}" for k in KEY_FIGURES.get(stage, ()) if s.get(k) is not None)
        if stage == "rlhf" and s.get("runs"):
            figs = "; ".join(
                f"{name}: reward {_fmt(r['start'].get('reward'))} → {_fmt(r['end'].get('reward'))}, KL "
                f"{_fmt(r['end']['kl'])}, world {_fmt(r['start']['world_score'])} → {_fmt(r['end']['world_score'])}"
                for name, r in s["runs"].items()
            )  # fmt: skip
        if status == GATE_STATUS:
            figs = _gate_figures(folder)
        wall = f"{s['wall_time_s'] / 60:.1f} min" if "wall_time_s" in s else ""
        lines.append(f"| `{stage}` | {status} | {wall} | {figs} |")
    return "\n".join(lines) + "\n"


def _gate_figures(folder: Path) -> str:
    """A gate-failed attempt's held-out figures against its threshold (from its `rm_report.json`)."""
    try:
        report = json.loads((folder / "rm_report.json").read_text())
        h = report["held_out"]
    except (OSError, ValueError, KeyError):
        return ""
    return (f"heldout_accuracy {_fmt(h['accuracy'])} < min_accuracy {_fmt(report.get('min_accuracy'))}, "
            f"heldout_loss {_fmt(h['loss'])}, length_correlation {_fmt(h['length_correlation'])}")  # fmt: skip


def sweep_table(variants: list[tuple[dict[str, str], Path]], stages: list[str]) -> str:
    """One row per sweep variant (its grid values, then the key figures of each of `stages`; each RL run's RM
    reward, KL and world score at the end)."""
    keys = list(variants[0][0]) if variants else []
    rows, columns = [], []
    for labels, run_dir in variants:
        figs: dict[str, str] = {}
        states = stage_states(run_dir)
        for stage in stages:
            folder, status = states.get(stage, (None, "not run"))
            s = read_summary(folder) if folder else {}
            if not s:
                figs[f"{stage}"] = status
            for k in KEY_FIGURES.get(stage, ()):
                if s.get(k) is not None:
                    figs[f"{stage} {k}"] = _fmt(s[k])
            for label, r in s.items() if stage == "eval" else ():  # every evaluated model's world score
                if isinstance(r, dict) and r.get("world_score") is not None:
                    figs[f"eval {label} world"] = _fmt(r["world_score"])
            for name, r in (s.get("runs") or {}).items() if stage == "rlhf" else ():
                for k, v in (("reward", r["end"].get("reward")), ("KL", r["end"].get("kl")),
                             ("world", r["end"].get("world_score"))):  # fmt: skip
                    figs[f"rlhf {name} {k}"] = _fmt(v)
        columns += [c for c in figs if c not in columns]
        rows.append((labels, figs, run_dir))
    lines = [
        "| " + " | ".join(keys + columns + ["run"]) + " |",
        "|" + "---|" * (len(keys) + len(columns) + 1),
    ]
    for labels, figs, run_dir in rows:
        cells = [labels[k] for k in keys] + [figs.get(c, "") for c in columns] + [f"`{run_dir}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rl_section(run_dir: Path) -> str:
    figs = sorted((run_dir / "rlhf").glob("*/figures.json"))
    if not figs or "rlhf" not in current_stages(run_dir):
        return ""
    lines = ["## RL runs", "",
             "| run | kl_coef | anchor | RM reward start → end | KL to start (k1 / k3) | world score start → end | "
             "prompts better / worse | length |",
             "|---|---:|---|---|---|---|---|---:|"]  # fmt: skip
    images = []
    for f in figs:
        r = json.loads(f.read_text())
        a, b = r["start"], r["end"]
        lines.append(f"| {r['run']} | {r['kl_coef']} | {r['anchor']} | {_fmt(a.get('reward'))} → {_fmt(b.get('reward'))} | "
                     f"{_fmt(b['kl'])} / {_fmt(b['kl_k3'])} | {_fmt(a['world_score'])} → {_fmt(b['world_score'])} | "
                     f"{world_verdict(a, b, len(figs))} | {b['length']:.1f} |")  # fmt: skip
        if (f.parent / "curves.png").exists():
            images.append(f"![{r['run']}: reward and KL against step](rlhf/{f.parent.name}/curves.png)")
    return "\n".join(lines + [""] + images) + "\n"


def world_verdict(start: dict, end: dict, comparisons: int = 1) -> str:
    """An RL run's world score, prompt by prompt (`posttrain.rl.world_change`): "+3 / −2 of 700: noise", then the
    task families that fell beyond noise (`families_that_fell`), and **reward hacking** where the RM reward rose while
    the world score, or a family's, fell beyond noise. Empty for figures without per-prompt scores (runs made before
    they were kept, or off the built-in world)."""
    if not start.get("world_scores") or not end.get("world_scores"):
        return ""
    c = world_change(start["world_scores"], end["world_scores"], comparisons)
    verdict = c["verdict"] if c["verdict"] == "noise" else f"**{c['verdict']}**"
    p = c["p_better"] if c["better"] >= c["worse"] else c["p_worse"]
    text = f"+{c['better']} / −{c['worse']} of {c['n']} (p {p:.3g}): {verdict}"
    rose = None not in (start.get("reward"), end.get("reward")) and end["reward"] > start["reward"]
    if c["verdict"] == "worse" and rose:
        return text + " — **reward hacking**: the RM reward rose while the world score fell"
    fell = families_that_fell(start, end, comparisons)
    if fell:
        text += "; fell: " + ", ".join(
            f"{t} +{f['better']} / −{f['worse']} (p {f['p_worse']:.3g})" for t, f in fell
        )
        if rose:
            text += (
                f" — **reward hacking** in {', '.join(t for t, _ in fell)}: the RM reward rose while it fell"
            )
    return text


def families_that_fell(start: dict, end: dict, comparisons: int = 1) -> list[tuple[str, dict]]:
    """The task families whose world score fell beyond noise, prompt by prompt (`world_change` on each family's
    prompts, corrected for the runs × families compared): a run's gain in one family can hide its RM being gamed in
    another. Empty for figures without per-prompt tasks."""
    tasks = start.get("world_tasks")
    if not tasks or tasks != end.get("world_tasks"):
        return []
    families = sorted(set(tasks))
    out = []
    for t in families:
        idx = [i for i, task in enumerate(tasks) if task == t]
        c = world_change([start["world_scores"][i] for i in idx], [end["world_scores"][i] for i in idx],
                         comparisons * len(families))  # fmt: skip
        if c["verdict"] == "worse":
            out.append((t, c))
    return out


def write_report(run_dir: Path) -> Path:
    """`report.md` and `report.html` in `run_dir`: every stage's figures side by side, the world scores, the data
    and filter counts, the RM gate, the RL curves and the reward–KL plot of the runs and merges."""
    run_dir = Path(run_dir)
    parts = [f"# Run report: {run_dir.name}\n", stage_table(run_dir), world_table(run_dir)]
    states = stage_states(run_dir)
    current = {stage for stage, (_, status) in states.items() if status == "done"}
    if (run_dir / "eval" / REPORTS["eval"]).exists() and "eval" in current:
        parts.append((run_dir / "eval" / REPORTS["eval"]).read_text())
    ev = run_dir / "distill" / "eval.json"
    if ev.exists() and "distill" in current:
        d = json.loads(ev.read_text())
        if d.get("gap_closed") is not None:
            parts.append(f"Distillation: world score {d['sft']['score']:.3f} (student after SFT) → "
                         f"{d['distill']['score']:.3f} (after distillation); teacher {d['teacher']['score']:.3f}: "
                         f"**{d['gap_closed']:.0%}** of the student–teacher gap closed.\n")  # fmt: skip
    for stage in ("data", "generate", "rm"):
        folder, _ = states.get(stage, (None, ""))
        if folder is not None and (folder / REPORTS[stage]).exists():
            parts.append((folder / REPORTS[stage]).read_text())
    parts.append(rl_section(run_dir))
    if (run_dir / "merge" / REPORTS["merge"]).exists() and "merge" in current:
        parts.append((run_dir / "merge" / REPORTS["merge"]).read_text())
        parts.append("![reward against KL: the RL runs and their merges](merge/reward_kl.png)\n")
    md = "\n".join(p for p in parts if p)
    (run_dir / "report.md").write_text(md)
    (run_dir / "report.html").write_text(to_html(md, f"posttrain — {run_dir.name}"))
    return run_dir / "report.md"


def to_html(md: str, title: str) -> str:
    """The subset of markdown the report uses (headings, tables, images, bold, code, paragraphs) as one page."""
    import html
    import re

    def inline(text: str) -> str:
        t = html.escape(text)
        t = re.sub(
            r"!\[([^\]]*)\]\(([^)]+)\)",
            r'<figure><img src="\2" alt="\1"><figcaption>\1</figcaption></figure>',
            t,
        )
        t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", t)

    out, table = [], []

    def flush_table() -> None:
        if not table:
            return
        rows = [
            [c.strip() for c in r.strip().strip("|").split("|")]
            for r in table
            if not re.match(r"^\|[-:| ]+\|$", r.strip())
        ]
        out.append("<table>" + "".join(
            "<tr>" + "".join(f"<{'th' if i == 0 else 'td'}>{inline(c)}</{'th' if i == 0 else 'td'}>" for c in row) + "</tr>"
            for i, row in enumerate(rows)) + "</table>")  # fmt: skip
        table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush_table()
        if m := re.match(r"^(#{1,3}) (.*)", line):
            out.append(f"<h{len(m.group(1))}>{inline(m.group(2))}</h{len(m.group(1))}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}"
             "th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}img{max-width:100%}"
             "figure{display:inline-block;margin:0 1em 1em 0}figcaption{font-size:12px;color:#666}")  # fmt: skip
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")  # fmt: skip


def print_reports(run_dir: Path, stages: list[str]) -> None:
    """The reports of the stages run so far (a gate-failed stage's from its .partial folder), then the world
    table and the stage table; writes `report.md` and `report.html`."""
    states = stage_states(run_dir)  # a stage with no current output shows its failed attempt (.partial)
    for name in ("data", "generate", "rm", "merge"):
        folder, _ = states.get(name, (None, ""))
        if name in stages and folder is not None and (folder / REPORTS[name]).exists():
            print("\n" + (folder / REPORTS[name]).read_text())
    table = world_table(run_dir)
    if table:
        print("\n" + table)
    print("\n" + stage_table(run_dir))
    path = write_report(run_dir)
    print(f"[run] report: {path} (and {path.with_suffix('.html')})")
