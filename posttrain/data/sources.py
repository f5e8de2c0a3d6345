"""Where rows come from: the built-in world, local JSONL files, or Hugging Face datasets by name.

Every source yields rows in the project's formats with `id` set; JSONL rows also carry `_where` (`file:line`)
so that later errors can point at the line. The Hugging Face path is the real one (`datasets.load_dataset`),
used when the hub is reachable or the dataset is cached.
"""

from __future__ import annotations

from typing import Any

from posttrain.chat import ChatFormatError
from posttrain.config import DataConfig
from posttrain.data.formats import DataError, check_row, read_rows


def load_hf(name: str, split: str, fmt: str, system: str) -> list[dict[str, Any]]:
    import datasets

    ds = datasets.load_dataset(name, split=split)
    rows, errors = [], []
    for i, row in enumerate(ds):
        where = f"{name}[{split}]:{i}"
        try:
            check_row(row, fmt, where, system)
        except ChatFormatError as e:
            errors.append(str(e))
            continue
        rows.append({"id": row.get("id", f"{split}-{i:06d}"), **row, "_where": where})
    if errors:
        raise DataError(errors, f"{name}[{split}]")
    return rows


def load_split(cfg: DataConfig, which: str, fmt: str, system: str) -> list[dict[str, Any]] | None:
    """Rows of `which` ('train' or 'eval') from a jsonl or hf source; None when not configured."""
    name = cfg.train if which == "train" else cfg.eval
    if name is None:
        return None
    if cfg.source == "jsonl":
        rows = read_rows(name, fmt, system)
        for r in rows:
            r.setdefault("id", r["_where"])
        return rows
    return load_hf(name, cfg.hf_train_split if which == "train" else cfg.hf_eval_split, fmt, system)


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
