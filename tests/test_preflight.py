"""The preflight of `posttrain check`, `run` and `run --dry-run`: every input, model and the disk of the stages that
will run, each problem with its recipe key and line, all at once, before any stage starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from posttrain.config import load_recipe_located
from posttrain.preflight import PRESET_BOUND, model_size, preflight

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny" / "pipeline.yaml"
SMOKE = str(ROOT / "recipes" / "tiny" / "smoke.yaml")


def _posttrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "posttrain", *args], capture_output=True, text=True, cwd=ROOT
    )


def _recipe(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(f"extends: {TINY}\nname: pf\noutput_dir: {tmp_path / 'runs'}\n" + body)
    return p


def _check(path: Path, stages: list[str] | None = None, sets: tuple[str, ...] = ()):
    recipe, where = load_recipe_located(path, sets)
    return preflight(recipe, where, str(path), stages or recipe.stages())


def test_a_missing_input_file_stops_a_dry_run_naming_it_and_its_key(tmp_path):
    p = _recipe(tmp_path, "rm:\n  source: jsonl\n  train_file: prefs/missing.jsonl\n")
    out = _posttrain("run", str(p), "--dry-run")
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{p}:6: rm.train_file: prefs/missing.jsonl: no such file" in out.stderr
    assert "nothing was started" in out.stderr and "[run] data" not in out.stdout
    assert not (tmp_path / "runs").exists()
    check = _posttrain("check", str(p))
    assert (
        check.returncode == 2 and f"{p}:6: rm.train_file: prefs/missing.jsonl: no such file" in check.stderr
    )
    ok = _posttrain(
        "run", str(p), "--dry-run", "--set=rm.train_file=data/examples/preferences_implicit.jsonl"
    )
    assert ok.returncode == 0 and "[run] rm (not done yet)" in ok.stdout, ok.stderr
    assert (
        "[preflight] rm.train_file: data/examples/preferences_implicit.jsonl: 3 valid preferences rows"
        in ok.stdout
    )
    only_sft = _posttrain(
        "run", str(p), "--dry-run", "--only", "sft"
    )  # rm will not run: its file is not read
    assert only_sft.returncode == 0, only_sft.stderr


def test_every_problem_is_reported_at_once_with_its_key_and_line(tmp_path):
    bad = tmp_path / "prefs.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n{oops\n")
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    save_file({"w": torch.ones(64, 64)}, str(model / "model.safetensors"))
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:-100])  # a truncated copy, and no tokenizer
    p = _recipe(tmp_path, f"data:\n  source: jsonl\n  train: {tmp_path / 'gone.jsonl'}\n"
                          f"rm:\n  source: jsonl\n  train_file: {bad}\n  init_from: null\n"
                          f"teacher:\n  name_or_path: {model}\n  revision: null\n  tokenizer: null\n"
                          "reward_model:\n  name_or_path: not a hub id!\n  preset: null\n")  # fmt: skip
    pf = _check(p, sets=("rm.freeze_base=false",))
    got = "\n".join(pf.problems)
    assert f"{p}:6: data.train: {tmp_path / 'gone.jsonl'}: no such file" in got
    assert f"{p}:9: rm.train_file: 1 bad row(s): {bad}:2: not valid JSON" in got
    assert "limit rm.max_bad_fraction 0.0" in got
    assert f"{p}:12: teacher.name_or_path: model.safetensors: truncated" in got
    assert f"{p}:12: teacher.name_or_path: {model} has no tokenizer" in got
    assert f"{p}:16: reward_model.name_or_path: 'not a hub id!' is neither a local folder nor a hub id" in got
    assert len(pf.problems) == 5


def test_model_paths_and_ids_are_checked_for_form_and_completeness(tmp_path):
    p = _recipe(tmp_path, "model:\n  name_or_path: runs/never-made/sft/model\n  preset: null\n  tokenizer: null\n"
                          "teacher:\n  name_or_path: google/gemma-2-27b-it\n  revision: null\n  tokenizer: null\n")  # fmt: skip
    pf = _check(p, ["data", "sft", "generate"], sets=("teacher_train=null",))
    assert pf.problems == [f"{p}:5: model.name_or_path: runs/never-made/sft/model does not exist (a local model folder); "
                           "point it at a save_pretrained folder"]  # fmt: skip
    assert any("teacher.name_or_path: google/gemma-2-27b-it is a hub id" in n for n in pf.notes)


def test_a_set_override_is_named_as_where_the_key_was_set(tmp_path):
    p = _recipe(tmp_path, "")
    pf = _check(p, ["rm"], sets=("rm.source=jsonl", "rm.train_file=nope.jsonl"))
    assert pf.problems == ["--set rm.train_file=nope.jsonl: rm.train_file: nope.jsonl: no such file"]


def test_the_disk_check_counts_models_and_the_checkpoints_kept(tmp_path):
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    save_file({"w": torch.zeros(1000, 250)}, str(model / "model.safetensors"))  # 250k parameters
    recipe, _ = load_recipe_located(TINY, [f"model.name_or_path={model}", "model.preset=null"])
    assert model_size(recipe.model) == (250_000, 2)  # `auto`: bf16 on the GPUs a real recipe runs on
    pf = preflight(recipe, {}, "r.yaml", ["sft"])
    # sft: the model (500 kB) + 2 checkpoints of weights and Adam state with a fp32 master copy (500 kB + 3 MB)
    assert any("sft: 1 model(s) of 0.5 MB + 2 checkpoint(s) of 3.5 MB" in n for n in pf.notes), pf.notes
    lean, _ = load_recipe_located(TINY, [f"model.name_or_path={model}", "model.preset=null",
                                         "sft.keep_checkpoints=1", "sft.save_optimizer=false"])  # fmt: skip
    assert any("+ 1 checkpoint(s) of 0.5 MB" in n for n in preflight(lean, {}, "r.yaml", ["sft"]).notes)


def test_every_tiny_preset_fits_the_preflight_s_bound(tiny_tokenizer):
    from posttrain.config import ModelSpec
    from posttrain.modeling import PRESETS, count_parameters, load_causal_lm

    for preset in PRESETS:
        model = load_causal_lm(ModelSpec(preset=preset, dtype="fp32"), tiny_tokenizer)
        assert count_parameters(model) * 4 < PRESET_BOUND, preset


def test_a_disk_too_small_for_the_run_stops_it_before_any_stage(small_disk):
    disk = small_disk(8)
    out = _posttrain("run", SMOKE, f"--set=output_dir={disk}", "--dry-run")
    assert out.returncode == 2
    assert f"--set output_dir={disk}: output_dir: {disk} has 8.4 MB free on its disk" in out.stderr
    assert (
        "keep_checkpoints" in out.stderr and "teacher: 1 model(s) of 10.5 MB + 2 checkpoint(s)" in out.stderr
    )


@pytest.mark.parametrize("size", ["2b", "9b", "27b"])
def test_a_real_recipe_whose_preference_file_is_missing_is_stopped_naming_it(size):
    out = _posttrain("run", f"recipes/gemma2-{size}/pipeline.yaml", "--dry-run", "--set=rm.source=jsonl",
                     "--set=rm.train_file=data/preferences/train.jsonl", "--set=rm.eval_file=data/examples/preferences.jsonl")  # fmt: skip
    assert out.returncode == 2
    assert (
        "--set rm.train_file=data/preferences/train.jsonl: rm.train_file: data/preferences/train.jsonl: no such file"
        in out.stderr
    ), out.stderr


def test_the_readme_s_real_model_recipe_is_checked_before_anything_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in readme.split("```yaml\n")[1:] if "name: my-gemma" in b).split("```")[0]
    p = tmp_path / "my-gemma.yaml"
    p.write_text(block.replace("extends: ../tiny/pipeline.yaml", f"extends: {TINY}"))
    pf = _check(p)
    line = block.splitlines().index("  train: my_conversations.jsonl") + 1
    assert pf.problems == [f"{p}:{line}: data.train: my_conversations.jsonl: no such file"]
    notes = "\n".join(pf.notes)
    assert "rm.train_file: HuggingFaceH4/ultrafeedback_binarized (split train_prefs) is a hub id" in notes
    assert "model.name_or_path: google/gemma-2-2b is a hub id" in notes
