"""Recipes: strict keys with suggestions, types, extends, --set, cross-field problems, stable hashes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config import ConfigError, Recipe, config_hash, load_recipe

ROOT = Path(__file__).resolve().parents[1]
MODEL = "model:\n  preset: tiny-student\n"
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_every_recipe_parses(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.name


def test_unknown_key_names_file_line_and_suggestion(tmp_path):
    p = write(tmp_path, "r.yaml", "name: x\nchat:\n  system: fold\n  max_lenght: 128\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert f"{p}:4: chat.max_lenght: unknown key 'max_lenght'; did you mean 'max_length'?" in str(e.value)


def test_unknown_section_suggests(tmp_path):
    p = write(tmp_path, "r.yaml", "name: x\nmodle:\n  preset: tiny-student\n")
    with pytest.raises(ConfigError, match=r"r.yaml:2: modle: unknown key 'modle'; did you mean 'model'\?"):
        load_recipe(p)


def test_wrong_types_are_all_reported(tmp_path):
    p = write(tmp_path, "r.yaml", "name: x\nseed: three\nchat:\n  max_length: 1.5\n  system: maybe\n" + MODEL)
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert len(e.value.problems) == 3
    assert "r.yaml:2: seed: expected an integer, got 'three' (str)" in msg
    assert "r.yaml:4: chat.max_length: expected an integer, got 1.5 (float)" in msg
    assert "r.yaml:5: chat.system: 'maybe' is not one of 'fold', 'reject'" in msg


def test_cross_field_problems_collected(tmp_path):
    text = "name: x\nmodel:\n  preset: tiny-student\n  name_or_path: google/gemma-2-2b\n  dtype: fp16\nchat:\n  max_length: 2\n"
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, "r.yaml", text))
    msg = str(e.value)
    assert "set exactly one of 'name_or_path'" in msg
    assert "fp16 overflows" in msg
    assert "max_length: 2 is too small" in msg


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="name: missing required key"):
        load_recipe(write(tmp_path, "r.yaml", "seed: 1\n"))


def test_duplicate_key_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"r.yaml:3: key 'seed' appears twice"):
        load_recipe(write(tmp_path, "r.yaml", "name: x\nseed: 1\nseed: 2\n"))
    with pytest.raises(ConfigError, match=r"s.yaml:\d+: not valid YAML"):
        load_recipe(write(tmp_path, "s.yaml", "name: x\nchat: [unclosed\n"))


def test_extends_merges_and_overrides(tmp_path):
    write(tmp_path, "base.yaml", MODEL + "name: base\nseed: 1\nchat:\n  system: reject\n  max_length: 300\n")
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\nchat:\n  max_length: 100\n")
    r = load_recipe(child)
    assert (r.name, r.seed, r.chat.system, r.chat.max_length) == ("child", 1, "reject", 100)


def test_extends_drops_an_entry_set_to_null(tmp_path):
    base = "name: base\n" + MODEL + "rlhf:\n  runs:\n    a: {kl_coef: 0.1}\n    b: {kl_coef: 0.2}\n"
    write(tmp_path, "base.yaml", base)
    child = write(
        tmp_path, "child.yaml", "extends: base.yaml\nname: child\nrlhf:\n  runs: {a: null, c: {seed: 3}}\n"
    )
    r = load_recipe(child)
    assert sorted(r.rlhf.runs) == ["b", "c"] and r.rlhf.runs["b"].kl_coef == 0.2


def test_extends_error_points_at_child_file(tmp_path):
    write(tmp_path, "base.yaml", "name: base\n" + MODEL)
    child = write(tmp_path, "child.yaml", "extends: base.yaml\nname: child\nchat:\n  trian_on: last\n")
    with pytest.raises(ConfigError, match=r"child.yaml:4: chat.trian_on: unknown key .*'train_on'"):
        load_recipe(child)


def test_extends_requires_own_name_and_detects_cycles(tmp_path):
    write(tmp_path, "base.yaml", "name: base\n" + MODEL)
    with pytest.raises(ConfigError, match="set 'name:'"):
        load_recipe(write(tmp_path, "c.yaml", "extends: base.yaml\nseed: 3\n"))
    write(tmp_path, "x.yaml", "extends: y.yaml\nname: x\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(write(tmp_path, "y.yaml", "extends: x.yaml\nname: y\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(write(tmp_path, "z.yaml", "extends: nowhere.yaml\nname: z\n"))


def test_set_overrides(tmp_path):
    p = write(tmp_path, "r.yaml", "name: x\nmodel:\n  preset: tiny-student\n")
    r = load_recipe(p, ["chat.max_length=64", "seed=7", "teacher.preset=tiny-teacher", "model.dtype=bf16"])
    assert (r.chat.max_length, r.seed, r.teacher.preset, r.model.dtype) == (64, 7, "tiny-teacher", "bf16")
    with pytest.raises(ConfigError, match=r"--set chat.max_lenght=3: chat.max_lenght: unknown key"):
        load_recipe(p, ["chat.max_lenght=3"])
    with pytest.raises(ConfigError, match="write it as key.path=value"):
        load_recipe(p, ["seed"])


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load_recipe(write(tmp_path, "a.yaml", "name: x\nchat:\n  system: fold\n  max_length: 128\n" + MODEL))
    b = load_recipe(write(tmp_path, "b.yaml", MODEL + "chat:\n  max_length: 128\n  system: fold\nname: x\n"))
    c = load_recipe(write(tmp_path, "c.yaml", "name: x\nchat:\n  max_length: 129\n" + MODEL))
    assert config_hash(a) == config_hash(b) == config_hash(load_recipe(tmp_path / "a.yaml"))
    assert config_hash(a) != config_hash(c)
    assert config_hash(a.chat) == config_hash(b.chat) != config_hash(c.chat)


def test_keys_added_later_enter_the_hash_only_when_set():
    """length_buckets, keep_checkpoints, save_optimizer at their default hash as before they existed (finished
    stages stay valid)."""
    from posttrain.config import TrainConfig

    later = {"length_buckets": 2, "keep_checkpoints": 1, "save_optimizer": False}
    plain = TrainConfig()
    before = {f.name: getattr(plain, f.name) for f in dataclasses.fields(plain) if f.name not in later}
    assert config_hash(plain) == config_hash(before)
    for key, value in later.items():
        assert config_hash(dataclasses.replace(plain, **{key: value})) != config_hash(plain), key


def test_check_cli_reports_misspelled_key(tmp_path):
    p = write(
        tmp_path, "r.yaml", "extends: " + str(ROOT / "recipes/tiny/pipeline.yaml") + "\nname: t\nsed: 1\n"
    )
    out = subprocess.run([sys.executable, "-m", "posttrain", "check", str(p)], capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{p}:3: sed: unknown key 'sed'; did you mean 'seed'?" in out.stderr


LAUNCHERS = sorted(p.stem for p in (ROOT / "recipes" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_each_launcher_gives_an_accelerate_command(launcher):
    import yaml

    from posttrain.runner import launch_command

    cfg = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{launcher}.yaml").read_text())
    assert cfg["num_processes"] >= 1 and cfg["distributed_type"] in (
        "NO",
        "MULTI_CPU",
        "MULTI_GPU",
        "DEEPSPEED",
    )
    recipe = load_recipe(
        ROOT / "recipes/tiny/pipeline.yaml", [f"launchers.sft={launcher}", "launchers.data=local"]
    )
    cmd = launch_command(recipe, "sft", "r.yaml", ["seed=1"])
    if (
        cfg.get("num_machines", 1) > 1
    ):  # through srun on every node (tests/test_launch.py): the same command inside
        import shlex

        assert cmd[0] == "srun"
        inner = shlex.split(cmd[-1].split("exec ", 1)[1])
        at = inner.index("--num_machines")
        cmd = inner[:at] + inner[at + 6 :]  # less the node's rank and the main node's address
    assert cmd[1:6] == [
        "-m",
        "accelerate.commands.launch",
        "--quiet",
        "--config_file",
        str(ROOT / f"recipes/accelerate/{launcher}.yaml"),
    ]
    assert cmd[6:] == ["-m", "posttrain", "stage", "sft", "r.yaml", "--set=seed=1"]
    assert launch_command(recipe, "data", "r.yaml", [])[1:4] == [
        "-m",
        "posttrain",
        "stage",
    ]  # per-stage: local


@pytest.mark.parametrize("size", ["2b", "9b", "27b"])
def test_real_recipes_dry_run_prints_their_launch_commands(size):
    # the RM's pairs are a hub dataset (UltraFeedback): the preflight checks its name's form
    out = subprocess.run([sys.executable, "-m", "posttrain", "run", f"recipes/gemma2-{size}/pipeline.yaml", "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    recipe = load_recipe(ROOT / f"recipes/gemma2-{size}/pipeline.yaml")
    assert recipe.model.name_or_path == f"google/gemma-2-{size}" and recipe.model.dtype == "auto"
    launches = [line for line in out.stdout.splitlines() if "accelerate.commands.launch" in line]
    assert launches and all("--config_file" in line and "-m posttrain stage" in line for line in launches)
    assert "posttrain stage rlhf" in out.stdout and "posttrain stage merge" in out.stdout


def test_unknown_launcher_is_a_recipe_error(tmp_path):
    p = write(tmp_path, "r.yaml", MODEL + "name: x\nlaunchers:\n  sft: zero9\n")
    with pytest.raises(ConfigError, match="launchers.sft: 'zero9' is neither 'local' nor a launcher"):
        load_recipe(p)


def test_a_one_process_stage_started_as_several_says_so_before_loading_anything(tmp_path):
    import os

    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    out = subprocess.run([sys.executable, "-m", "posttrain", "stage", "eval", "recipes/tiny/smoke.yaml",
                          f"--set=output_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT, env=env)  # fmt: skip
    assert out.returncode == 1
    assert "stage eval runs in one process, but it was started in 2" in out.stderr
    assert "launchers: {eval: cpu}" in out.stderr and not any(tmp_path.iterdir())


def test_one_process_stages_run_as_a_plain_process_under_a_several_process_launcher(tmp_path):
    p = write(tmp_path, "r.yaml", MODEL + "name: x\nlauncher: zero3\nlaunchers:\n  data: cpu\n")
    r = load_recipe(p)
    assert (
        r.launcher_for("sft") == "zero3"
        and r.launcher_for("eval") == "local"
        and r.launcher_for("data") == "cpu"
    )
    from posttrain.runner import launch_command

    assert "accelerate" not in " ".join(launch_command(r, "eval", str(p), []))
    assert "zero3.yaml" in " ".join(launch_command(r, "rm", str(p), []))


def test_a_several_process_launcher_named_for_a_one_process_stage_is_a_recipe_error(tmp_path):
    p = write(
        tmp_path, "r.yaml", MODEL + "name: x\nlauncher: zero3\nlaunchers:\n  data: local\n  eval: zero3\n"
    )
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert "launchers.eval: 'zero3' starts 8 processes, but stage eval runs in one" in str(e.value)
    assert "stage data" not in str(e.value)  # its own launcher is local
    load_recipe(p, ["launchers.eval=local"])  # the fix the message names


def test_launchers_and_seeds_name_real_stages(tmp_path):
    p = write(tmp_path, "r.yaml", MODEL + "name: x\nlaunchers:\n  sfft: ddp\nseeds:\n  rlfh: 1\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(p)
    assert "launchers.sfft: no such stage" in str(e.value) and "seeds.rlfh: no such stage" in str(e.value)


def test_a_stage_seed_changes_that_stage_and_the_later_ones_only():
    from posttrain import runner

    smoke = ROOT / "recipes/tiny/smoke.yaml"
    base, other = load_recipe(smoke), load_recipe(smoke, ["seeds.sft=7"])
    assert (other.seed_for("sft"), other.seed_for("data")) == (7, base.seed)
    same = [s for s in base.stages() if runner.expected_hash(base, s) == runner.expected_hash(other, s)]
    assert same == ["data", "teacher", "generate"]


def test_sweep_seed_stages_name_real_stages(tmp_path, capsys):
    from posttrain.cli import main

    rc = main(["sweep", str(ROOT / "recipes/tiny/smoke.yaml"), "--seeds", "2", "--seed-stages", "sft,rlfh",
               f"--set=output_dir={tmp_path}"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--seed-stages: no stage 'rlfh'" in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "grid, message",
    [
        ("rlhf.kl_coef", "--grid 'rlhf.kl_coef': expected KEY=V1,V2,…"),
        ("rlhf.kl_coeff=0.1,0.2", "did you mean 'kl_coef'?"),
        ("rlhf.kl_coef=0.1,abc", "rlhf.kl_coef"),
    ],
)
def test_a_bad_sweep_grid_is_refused_before_anything_runs(grid, message, tmp_path, capsys):
    from posttrain.cli import main

    rc = main(
        ["sweep", str(ROOT / "recipes/tiny/smoke.yaml"), "--grid", grid, f"--set=output_dir={tmp_path}"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "path", sorted((ROOT / "recipes" / "ablations").glob("*.yaml")), ids=lambda p: p.stem
)
def test_ablation_recipes_load_and_name_their_own_run(path):
    recipe = load_recipe(path)
    assert recipe.name != load_recipe(ROOT / "recipes" / "tiny" / "pipeline.yaml").name


def test_the_inference_window_changes_the_eval_stage_only():
    from posttrain import runner

    smoke = ROOT / "recipes/tiny/smoke.yaml"
    base, other = load_recipe(smoke), load_recipe(smoke, ["eval.sliding_window=16"])
    changed = [s for s in base.stages() if runner.expected_hash(base, s) != runner.expected_hash(other, s)]
    assert changed == ["eval"]
    with pytest.raises(ConfigError, match="eval: sliding_window: 0 must be at least 1"):
        load_recipe(smoke, ["eval.sliding_window=0"])
    ablation = load_recipe(ROOT / "recipes/ablations/sliding-window-eval.yaml")
    assert (
        ablation.eval.sliding_window == 32
        and ablation.sft == load_recipe(ROOT / "recipes/tiny/pipeline.yaml").sft
    )


def test_rm_freeze_base_without_init_from_is_refused_by_key():
    # a recipe that extends the tiny one and reads its RM from the hub would otherwise train only the head
    with pytest.raises(
        ConfigError,
        match=r"pipeline.yaml:\d+: rm: freeze_base: true needs rm.init_from: .* set rm.freeze_base: false",
    ):
        load_recipe("recipes/tiny/pipeline.yaml", ["rm.init_from=null"])
    assert (
        load_recipe(
            "recipes/tiny/pipeline.yaml", ["rm.init_from=null", "rm.freeze_base=false"]
        ).rm.freeze_base
        is False
    )


def test_negative_rm_extra_layers_or_likelihood_weight_is_refused_by_key():
    with pytest.raises(ConfigError, match=r"pipeline.yaml:\d+: rm: extra_layers: -1 is negative"):
        load_recipe("recipes/tiny/pipeline.yaml", ["rm.extra_layers=-1"])
    with pytest.raises(ConfigError, match=r"rm: likelihood_weight: -0.5 is negative"):
        load_recipe("recipes/tiny/pipeline.yaml", ["rm.likelihood_weight=-0.5"])
    with pytest.raises(ConfigError, match=r"rm: likelihood_targets: -1.0 is negative"):
        load_recipe("recipes/tiny/pipeline.yaml", ["rm.likelihood_targets=-1"])
    with pytest.raises(ConfigError, match=r"rm: likelihood_targets: needs rm.init_from"):
        load_recipe("recipes/tiny/pipeline.yaml", ["rm.likelihood_targets=1", "rm.init_from=null"])


def test_distill_train_until_teacher_below_must_be_a_probability_below_one():
    for bad in ("1.0", "-0.1"):
        with pytest.raises(
            ConfigError, match=rf"distill: train_until_teacher_below: {bad} must be in \[0, 1\)"
        ):
            load_recipe("recipes/tiny/pipeline.yaml", [f"distill.train_until_teacher_below={bad}"])
    assert load_recipe("recipes/tiny/pipeline.yaml", ["distill.train_until_teacher_below=0.1"])


def test_eval_max_prompts_caps_every_evaluation_and_reruns_only_what_evaluates_when_set():
    from posttrain.stages import generate, rlhf, sft

    tiny = load_recipe(ROOT / "recipes/tiny/pipeline.yaml")
    capped = load_recipe(ROOT / "recipes/tiny/pipeline.yaml", ["eval.max_prompts=3"])
    rows = [{"id": i} for i in range(10)]
    assert tiny.eval.capped(rows) == rows and capped.eval.capped(rows) == rows[:3]
    # unset, it is not part of any hash (finished runs stay finished); set, the evaluating stages rerun
    assert config_hash(sft.stage_config(tiny)) == config_hash(
        sft.stage_config(load_recipe(ROOT / "recipes/tiny/pipeline.yaml", ["seed=" + str(tiny.seed)]))
    )
    for stage in (sft, rlhf):
        assert config_hash(stage.stage_config(capped)) != config_hash(stage.stage_config(tiny)), stage
    assert config_hash(generate.stage_config(capped)) == config_hash(generate.stage_config(tiny))
    with pytest.raises(ConfigError, match="max_prompts: 0 must be at least 1"):
        load_recipe(ROOT / "recipes/tiny/pipeline.yaml", ["eval.max_prompts=0"])


def test_the_real_recipes_cap_their_evaluation_and_the_dry_run_names_every_generation_engine():
    out = subprocess.run([sys.executable, "-m", "posttrain", "run", "recipes/gemma2-9b/pipeline.yaml", "--dry-run"],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "[run] evaluation: the first 512 prompts of the evaluation split (eval.max_prompts)" in out.stdout
    assert "[run] generation engine of generate: vllm (one engine per GPU, for the whole stage)" in out.stdout
    for stage in ("distill", "rlhf"):
        assert f"[run] generation engine of {stage}: vllm (TRL's vLLM integration, colocate)" in out.stdout


def test_trl_s_vllm_keys_are_accepted_where_trl_has_them_and_refused_for_sft_naming_the_key():
    """rlhf and distill hand `trl:` to RLOOConfig and the distillation config, which have TRL's vLLM keys; whether
    they use vLLM is the sections' own `engine` and `vllm_mode` (one name per quantity); SFTConfig has none (the
    sft stage does not generate)."""
    rl = load_recipe(ROOT / "recipes/tiny/smoke.yaml", ["rlhf.engine=vllm", "rlhf.vllm_mode=server",
                     "rlhf.train.trl={vllm_server_port: 8001, ds3_gather_for_generation: false}"])  # fmt: skip
    assert (rl.rlhf.engine, rl.rlhf.vllm_mode) == ("vllm", "server")
    assert rl.rlhf.train.trl == {"vllm_server_port": 8001, "ds3_gather_for_generation": False}
    load_recipe(ROOT / "recipes/tiny/smoke.yaml", ["distill.engine=vllm", "distill.train.trl={vllm_gpu_memory_utilization: 0.3}"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"trl.use_vllm: set by the recipe's own key 'engine'"):
        load_recipe(ROOT / "recipes/tiny/smoke.yaml", ["rlhf.train.trl={use_vllm: true}"])
    with pytest.raises(ConfigError, match=r"trl.vllm_mode: set by the recipe's own key 'vllm_mode'"):
        load_recipe(ROOT / "recipes/tiny/smoke.yaml", ["distill.train.trl={vllm_mode: colocate}"])
    with pytest.raises(ConfigError, match=r"sft: trl.use_vllm: not a trl.SFTConfig field"):
        load_recipe(ROOT / "recipes/tiny/smoke.yaml", ["sft.trl={use_vllm: true}"])
    with pytest.raises(ConfigError, match=r"vllm_mode"):
        load_recipe(ROOT / "recipes/tiny/smoke.yaml", ["rlhf.vllm_mode=remote"])
