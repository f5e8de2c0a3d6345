"""`posttrain plan`: parameter counts from the models' configurations on the meta device, the published Gemma 2
recipes fitting 8 × 80 GB GPUs by their own plan, a stage that does not fit naming its key, and the plan of a
training step against its measured peak memory on this CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import plan
from posttrain.config import ModelSpec, TrainConfig, load_recipe

ROOT = Path(__file__).resolve().parents[1]
GEMMA = str(ROOT / ".cache" / "gemma-tokenizer")


@pytest.mark.parametrize(
    "size, published", [("2b", 2_614_341_888), ("9b", 9_241_705_984), ("27b", 27_227_128_320)]
)
def test_the_shipped_configs_give_the_published_parameter_counts(size, published):
    for name in (f"google/gemma-2-{size}", f"google/gemma-2-{size}-it"):
        shape = plan.shape_of(ModelSpec(name_or_path=name))
        assert shape.params == published and shape.vocab == 256_000


@pytest.mark.parametrize(
    "preset",
    [
        "tiny-student",
        "tiny-student-narrow",
        "tiny-student-shallow",
        "tiny-rm",
        "real-shape-student",
        "real-shape-teacher",
    ],
)
def test_the_plan_counts_what_the_built_model_has(preset, tiny_tokenizer, gemma_tokenizer):
    from posttrain.modeling import count_parameters, load_causal_lm

    tok = gemma_tokenizer if preset.startswith("real") else tiny_tokenizer
    spec = ModelSpec(preset=preset, tokenizer=GEMMA if preset.startswith("real") else "tiny")
    assert plan.shape_of(spec).params == count_parameters(load_causal_lm(spec, tok))


@pytest.mark.parametrize("size", ["2b", "9b", "27b"])
def test_every_gemma2_recipe_fits_eight_80_gb_gpus_by_its_own_plan(size):
    recipe = load_recipe(ROOT / f"recipes/gemma2-{size}/pipeline.yaml")
    plans = plan.plan(recipe, 8, 80 * plan.GiB)
    text, misfits = plan.render(recipe, plans, 8, 80 * plan.GiB)
    assert misfits == [], misfits
    sft = next(p for p in plans if p.stage == "sft")
    assert sft.launch.zero == 3 and any("/N" in what for what, _, _ in sft.parts)  # the sharded model state
    assert "| sft | " in text and "Disk:" in text


def test_a_stage_that_does_not_fit_says_what_to_change():
    recipe = load_recipe(
        ROOT / "recipes/gemma2-9b/pipeline.yaml", ["rlhf.engine=hf"]
    )  # HF generation's KV cache
    _, misfits = plan.render(recipe, plan.plan(recipe, 8, 24 * plan.GiB), 8, 24 * plan.GiB)
    assert any(m.startswith("stage rm:") and "set launchers.rm: zero3-offload" in m for m in misfits), misfits
    assert any(m.startswith("stage rlhf:") and "rlhf.train.batch_size" in m for m in misfits), misfits


def test_a_vllm_engine_takes_its_share_of_the_gpu_and_must_hold_its_weights():
    """The recipes' vLLM engines: generate's takes generate.gpu_memory_utilization of each GPU; a colocated one
    takes train.trl.vllm_gpu_memory_utilization (TRL's 0.3) beside the training state, and where its share cannot
    hold the policy's weights the plan says to split the engine over more GPUs."""
    gib = plan.GiB
    recipe = load_recipe(ROOT / "recipes/gemma2-9b/pipeline.yaml")
    plans = {p.stage: p for p in plan.plan(recipe, 8, 80 * gib)}
    assert [b for _, b, _ in plans["generate"].parts] == [0.9 * 80 * gib]
    engine = [b for w, b, _ in plans["rlhf"].parts if w.startswith("vLLM engine, colocated (30%")]
    assert engine == [0.3 * 80 * gib] and not any(w.startswith("KV cache") for w, _, _ in plans["rlhf"].parts)
    hf = {p.stage: p for p in plan.plan(load_recipe(ROOT / "recipes/gemma2-9b/pipeline.yaml", ["rlhf.engine=hf"]),
                                        8, 80 * gib)}  # fmt: skip
    assert hf["rlhf"].total == pytest.approx(
        plans["rlhf"].total
        - 0.3 * 80 * gib
        + sum(b for w, b, _ in hf["rlhf"].parts if w.startswith(("KV cache", "google/gemma-2-9b gathered")))
    )
    big = load_recipe(
        ROOT / "recipes/gemma2-27b/pipeline.yaml", ["rlhf.train.trl.vllm_tensor_parallel_size=1"]
    )
    _, misfits = plan.render(big, plan.plan(big, 8, 80 * gib), 8, 80 * gib)
    assert any(
        m.startswith("stage rlhf:") and "rlhf.train.trl.vllm_tensor_parallel_size" in m for m in misfits
    )


def test_the_plan_cli_exits_1_when_a_stage_does_not_fit():
    """The README's command, and the same with GPUs too small."""
    cmd = [sys.executable, "-m", "posttrain", "plan", "recipes/gemma2-9b/pipeline.yaml", "--gpus", "8"]
    ok = subprocess.run(cmd + ["--gpu-memory", "80"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0 and "| sft | zero3 (8) |" in ok.stdout, ok.stderr
    small = subprocess.run(cmd + ["--gpu-memory", "16"], cwd=ROOT, capture_output=True, text=True)
    assert small.returncode == 1 and "posttrain plan: stage" in small.stderr


@pytest.mark.stage
@pytest.mark.slow  # two steps at 4,096+ positions and the real vocabulary: ~2.5 minutes on 2 cores (make test-all)
@pytest.mark.parametrize("rows, seq", [(64, 64), (32, 256)])
def test_a_training_steps_plan_agrees_with_its_measured_peak_memory(rows, seq, gemma_tokenizer):
    """Within 25% (the plan's stated margin on this CPU, for micro-batches of 4,096 positions or more, where the
    tiled head's temporaries are whole tiles), real tokenizer, real-shape student. Allocations above
    128 KiB are mapped and unmapped directly (glibc's MALLOC_MMAP_THRESHOLD_), so that the peak resident memory is
    that of the live tensors rather than of the allocator's free lists (which varies by ±30% from run to run)."""
    import os

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "memory_probe.py"), str(rows), str(seq), GEMMA],
                         cwd=ROOT, capture_output=True, text=True, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    shape = plan.shape_of(ModelSpec(preset="real-shape-student", tokenizer=GEMMA))
    parts = plan.trained(shape, plan.Launch("cpu", 1, device="cpu"), TrainConfig(batch_size=rows), seq, "sft")
    planned = sum(b for _, b, _ in parts)
    assert abs(measured - planned) <= 0.25 * planned, (measured / 2**20, planned / 2**20)
