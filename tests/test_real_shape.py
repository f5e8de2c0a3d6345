"""The real-shape recipe (recipes/tiny/real-shape.yaml: the real 256,000-entry Gemma tokenizer, Gemma-2-shaped
models, micro-batches of 4,096 positions or more): every stage finishes on this CPU in a few GiB and none forms a
(positions × vocabulary) tensor beyond a chunk of positions, as `posttrain.recorder` sees the stage's operators."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain import recorder
from posttrain.logits import LOGITS_CHUNK

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256_000
TRAINED = ("teacher", "sft", "rm", "distill", "rlhf")  # stages whose micro-batches hold ≥ 4,096 positions


def test_the_recorder_keeps_the_largest_tensor_and_the_most_positions_one_lookup_read(tmp_path):
    path = tmp_path / "t.jsonl"
    table = torch.randn(50, 4)
    with recorder.largest_tensors(path, "x"):
        torch.zeros(3, 5)
        torch.nn.functional.embedding(torch.zeros(2, 7, dtype=torch.long), table)  # 14 positions × 4
        torch.ones(60)
    (row,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert row["label"] == "x" and row["numel"] == 60 and row["shape"] == [60] and row["positions"] == 14


@pytest.mark.slow
@pytest.mark.stage
def test_every_real_shape_stage_finishes_in_a_few_gib_without_a_full_vocabulary_tensor(
    tmp_path, gemma_tokenizer
):
    """`posttrain run recipes/tiny/real-shape.yaml`: each stage's peak resident memory under 3.5 GiB, its largest
    tensor below LOGITS_CHUNK × 256,000 elements, and the training stages reading ≥ 4,096 positions a step."""
    tensors = tmp_path / "tensors.jsonl"
    env = {**os.environ, recorder.ENV: str(tensors)}
    cmd = [
        sys.executable,
        "-m",
        "posttrain",
        "run",
        "recipes/tiny/real-shape.yaml",
        f"--set=output_dir={tmp_path}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    (tmp_path / "run.log").write_text(done.stdout + done.stderr)  # kept for a failure's whole story
    peaks = {m[1]: float(m[2]) for m in re.finditer(r"\[run\] (\w+): peak memory ([\d.]+) GiB", done.stdout)}
    trace = (
        done.stderr[done.stderr.find("Traceback") :][-4000:]
        if "Traceback" in done.stderr
        else done.stderr[-4000:]
    )
    assert done.returncode == 0, (peaks, trace)
    assert set(TRAINED) <= set(peaks) and all(p < 3.5 for p in peaks.values()), peaks
    rows = [json.loads(x) for x in tensors.read_text().splitlines()]
    assert {r["label"].split(":")[0] for r in rows} >= set(peaks) - {"data"}, rows
    assert all(r["numel"] < LOGITS_CHUNK * VOCAB for r in rows), rows
    for r in rows:
        if r["label"].split(":")[0] in TRAINED:
            assert r["positions"] >= 4096, r


def test_a_broadcast_view_counts_the_memory_it_reads_not_the_shape_it_shows(tmp_path):
    path = tmp_path / "t.jsonl"
    with recorder.largest_tensors(path, "x"):
        row = torch.zeros(1, 1, 1000)  # 1,000 elements
        row.expand(70, 64, 1000)  # a view of 4,480,000 elements: no memory of its own
        torch.ones(2000)
    (out,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert out["numel"] == 2000 and out["shape"] == [2000]
