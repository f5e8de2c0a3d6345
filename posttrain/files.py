"""Files that are written whole or not at all, and their hashes.

`write_atomic` writes beside the target and renames; `replace_folder` swaps a finished folder into place only once
it is complete; `link_tree` copies a folder by hard links (copies where links are impossible). Every stage output
and checkpoint goes through these, so a killed process never leaves a half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` or its previous content, never a part of it (a failed write leaves no temporary file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds `path` (or its nearest existing parent)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def human_bytes(n: float) -> str:
    """`1.2 GB`, `31.5 MB`: sizes as the error messages and the preflight give them."""
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).exists() else 0


_FULL = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28", "os error 122")
_WRITE = ("PytorchStreamWriter", "inline_container", "file write failed", "write")


def out_of_space(exc: BaseException, path: Path) -> str | None:
    """What ran out when `exc` was raised while writing under `path` — the disk is full (ENOSPC, EDQUOT, or a
    library's message for it; torch's zip writer only says that its write failed, so a failed write with under
    16 MiB free counts too) — else None."""
    import errno

    seen: BaseException | None = exc
    chain = []
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    text = " ".join(str(e) for e in chain)
    if any(m in text for m in _FULL):
        return next(m for m in _FULL if m in text)
    if any(m in text for m in _WRITE) and free_bytes(path) < 16 * 2**20:
        return f"a write failed with {free_bytes(path)} bytes free ({text[:120]})"
    return None


def replace_folder(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`, replacing what was there only once `tmp` is in hand."""
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def link_tree(source: Path, final: Path) -> None:
    """`final` becomes a copy of the folder `source` made of hard links (copies across file systems), put in
    place whole (`replace_folder`)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    tmp = final.with_name(final.name + ".reuse")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=link)
    replace_folder(tmp, final)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_summary(stage_folder: Path) -> dict:
    """A stage's summary row (the last row of its metrics.jsonl, written when it finishes); {} when it has none."""
    try:
        rows = (stage_folder / "metrics.jsonl").read_text().splitlines()
        last = json.loads(rows[-1]) if rows else {}
    except (OSError, ValueError):
        return {}
    return last if last.get("summary") else {}


# A local model folder pinned by content (`revision: sha256:<hex>` in a recipe's model spec): the digest of its one
# weights file, so that a stage's config hash changes when the weights do and a damaged or replaced copy (a Git LFS
# pointer, a half-copied file) is refused before anything trains on it.
PIN = "sha256:"
WEIGHTS = "model.safetensors"


def is_pin(revision: str | None) -> bool:
    return bool(revision) and revision.startswith(PIN)


def pin_problem(folder: str | Path, revision: str) -> str | None:
    """Why the folder does not hold the pinned weights, or None when it does."""
    weights = Path(folder).expanduser() / WEIGHTS
    want = revision[len(PIN) :]
    if not weights.is_file():
        return f"{weights} does not exist; a `revision: {PIN}…` pin is the sha256 of a folder's {WEIGHTS}"
    got = file_sha256(weights)
    if got != want:
        return (
            f"{weights} has sha256 {got[:16]}…, but the recipe pins {want[:16]}…: the folder holds other weights "
            "than the recipe was written for (rebuild shipped models with `make tiny-models`, which re-pins the "
            "recipes, or restore the file)"
        )
    return None
