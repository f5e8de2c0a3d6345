"""The multi-node launcher as accelerate builds it from recipes/accelerate/multinode.yaml: DeepSpeed's standard
launcher (torchrun on each node, started by Slurm's srun or by hand), not a pdsh fan-out from the main node."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _accelerate_command(config: Path, *extra: str) -> tuple[list[str] | None, object]:
    """What `accelerate launch --config_file CONFIG … -m posttrain stage sft R` would start, from accelerate's own
    builder (the launch itself replaced): the `deepspeed` command it would run as a subprocess (None when it runs
    torch's launcher in its own process instead) and the arguments it hands that launcher."""
    import accelerate.commands.launch as launch
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    built: dict = {}
    parser = launch.launch_command_parser()
    args = parser.parse_args(
        ["--config_file", str(config), *extra, "-m", "posttrain", "stage", "sft", "R.yaml"]
    )
    original = launch.deepspeed_launcher
    launch.deepspeed_launcher = lambda a: built.update(cmd=prepare_deepspeed_cmd_env(a)[0], args=a)
    try:
        launch.launch_command(args)
    finally:
        launch.deepspeed_launcher = original
    return built["cmd"], built["args"]


def test_the_multinode_config_starts_each_node_with_torchrun_not_pdsh():
    config = ROOT / "recipes" / "accelerate" / "multinode.yaml"
    cmd, args = _accelerate_command(config, "--machine_rank", "1", "--main_process_ip", "10.1.2.3")
    assert cmd is None, cmd  # no `deepspeed --hostfile … --launcher pdsh` subprocess from the main node
    assert args.deepspeed_multinode_launcher == "standard"
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "8")
    main = getattr(args, "master_addr", None), getattr(args, "rdzv_endpoint", None)
    assert main[0] == "10.1.2.3" or main[1] == "10.1.2.3:29500", main
    assert (
        args.module
        and args.training_script == "posttrain"
        and args.training_script_args[:2] == ["stage", "sft"]
    )


def test_without_the_standard_launcher_accelerate_would_fan_out_over_pdsh(tmp_path):
    """What the key prevents: the same config without it builds a pdsh `deepspeed` command on the main node."""
    config = tmp_path / "multinode.yaml"
    text = (ROOT / "recipes" / "accelerate" / "multinode.yaml").read_text()
    config.write_text("\n".join(x for x in text.splitlines() if "deepspeed_multinode_launcher" not in x))
    cmd, _ = _accelerate_command(config, "--machine_rank", "0", "--main_process_ip", "10.1.2.3")
    assert cmd[0] == "deepspeed" and "pdsh" in cmd, cmd


def test_slurm_script_starts_every_node_through_srun_with_the_multinode_config():
    text = (ROOT / "recipes" / "accelerate" / "slurm.sh").read_text()
    assert "srun " in text and "--config_file recipes/accelerate/multinode.yaml" in text
    assert "--machine_rank \\$SLURM_NODEID" in text


def test_a_multi_machine_stage_is_run_by_srun_on_every_node_with_its_rank():
    from posttrain.config import load_recipe
    from posttrain.runner import launch_command

    recipe = load_recipe(ROOT / "recipes" / "gemma2-27b" / "pipeline.yaml")
    cmd = launch_command(recipe, "rlhf", "r.yaml", [])
    assert cmd[:5] == ["srun", "--nodes=2", "--ntasks-per-node=1", "bash", "-c"], cmd
    script = cmd[5]
    assert "scontrol show hostnames" in script and "multinode.yaml --num_machines 2" in script
    assert '--machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN" -m posttrain stage rlhf r.yaml' in script
    assert launch_command(recipe, "eval", "r.yaml", [])[0] != "srun"  # one process, this machine


NFS = "server:/export /shared nfs4 rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"


def test_a_multi_machine_stage_outside_slurm_or_on_local_storage_is_refused_saying_what_to_do():
    from posttrain.config import ConfigError
    from posttrain.multinode import check_can_start

    with pytest.raises(ConfigError) as e:
        check_can_start("rlhf", 2, Path("/shared/runs/x"), env={}, mounts=NFS)
    assert "stage rlhf: its launcher spans 2 machines and this is not a Slurm allocation" in str(e.value)
    assert "salloc --nodes=2" in str(e.value) and "local file system" not in str(e.value)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2"}
    check_can_start(
        "rlhf", 2, Path("/shared/runs/x"), env=slurm, mounts=NFS
    )  # shared storage, 2 nodes: starts
    with pytest.raises(ConfigError) as e:
        check_can_start("rlhf", 2, Path("/home/me/runs/x"), env=slurm, mounts=NFS)
    assert "/home/me/runs/x is on a local file system (ext4 at /)" in str(e.value) and "output_dir" in str(
        e.value
    )
    check_can_start(
        "rlhf", 2, Path("/home/me/runs/x"), env={**slurm, "POSTTRAIN_SHARED_STORAGE": "1"}, mounts=NFS
    )
    with pytest.raises(ConfigError, match="this Slurm allocation has 1 node"):
        check_can_start(
            "rlhf", 2, Path("/shared/r"), env={"SLURM_JOB_ID": "7", "SLURM_NNODES": "1"}, mounts=NFS
        )


def test_posttrain_run_refuses_a_multi_machine_recipe_outside_slurm_before_any_stage_starts(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run([sys.executable, "-m", "posttrain", "run", "recipes/tiny/smoke.yaml",
                          f"--set=output_dir={tmp_path}", "--set=launchers.rlhf=multinode"],
                         cwd=ROOT, capture_output=True, text=True, env=env)  # fmt: skip
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "stage rlhf: its launcher spans 2 machines and this is not a Slurm allocation" in out.stderr
    assert not (tmp_path / "tiny-smoke" / "data").exists()  # nothing ran
