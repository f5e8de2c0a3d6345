"""Stages whose launcher spans several machines (`num_machines` > 1 in its accelerate config, e.g. `multinode`).

Such a stage is started through Slurm: `srun` runs one `accelerate launch` on every node of the allocation, each
with its node rank (`$SLURM_NODEID`) and the main node's address (the allocation's first host), and DeepSpeed's
standard launcher (`deepspeed_multinode_launcher: standard`) starts torchrun there — no pdsh fan-out from one node.
It is never started on this machine alone (it would wait for the other machines forever), and only from a run
folder on storage every node sees: a stage's processes on every node read their parents and write checkpoints
there. A local file system (ext4, xfs, tmpfs, overlay …) is refused; `POSTTRAIN_SHARED_STORAGE=1` says that a
path is shared although its file system type is not one known to be (e.g. the same local path mirrored).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import yaml

from posttrain.config import ConfigError, launcher_file

SHARED_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse.ceph", "glusterfs",
                      "fuse.glusterfs", "wekafs", "fuse.juicefs", "fuse.gcsfuse", "fuse.mount-s3"}  # fmt: skip
SHARED_ENV = "POSTTRAIN_SHARED_STORAGE"


def machines(launcher: str) -> int:
    """How many machines a launcher spans (`num_machines` of its accelerate config; `local`: one)."""
    path = None if launcher == "local" else launcher_file(launcher)
    if path is None:
        return 1
    return int((yaml.safe_load(path.read_text()) or {}).get("num_machines", 1) or 1)


def srun_command(accelerate: list[str], n: int) -> list[str]:
    """`accelerate` (`python -m accelerate.commands.launch … --config_file F -m posttrain stage …`) run by `srun` once
    on each of `n` nodes, with that node's rank and the main node's address."""
    at = accelerate.index("--config_file") + 2
    head, tail = shlex.join(accelerate[:at]), shlex.join(accelerate[at:])
    script = (
        'MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1); '
        f'exec {head} --num_machines {n} --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN" {tail}'
    )
    return ["srun", f"--nodes={n}", "--ntasks-per-node=1", "bash", "-c", script]


def filesystem(path: Path, mounts: str | None = None) -> tuple[str, str]:
    """(mount point, file system type) of the mount that holds (or will hold) `path`: the longest mount point
    above it, from /proc/mounts or the `mounts` text given."""
    path = Path(path).resolve()
    text = mounts if mounts is not None else Path("/proc/mounts").read_text()
    best = ("/", "unknown")
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(
            best[0]
        ):
            best = (point, fields[2])
    return best


def check_can_start(stage: str, n: int, run_dir: Path, env=os.environ, mounts: str | None = None) -> None:
    """Refuse, with what to do, a stage spanning `n` machines started outside a Slurm allocation of as many
    nodes, or with its run folder on a local file system."""
    problems = []
    if "SLURM_JOB_ID" not in env:
        problems.append(
            f"stage {stage}: its launcher spans {n} machines and this is not a Slurm allocation; start the run "
            f"inside one (`salloc --nodes={n}` or `sbatch --nodes={n}`, then `posttrain run …`: every stage is "
            f"started through srun on each node), or start the stage on every node by hand "
            f"(recipes/accelerate/multinode.yaml says how)"
        )
    elif int(env.get("SLURM_NNODES", "1")) < n:
        problems.append(
            f"stage {stage}: its launcher spans {n} machines but this Slurm allocation has "
            f"{env.get('SLURM_NNODES', '1')} node(s); allocate {n} (`--nodes={n}`) or set num_machines"
        )
    point, fstype = filesystem(run_dir, mounts)
    if fstype not in SHARED_FILESYSTEMS and env.get(SHARED_ENV) != "1":
        problems.append(
            f"stage {stage}: the run folder {run_dir} is on a local file system ({fstype} at {point}), which the "
            f"other machines do not see; set output_dir: to shared storage (NFS, Lustre, GPFS …), or "
            f"{SHARED_ENV}=1 if this path is shared"
        )
    if problems:
        raise ConfigError(problems)
