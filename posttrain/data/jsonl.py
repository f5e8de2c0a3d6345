"""JSONL reading that keeps `file:line` for every row, so every error can point at its line; writing a stage's
data splits."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def read_jsonl(lines: Iterable[str], source: str, errors: list[str]) -> Iterator[tuple[str, Any]]:
    """Yield (`source:line`, row) for each non-blank line; a line that is not JSON goes into `errors`."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"{source}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{source}:{n}: not valid JSON ({e.msg} at column {e.colno})")


def write_splits(stage_dir: Path, splits: dict[str, list[dict]]) -> None:
    """Write each split to `<stage_dir>/data/<name>.jsonl` (atomically), one row per line, without the
    internal `_where` key that validation adds."""
    from posttrain.outputs import write_atomic

    (stage_dir / "data").mkdir(exist_ok=True)
    for name, rows in splits.items():
        text = "".join(
            json.dumps({k: v for k, v in r.items() if k != "_where"}, ensure_ascii=False) + "\n" for r in rows
        )
        write_atomic(stage_dir / "data" / f"{name}.jsonl", text)
