"""The tiny checkpoints the embedded recipe starts from, as a real recipe starts from hub checkpoints.

`make tiny-models` trains them with the project's own stages (`recipes/tiny/tiny-models.yaml`) and ships each
finished stage's model with

    python -m posttrain.shipped runs/tiny-models/teacher tiny-teacher

which copies the stage's `model/` (weights, config, tokenizer) into `data/models/<name>/`, records in
`data/models/manifest.json` each file's sha256, the command, recipe, seed, git commit, library versions and the
stage's figures, and re-pins every recipe under `recipes/` that pinned the previous weights
(`revision: sha256:…`, checked when a model loads). The new copy replaces the old only once it is complete; shipped
models stay under MAX_BYTES in all, so that they belong in the repository.

    python -m posttrain.shipped --check      every shipped folder against the manifest (what `make test` checks)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from posttrain.files import (
    PIN,
    WEIGHTS,
    file_sha256,
    human_bytes,
    read_summary,
    replace_folder,
    write_atomic,
)
from posttrain.outputs import read_done

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "data" / "models"
MANIFEST = "manifest.json"
MAX_BYTES = 10 * 2**20
RECIPE = "recipes/tiny/tiny-models.yaml"


class ShipError(ValueError):
    """A model cannot be shipped or a shipped one does not match its manifest; the message says what to do."""


def read_manifest(out: Path = SHIPPED) -> dict:
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def stage_figures(stage: Path) -> dict:
    """What the stage measured: its last step and its summary row's figures (losses, world score and per task,
    parameters, rows, wall time)."""
    rows = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = read_summary(stage)
    steps = max((r.get("step", 0) for r in rows if isinstance(r.get("step"), int)), default=0)
    keep = (
        "train_loss",
        "eval_loss",
        "world_score",
        "world_per_task",
        "parameters",
        "train_rows",
        "wall_time_s",
    )
    figures = {k: summary[k] for k in keep if summary.get(k) is not None}
    return {"steps": steps, **figures}


def ship(
    stage: Path, name: str, out: Path = SHIPPED, recipes: Path = ROOT / "recipes", recipe: str = RECIPE
) -> dict:
    """Copy a finished stage's model into `out/name`, record it in the manifest and re-pin the recipes."""
    done = read_done(stage)
    model = stage / "model"
    if done is None or not (model / WEIGHTS).is_file():
        raise ShipError(
            f"{stage} is not a finished stage with a {WEIGHTS} in model/ (its DONE is missing); run it first"
        )
    files = sorted(p for p in model.iterdir() if p.is_file())
    manifest = read_manifest(out)
    others = sum(f.stat().st_size for n in manifest if n != name for f in (out / n).glob("*"))
    size = sum(f.stat().st_size for f in files)
    if size + others > MAX_BYTES:
        raise ShipError(
            f"{name}: {human_bytes(size)} with the other shipped models' {human_bytes(others)} exceeds "
            f"{human_bytes(MAX_BYTES)}; shipped models live in the repository — choose a smaller preset"
        )
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.new"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in files:
        shutil.copy2(f, tmp / f.name)
    made = _provenance(stage)  # where and how the stage trained it, not where it is shipped from
    entry = {
        "files": {f.name: file_sha256(tmp / f.name) for f in files},
        "bytes": size,
        "stage": stage.name,
        "config_hash": done.get("config_hash"),
        "command": "make tiny-models",
        "recipe": recipe,
        "seed": _seed(stage),
        "git_commit": made.get("git_commit"),
        "versions": made.get("versions"),
        "trained": made.get("finished"),
        "figures": stage_figures(stage),
    }
    old = manifest.get(name, {}).get("files", {}).get(WEIGHTS)
    # the recipes first: an interrupted ship leaves them pinned to weights that are still in place or shipped next
    entry["repinned"] = repin(recipes, old, entry["files"][WEIGHTS]) if old else []
    replace_folder(tmp, out / name)
    manifest[name] = {k: v for k, v in entry.items() if k != "repinned"}
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return entry


def _provenance(stage: Path) -> dict:
    path = stage / "provenance.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _seed(stage: Path) -> int | None:
    import yaml

    path = stage / "config.yaml"
    config = yaml.safe_load(path.read_text()) if path.exists() else None
    return config.get("seed") if isinstance(config, dict) else None


def repin(recipes: Path, old: str, new: str) -> list[str]:
    """Replace the pin of the previous weights by the new one in every recipe; the files changed."""
    changed = []
    if old == new:
        return changed
    for path in sorted(recipes.rglob("*.yaml")):
        text = path.read_text()
        if PIN + old in text:
            write_atomic(path, text.replace(PIN + old, PIN + new))
            changed.append(str(path))
    return changed


def check(out: Path = SHIPPED, recipes: Path = ROOT / "recipes") -> list[str]:
    """Every problem of the shipped folders against the manifest (a missing, changed or unlisted file), and every
    recipe pin of a shipped folder that the manifest does not hold."""
    manifest = read_manifest(out)
    if not manifest:
        return [f"{out / MANIFEST}: missing or empty; rebuild the shipped models with `make tiny-models`"]
    problems = []
    for name, entry in manifest.items():
        folder = out / name
        for fname, digest in entry["files"].items():
            path = folder / fname
            if not path.is_file():
                problems.append(f"{path}: missing (the manifest lists it); rebuild with `make tiny-models`")
            elif file_sha256(path) != digest:
                problems.append(
                    f"{path}: sha256 differs from {out / MANIFEST}; restore it or run `make tiny-models`"
                )
        extra = sorted(p.name for p in folder.glob("*") if p.name not in entry["files"])
        problems += [f"{folder / e}: not in the manifest" for e in extra]
    shipped = {e["files"].get(WEIGHTS) for e in manifest.values()}
    for path in sorted(recipes.rglob("*.yaml")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            pin = re.search(PIN + r"([0-9a-f]{64})", line)
            if pin and pin[1] not in shipped:
                problems.append(
                    f"{path}:{i}: pins {pin[1][:16]}…, which no shipped model has ({out / MANIFEST})"
                )
    total = sum(e["bytes"] for e in manifest.values())
    if total > MAX_BYTES:
        problems.append(f"shipped models hold {human_bytes(total)}, more than {human_bytes(MAX_BYTES)}")
    return problems


def _shown(path: Path) -> Path:
    """A path as a recipe in the repository names it: relative to the repository when it lies inside."""
    path = path.resolve()
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m posttrain.shipped", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "stage", nargs="?", type=Path, help="a finished stage folder, e.g. runs/tiny-models/teacher"
    )
    ap.add_argument("name", nargs="?", help="the shipped model's name, e.g. tiny-teacher")
    ap.add_argument("--out", type=Path, default=SHIPPED)
    ap.add_argument("--recipe", default=RECIPE, help="the recipe the stage ran (recorded in the manifest)")
    ap.add_argument("--check", action="store_true", help="check the shipped folders against the manifest")
    args = ap.parse_args(argv)
    if args.check or args.stage is None:
        problems = check(args.out)
        print("\n".join(problems) or f"{args.out}: every shipped file matches {MANIFEST}")
        return 1 if problems else 0
    if args.name is None:
        ap.error("give the stage folder and the name to ship it as")
    try:
        entry = ship(args.stage, args.name, args.out, recipe=args.recipe)
    except ShipError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    pin = PIN + entry["files"][WEIGHTS]
    folder = _shown(args.out / args.name)
    print(f"shipped {args.stage}/model as {folder} ({human_bytes(entry['bytes'])}), pinned {pin}")
    figures = entry["figures"]
    print(f"  world score {figures.get('world_score')} per task {figures.get('world_per_task')}")
    for path in entry["repinned"]:
        print(f"  re-pinned {path}")
    if not entry["repinned"]:
        print(f"  recipes that start from it: name_or_path: {folder}, revision: {pin}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
