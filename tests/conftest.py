"""Shared fixtures: the tiny tokenizer and tiny Gemma 2 models, built locally; nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from posttrain.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def trl_gemma_template() -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "gemma.jinja").read_text()


GEMMA_TOKENIZER = ROOT / ".cache" / "gemma-tokenizer"


@pytest.fixture(scope="session")
def gemma_tokenizer():
    """The real Gemma tokenizer (256,000 entries), fetched by `make gemma-tokenizer` (which `make test` runs)."""
    from transformers import AutoTokenizer

    if not (GEMMA_TOKENIZER / "tokenizer.json").exists():
        pytest.fail(f"{GEMMA_TOKENIZER} is missing: run `make gemma-tokenizer` (make test does it first)")
    return AutoTokenizer.from_pretrained(str(GEMMA_TOKENIZER))


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(mb)`: a folder on a filesystem of its own of that size (a tmpfs), so that a test can fill it; the
    test is skipped where no filesystem can be mounted (mounting needs root)."""
    import shutil
    import subprocess

    mounted: list[Path] = []

    def make(mb: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={mb}m", "tmpfs", str(folder)]
        done = subprocess.run(cmd, capture_output=True, text=True) if shutil.which("mount") else None
        if done is None or done.returncode != 0:
            pytest.skip(f"cannot mount a {mb} MB tmpfs here ({done.stderr.strip() if done else 'no mount'})")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
