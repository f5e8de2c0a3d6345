"""Where rows come from: the built-in world, local JSONL files, or Hugging Face datasets by name.

Every source yields rows in the project's formats (TRL's standard formats are converted, `posttrain.data.formats`)
with `id` set and `_where` — `file:line` for JSONL, `dataset:split:row` (the row's index in the split) for a
dataset — so that later errors can point at the row. Bad rows are dropped while they are at most the recipe's
`max_bad_fraction` of a split (`data.max_bad_fraction`, `rm.max_bad_fraction`; default 0: any bad row stops the
stage), the same for both sources. The Hugging Face path is the real one (`datasets.load_dataset` with the
recipe's split keys), used when the hub is reachable or the dataset is cached.
"""

from __future__ import annotations

from typing import Any

from posttrain.chat import ChatFormatError
from posttrain.config import DataConfig
from posttrain.data.formats import DataError, bad_row_policy, check_row, read_rows


def hf_rows(
    name: str, split: str, fmt: str, system: str, limit: int | None = None
) -> tuple[list[dict], list[str]]:
    """Rows of split `split` of dataset `name` (a hub id or a local dataset folder), each checked: (rows in our
    format, errors as `name:split:row: reason`); the first `limit` rows only when given (streamed). A dataset or
    split that cannot be loaded is a DataError that says which."""
    import datasets

    try:  # the hub client's errors (no such dataset or split, no network, no cache) become one sentence
        ds = datasets.load_dataset(name, split=split, streaming=limit is not None)
    except Exception as e:
        raise DataError([f"{name}:{split}: cannot load split {split!r} of dataset {name!r} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"], name) from None  # fmt: skip
    rows, errors = [], []
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        where = f"{name}:{split}:{i}"
        try:
            ours = check_row(dict(row), fmt, where, system)
        except ChatFormatError as e:
            errors.append(str(e))
            continue
        rows.append({"id": f"{split}-{i:06d}", **ours, "_where": where})
    return rows, errors


def read_source(source: str, name: str, split: str, fmt: str, system: str, max_bad: float, key: str
                ) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """Rows of a JSONL file (`source: jsonl`) or of a dataset's split (`hf`), bad rows dropped up to `max_bad`
    (the recipe key `key`): (rows, the bad rows dropped, one reason each)."""
    if source == "jsonl":
        rows, bad = read_rows(name, fmt, system, max_bad, key)
        for r in rows:
            r.setdefault("id", r["_where"])
        return rows, bad
    rows, bad = hf_rows(name, split, fmt, system)
    bad_row_policy(bad, len(rows) + len(bad), max_bad, key, f"{name}:{split}")
    if not rows:
        raise DataError([f"{name}:{split}: no rows"], name)
    return rows, bad


def load_split(
    cfg: DataConfig, which: str, fmt: str, system: str
) -> tuple[list[dict[str, Any]], list[str]] | None:
    """(rows, bad rows dropped) of `which` ('train' or 'eval') from the data section's jsonl or hf source; None
    when not configured."""
    name = cfg.train if which == "train" else cfg.eval
    if name is None:
        return None
    split = cfg.hf_train_split if which == "train" else cfg.hf_eval_split
    return read_source(cfg.source, name, split, fmt, system, cfg.max_bad_fraction, "data.max_bad_fraction")


def balanced_prompts(tasks: dict[str, str | None], seed: int = 0) -> list[str]:
    """Prompt keys → their task family; returns the keys with every family repeated up to the largest one's size
    (each family's keys in a seeded order, cycled), so that uniform sampling draws each family equally often."""
    import random

    groups: dict[str | None, list[str]] = {}
    for key, task in tasks.items():
        groups.setdefault(task, []).append(key)
    size, rng, out = max((len(g) for g in groups.values()), default=0), random.Random(seed), []
    for task in sorted(groups, key=str):
        keys = groups[task][:]
        rng.shuffle(keys)
        out += [keys[i % len(keys)] for i in range(size)]
    return out
