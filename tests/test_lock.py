"""The run lock: one `posttrain run` or `stage` per run folder; the holder named; a dead holder's lock taken over;
the stages a run starts run under its lock."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain import lock

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "recipes" / "tiny" / "smoke.yaml")


@pytest.fixture(autouse=True)
def no_holder(monkeypatch):
    monkeypatch.delenv(lock.HOLDER_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


def _other_process_tries(run_dir: Path) -> subprocess.CompletedProcess:
    code = ("import sys; from posttrain import lock\n"
            "try:\n    lock.release(lock.acquire(sys.argv[1], 'posttrain run other'))\n"
            "except lock.RunLocked as e:\n    print(e); sys.exit(3)\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != lock.HOLDER_ENV}
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, env=env)


def test_a_second_holder_is_refused_naming_the_first_and_the_lock_goes_with_the_holder(tmp_path):
    held = lock.acquire(tmp_path / "run", "posttrain run r.yaml")
    record = json.loads((tmp_path / "run" / lock.LOCK_FILE).read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
    other = _other_process_tries(tmp_path / "run")
    assert other.returncode == 3
    assert (
        f"is in use by `posttrain run r.yaml` (pid {os.getpid()} on host {socket.gethostname()}"
        in other.stdout
    )
    assert lock.acquire(tmp_path / "run", "a stage it started") is None  # its token is in the environment
    lock.release(held)
    assert not (tmp_path / "run" / lock.LOCK_FILE).exists() and lock.HOLDER_ENV not in os.environ
    assert _other_process_tries(tmp_path / "run").returncode == 0


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_lock_left_by_a_dead_process_of_this_host_is_taken_over(tmp_path, capsys):
    path = tmp_path / lock.LOCK_FILE
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "then",
                                "command": "posttrain run old.yaml", "token": "x"}))  # fmt: skip
    held = lock.acquire(tmp_path, "posttrain run new.yaml")
    assert "taking over the lock of `posttrain run old.yaml`" in capsys.readouterr().err
    assert lock.read_record(path)["command"] == "posttrain run new.yaml"
    lock.release(held)


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    path = tmp_path / lock.LOCK_FILE
    path.write_text(
        json.dumps({"pid": 1, "host": "node-7", "started": "then", "command": "posttrain run r.yaml"})
    )
    with pytest.raises(lock.RunLocked, match=rf"pid 1 on host node-7.*cannot check.*delete {path}"):
        lock.acquire(tmp_path, "posttrain run r.yaml")
    assert lock.read_record(path)["host"] == "node-7"


def test_other_processes_of_a_launch_run_under_the_main_one(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert lock.acquire(tmp_path, "posttrain stage sft r.yaml") is None
    assert not (tmp_path / lock.LOCK_FILE).exists()


def test_the_lock_stays_held_while_a_stage_started_by_a_killed_run_still_runs(tmp_path):
    # the holder starts a child that inherits the locked descriptor (as `posttrain run` starts its stages), then
    # dies without releasing anything
    code = ("import os, subprocess, sys; from posttrain import lock\n"
            "held = lock.acquire(sys.argv[1], 'posttrain run r.yaml')\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], pass_fds=(held.fd,),\n"
            "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(child.pid, flush=True); os._exit(0)\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    child = int(out.stdout.split()[0])
    try:
        other = _other_process_tries(tmp_path)
        assert (
            other.returncode == 3
            and "that process has ended, but a stage it started still runs" in other.stdout
        )
    finally:
        os.kill(child, signal.SIGKILL)
    for _ in range(50):  # the kernel drops the flock with the last descriptor
        if _other_process_tries(tmp_path).returncode == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the lock was not released when the stage ended")


@pytest.mark.stage
def test_a_second_run_of_a_running_recipe_is_refused_at_once(tmp_path):
    sets = [f"--set=output_dir={tmp_path}"]
    first = subprocess.Popen([sys.executable, "-m", "posttrain", "run", SMOKE, *sets], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        path = tmp_path / "tiny-smoke" / lock.LOCK_FILE
        for _ in range(600):
            if lock.read_record(path).get("pid") == first.pid:
                break
            time.sleep(0.1)
        second = subprocess.run([sys.executable, "-m", "posttrain", "run", SMOKE, *sets], cwd=ROOT,
                                capture_output=True, text=True)  # fmt: skip
        stage = subprocess.run([sys.executable, "-m", "posttrain", "stage", "sft", SMOKE, *sets], cwd=ROOT,
                               capture_output=True, text=True)  # fmt: skip
        assert first.poll() is None, "the first run ended before the second was tried"
        for refused in (second, stage):
            assert refused.returncode == 1, refused.stdout[-1000:] + refused.stderr[-1000:]
            assert f"is in use by `posttrain run {SMOKE} {sets[0]}` (pid {first.pid}" in refused.stderr
            assert "[run] data" not in refused.stdout
    finally:
        first.send_signal(signal.SIGTERM)  # passed on to its stage, which stops
        try:
            first.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(first.pid, signal.SIGKILL)
