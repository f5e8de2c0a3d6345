"""A stage that runs out of disk space while writing: no DONE, the previous output intact, an error that says what
ran out — on a small filesystem of its own (a tmpfs; skipped where none can be mounted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.errors import DiskFull
from posttrain.files import file_sha256, out_of_space
from posttrain.outputs import StageOutput, read_done

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "recipes" / "tiny" / "smoke.yaml")


def _stage(disk: Path, config: dict, payload: bytes) -> Path:
    with StageOutput(disk / "r" / "sft", "sft", config) as out:
        (out.path / "model").mkdir()
        (out.path / "model" / "weights.bin").write_bytes(payload)
    return out.final


def test_a_write_that_fills_the_disk_leaves_no_done_and_the_last_output(small_disk):
    disk = small_disk(2)
    final = _stage(disk, {"lr": 1}, b"good" * 1000)
    good = read_done(final)
    with pytest.raises(DiskFull) as e:
        _stage(disk, {"lr": 2}, b"x" * 3_000_000)
    msg = str(e.value)
    assert "stage sft: the disk holding" in msg and "ran out of space (No space left on device" in msg
    assert f"the previous output {final} is untouched" in msg and "keep_checkpoints" in msg
    assert read_done(final) == good and (final / "model" / "weights.bin").read_bytes() == b"good" * 1000
    partial = final.with_name("sft.partial")
    assert partial.exists() and not (partial / "DONE").exists()


def test_torch_s_failed_write_on_a_full_disk_reads_as_a_full_disk(small_disk):
    import torch

    disk = small_disk(2)
    try:
        torch.save(torch.zeros(1_000_000), disk / "big.pt")  # 4 MB on a 2 MB disk
    except RuntimeError as e:  # torch says only that its zip writer's position is wrong
        assert "No space" not in str(e) and out_of_space(e, disk) is not None
    else:
        pytest.fail("torch.save did not fail on a full disk")
    assert out_of_space(RuntimeError("a bug"), disk) is None


def _posttrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "posttrain", *args], capture_output=True, text=True, cwd=ROOT
    )


@pytest.mark.stage
def test_a_training_stage_on_a_full_disk_keeps_its_last_good_model(small_disk):
    disk = small_disk(128)
    first = _posttrain("run", SMOKE, "--only", "teacher", f"--set=output_dir={disk}")
    assert first.returncode == 0, first.stderr[-2000:]
    teacher = disk / "tiny-smoke" / "teacher"
    done, weights = read_done(teacher), file_sha256(teacher / "model" / "model.safetensors")
    # fill the disk, leaving less than one checkpoint (the tiny teacher's weights and Adam state: ~7 MB)
    free = __import__("shutil").disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * (free - 3 * 2**20))
    changed = ["--set=teacher_train.learning_rate=0.01", f"--set=output_dir={disk}"]
    refused = _posttrain("run", SMOKE, "--only", "teacher", *changed)  # the preflight sees it coming
    assert (
        refused.returncode == 2
        and "output_dir: " in refused.stderr
        and "MB free on its disk" in refused.stderr
    )
    assert "nothing was started" in refused.stderr and not (teacher.parent / "teacher.partial").exists()
    stage = _posttrain("stage", "teacher", SMOKE, *changed)  # the stage alone, past the preflight
    assert stage.returncode == 1, stage.stderr[-2000:]
    assert "stage teacher: the disk holding" in stage.stderr and "ran out of space" in stage.stderr
    assert f"the previous output {teacher} is untouched" in stage.stderr and "Traceback" not in stage.stderr
    assert read_done(teacher) == done and file_sha256(teacher / "model" / "model.safetensors") == weights
    assert not (teacher.parent / "teacher.partial" / "DONE").exists()
    assert json.loads((teacher / "provenance.json").read_text())["config_hash"] == done["config_hash"]
