"""The shipped tiny checkpoints (data/models/, `make tiny-models`): a folder pinned by its weights' sha256 loads only
with those weights; shipping a finished stage copies its model, records the manifest and re-pins the recipes; the
shipped models match their manifest and the tiny recipe starts from them; a rebuild reaches the manifest's figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain import shipped
from posttrain.config import ModelSpec, load_recipe
from posttrain.files import PIN, WEIGHTS, file_sha256

ROOT = Path(__file__).resolve().parents[1]


def _stage(folder: Path, tokenizer, seed: int) -> Path:
    """A finished teacher stage folder holding a random tiny-teacher preset."""
    from posttrain.modeling import load_causal_lm

    model = load_causal_lm(ModelSpec(preset="tiny-teacher", tokenizer="tiny"), tokenizer, seed=seed)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    (folder / "config.yaml").write_text(f"seed: {seed}\n")
    rows = [
        {"step": 100, "loss": 0.5},
        {"summary": True, "world_score": 0.9, "world_per_task": {"add": 0.95}},
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "DONE").write_text(json.dumps({"config_hash": f"h{seed}", "parents": {}}) + "\n")
    return folder


def test_a_pinned_folder_loads_with_its_weights_and_is_refused_with_others(tmp_path, tiny_tokenizer):
    from posttrain.modeling import ModelError, load_causal_lm

    folder = _stage(tmp_path / "teacher", tiny_tokenizer, 0) / "model"
    pin = PIN + file_sha256(folder / WEIGHTS)
    spec = ModelSpec(name_or_path=str(folder), revision=pin)
    assert spec.problems() == []
    assert load_causal_lm(spec, tiny_tokenizer) is not None
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (folder / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ModelError, match="has sha256 .* but the recipe pins"):
        load_causal_lm(spec, tiny_tokenizer)


def test_a_pin_must_be_a_whole_sha256_of_a_named_folder():
    assert "64 lowercase hex digits" in ModelSpec(name_or_path="x/y", revision="sha256:abc").problems()[0]
    assert "set name_or_path" in ModelSpec(preset="tiny-teacher", revision=PIN + "0" * 64).problems()[0]
    assert ModelSpec(name_or_path="google/gemma-2-2b", revision="main").problems() == []


def test_the_preflight_names_the_revision_key_of_a_folder_with_other_weights(tmp_path, tiny_tokenizer):
    from posttrain.config import load_recipe_located
    from posttrain.preflight import preflight

    folder = _stage(tmp_path / "teacher", tiny_tokenizer, 0) / "model"
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        f"extends: {ROOT / 'recipes/tiny/pipeline.yaml'}\nname: pin\noutput_dir: {tmp_path / 'runs'}\n"
        f"teacher:\n  name_or_path: {folder}\n  revision: {PIN}{'0' * 64}\n"
    )
    recipe, where = load_recipe_located(recipe_file)
    problems = preflight(recipe, where, str(recipe_file), ["generate"]).problems
    assert (
        len(problems) == 1
        and f"{recipe_file}:6: teacher.revision: {folder / WEIGHTS} has sha256" in problems[0]
    )


def test_shipping_copies_the_model_records_the_manifest_and_repins_the_recipes(tmp_path, tiny_tokenizer):
    out, recipes = tmp_path / "models", tmp_path / "recipes"
    recipes.mkdir()
    first = shipped.ship(_stage(tmp_path / "a", tiny_tokenizer, 0), "tiny-teacher", out, recipes)
    assert first["repinned"] == [] and first["seed"] == 0 and first["figures"]["world_score"] == 0.9
    assert first["figures"]["steps"] == 100 and first["config_hash"] == "h0"
    assert shipped.check(out, recipes) == []
    old = first["files"][WEIGHTS]
    assert old == file_sha256(out / "tiny-teacher" / WEIGHTS)
    (recipes / "r.yaml").write_text(f"teacher:\n  revision: {PIN}{old}\n")
    (recipes / "other.yaml").write_text("name: untouched\n")
    second = shipped.ship(_stage(tmp_path / "b", tiny_tokenizer, 1), "tiny-teacher", out, recipes)
    new = second["files"][WEIGHTS]
    assert new != old and second["repinned"] == [str(recipes / "r.yaml")]
    assert (recipes / "r.yaml").read_text() == f"teacher:\n  revision: {PIN}{new}\n"
    assert json.loads((out / "manifest.json").read_text())["tiny-teacher"]["config_hash"] == "h1"
    (out / "tiny-teacher" / "config.json").write_text("{}")
    (out / "tiny-teacher" / "stray.bin").write_text("x")
    problems = shipped.check(out, recipes)
    assert (
        len(problems) == 2
        and "config.json: sha256 differs" in problems[0]
        and "not in the manifest" in problems[1]
    )


def test_an_unfinished_stage_is_not_shipped_and_nothing_is_replaced(tmp_path, tiny_tokenizer):
    out = tmp_path / "models"
    shipped.ship(_stage(tmp_path / "a", tiny_tokenizer, 0), "tiny-teacher", out, tmp_path)
    before = (out / "manifest.json").read_text()
    unfinished = _stage(tmp_path / "b", tiny_tokenizer, 1)
    (unfinished / "DONE").unlink()
    with pytest.raises(shipped.ShipError, match="not a finished stage"):
        shipped.ship(unfinished, "tiny-teacher", out, tmp_path)
    assert shipped.main([str(unfinished), "tiny-teacher", "--out", str(out)]) == 1
    assert (out / "manifest.json").read_text() == before and shipped.check(out, tmp_path) == []


def test_the_shipped_models_match_their_manifest_and_the_tiny_recipe_starts_from_them(capsys):
    assert shipped.main(["--check"]) == 0  # the README's `python -m posttrain.shipped --check`
    assert "every shipped file matches manifest.json" in capsys.readouterr().out
    manifest = shipped.read_manifest()
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "pipeline.yaml")
    assert recipe.teacher.name_or_path == "data/models/tiny-teacher"
    assert recipe.teacher.revision == PIN + manifest["tiny-teacher"]["files"][WEIGHTS]
    assert "teacher" not in recipe.stages() and recipe.rm.init_from == "teacher"
    scratch = load_recipe(ROOT / "recipes" / "tiny" / "tiny-models.yaml")
    assert "teacher" in scratch.stages() and scratch.teacher.preset == "tiny-teacher"


@pytest.mark.slow
@pytest.mark.stage
def test_a_rebuild_of_the_shipped_teacher_reaches_the_manifest_s_figures(tmp_path):
    """`make tiny-models`' training (the teacher stage of recipes/tiny/tiny-models.yaml) from nothing: its world
    score within 0.02 of the manifest's, each family's within 0.05 (about 12 minutes)."""
    cmd = [
        sys.executable,
        "-m",
        "posttrain",
        "run",
        shipped.RECIPE,
        "--only",
        "teacher",
        f"--set=output_dir={tmp_path}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    got = shipped.stage_figures(tmp_path / "tiny-models" / "teacher")
    want = shipped.read_manifest()["tiny-teacher"]["figures"]
    assert got["steps"] == want["steps"]
    assert got["world_score"] >= want["world_score"] - 0.02, (got, want)
    low = {
        t: (got["world_per_task"][t], s)
        for t, s in want["world_per_task"].items()
        if got["world_per_task"][t] < s - 0.05
    }
    assert not low, low


def test_the_tiny_recipe_s_stages_take_the_shipped_teacher_from_the_recipe_not_from_a_stage():
    from posttrain.preflight import model_inputs
    from posttrain.stages import distill, generate, rm

    recipe = load_recipe(ROOT / "recipes" / "tiny" / "pipeline.yaml")
    assert generate.parents(recipe) == ["data"] and set(distill.parents(recipe)) == {"sft", "generate"}
    assert set(rm.parents(recipe)) == {"data", "distill"}
    assert rm.stage_config(recipe)["teacher"] == recipe.teacher  # the pin is in the RM's hash
    assert [(k, s.name_or_path) for k, s, _ in model_inputs(recipe, ["rm"])] == [
        ("teacher", "data/models/tiny-teacher")
    ]
    trained = load_recipe(ROOT / "recipes" / "tiny" / "tiny-models.yaml")
    assert "teacher" in rm.parents(trained) and "teacher" not in rm.stage_config(trained)


@pytest.mark.stage
def test_the_chain_from_the_shipped_teacher_runs_and_reports_it(tmp_path):
    """The smoke chain up to the reward model with the tiny recipe's shipped teacher instead of one trained by the
    run: no teacher stage, the RM started from the shipped weights, the report's world table scores that teacher."""
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "pipeline.yaml")
    body = (
        f"extends: {ROOT / 'recipes/tiny/smoke.yaml'}\nname: shipped\noutput_dir: {tmp_path}\nteacher_train: null\n"
        f"teacher:\n  preset: null\n  tokenizer: null\n  name_or_path: {recipe.teacher.name_or_path}\n"
        f"  revision: {recipe.teacher.revision}\n"
    )
    (tmp_path / "r.yaml").write_text(body)
    cmd = [sys.executable, "-m", "posttrain", "run", str(tmp_path / "r.yaml"), "--only", "rm"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    run = tmp_path / "shipped"
    assert not (run / "teacher").exists() and (run / "rm" / "DONE").exists()
    assert set(json.loads((run / "rm" / "DONE").read_text())["parents"]) == {"data", "distill"}
    assert "| teacher: from the recipe |" in (run / "report.md").read_text()
