"""Files that are written whole or not at all, and their hashes.

`write_atomic` writes beside the target and renames; `replace_folder` swaps a finished folder into place only once
it is complete; `link_tree` copies a folder by hard links (copies where links are impossible). Every stage output
and checkpoint goes through these, so a killed process never leaves a half-written file under a final name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """`path` holds `text` or its previous content, never a part of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
