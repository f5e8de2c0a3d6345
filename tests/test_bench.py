"""`make bench`'s measurements, on the smoke recipe (figures are printed by the bench, never asserted here)."""

from __future__ import annotations

from pathlib import Path

from posttrain.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_sft_bench_measures_both_trainers_on_the_same_data():
    from posttrain.bench import bench_sft

    recipe = load_recipe(ROOT / "recipes" / "tiny" / "smoke.yaml")
    out = bench_sft(recipe, steps=2, n_rows=64)
    ours, trl_ = out["ours"], out["trl"]
    assert ours["batch_size"] == recipe.sft.batch_size and trl_["batch_size"] == 8  # TRL's default
    assert (
        0 < ours["trained_per_s"] < ours["tokens_per_s"] and trl_["trained_per_s"] == trl_["tokens_per_s"] > 0
    )
    assert ours["flos"] > 0


def test_time_outside_training_adds_start_up_to_every_finished_stage(tmp_path):
    import json

    from posttrain.bench import time_outside_training

    assert time_outside_training(tmp_path, 5.0) is None
    for stage, wall, runs in (
        ("data", 2.0, {}),
        ("sft", 30.0, {"": 20.0}),
        ("rlhf", 40.0, {"a": 10.0, "b": 12.0}),
    ):
        folder = tmp_path / stage
        for sub, train in runs.items():
            (folder / sub).mkdir(parents=True, exist_ok=True)
            (folder / sub / "metrics.jsonl").write_text(
                json.dumps({"step": 5, "train_runtime": train}) + "\n"
            )
        folder.mkdir(exist_ok=True)
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"summary": True, "wall_time_s": wall}) + "\n")
        (folder / "DONE").write_text("{}")
    (tmp_path / "rm.partial").mkdir()  # unfinished stages do not count
    out = time_outside_training(tmp_path, 5.0)
    assert out["stages"] == ["data", "sft", "rlhf"]
    assert out["wall_s"] == 72.0 + 15.0 and out["train_s"] == 42.0
    assert abs(out["outside_share"] - (1 - 42 / 87)) < 1e-12


def test_batch_order_times_both_orders_on_the_same_prompts():
    from posttrain import world
    from posttrain.bench import batch_order
    from posttrain.config import ModelSpec, SamplingConfig
    from posttrain.modeling import load_causal_lm, load_tokenizer

    recipe = load_recipe(ROOT / "recipes" / "tiny" / "smoke.yaml")
    spec = ModelSpec(preset="tiny-student", tokenizer="tiny")
    tok = load_tokenizer(spec)
    rows = world.eval_split(recipe.world, recipe.seed)[:6]
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.0, batch_size=2, engine="hf")
    out = batch_order(load_causal_lm(spec, tok, seed=0), tok, recipe, rows, cfg)
    assert out["prompts"] == 6 and out["by_prompt_s"] > 0 and out["by_reference_s"] > 0
    assert out["identical_outputs"].endswith("/6")
