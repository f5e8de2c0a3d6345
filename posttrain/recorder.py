"""The largest tensor a process forms, for checking that no stage materialises a (positions × vocabulary) block.

`largest_tensors(path)` records, while it is active, every tensor an operator returns (allocations included:
`empty`, `zeros`, the outputs of matmuls, softmaxes …) and keeps the largest by the elements its memory holds (a
view — `expand`, `view`, a slice — counts the storage it reads, not the shape it shows: a broadcast over the
vocabulary allocates nothing), and the most
token positions one embedding lookup read (a micro-batch's batch × length); on exit it appends one JSON line to
`path`: {"label", "numel", "shape", "dtype", "op", "positions"}. `posttrain stage` turns it on when the
environment sets `POSTTRAIN_RECORD_TENSORS=<file>` (the real-shape tests do); it slows a stage, so it is off
otherwise.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

ENV = "POSTTRAIN_RECORD_TENSORS"


def held(t) -> int:
    """The elements of `t`'s dtype that its memory (its storage, shared with any view of it) holds."""
    try:
        return min(t.numel(), t.untyped_storage().nbytes() // max(t.element_size(), 1))
    except (RuntimeError, NotImplementedError):  # a tensor without storage (sparse, nested)
        return t.numel()


@contextmanager
def largest_tensors(path: str | Path, label: str):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    best = {"numel": 0, "shape": [], "dtype": None, "op": None, "positions": 0}
    embedding = torch.ops.aten.embedding.default

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is embedding:
                best["positions"] = max(best["positions"], args[1].numel())
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and (n := held(t)) > best["numel"]:
                    best.update(numel=n, shape=list(t.shape), dtype=str(t.dtype), op=str(func))
            return out

    try:
        with Largest():
            yield best
    finally:
        with open(path, "a") as f:
            f.write(json.dumps({"label": label, **best}) + "\n")
