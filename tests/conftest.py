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
