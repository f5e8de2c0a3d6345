"""JSONL reading that keeps `file:line` for every row, so every error can point at its line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
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
