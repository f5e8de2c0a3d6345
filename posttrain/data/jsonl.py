"""JSONL reading that keeps `file:line` for every row, so every error can point at its line; reading and writing
a stage's data splits (`<stage folder>/data/<split>.jsonl`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from posttrain.files import write_atomic


def read_jsonl(lines: Iterable[str], source: str, errors: list[str]) -> Iterator[tuple[str, Any]]:
    """Yield (`source:line`, row) for each non-blank line; a line that is not JSON goes into `errors`."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"{source}:{n}", json.loads(line)
        except json.JSONDecodeError as e:
            errors.append(f"{source}:{n}: not valid JSON ({e.msg} at column {e.colno})")


class DataError(ValueError):
    """Bad data rows; `errors` holds one `file:line: reason` per row; `note`, when given, ends the message (what
    limit was passed, what to do)."""

    def __init__(self, errors: list[str], source: str = "data", note: str = ""):
        self.errors = errors
        shown = errors[:200] + ([f"... and {len(errors) - 200} more"] if len(errors) > 200 else [])
        super().__init__(
            f"{len(errors)} bad row(s) in {source}:\n" + "\n".join(shown) + (f"\n{note}" if note else "")
        )


def read_split(path: Path) -> list[dict]:
    """The rows of a split a stage wrote (`write_splits`); a line that is not JSON is a `DataError`."""
    errors: list[str] = []
    rows = [row for _, row in read_jsonl(Path(path).read_text().splitlines(), str(path), errors)]
    if errors:
        raise DataError(errors, str(path))
    return rows


def split_path(stage_dir: Path, split: str) -> Path:
    """Where a stage keeps a data split it wrote: `<stage_dir>/data/<split>.jsonl`."""
    return Path(stage_dir) / "data" / f"{split}.jsonl"


def write_splits(stage_dir: Path, splits: dict[str, list[dict]]) -> None:
    """Write each split to its `split_path` (atomically), one row per line, without the internal `_where` key
    that validation adds."""
    (stage_dir / "data").mkdir(exist_ok=True)
    for name, rows in splits.items():
        text = "".join(
            json.dumps({k: v for k, v in r.items() if k != "_where"}, ensure_ascii=False) + "\n" for r in rows
        )
        write_atomic(split_path(stage_dir, name), text)
