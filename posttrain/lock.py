"""One `posttrain run` or `posttrain stage` per run folder at a time: the lock file `<run folder>/.lock`.

The holder keeps an exclusive `flock` on the file for as long as it runs and writes into it who it is: pid, host,
start time, command. A second `posttrain run` or `stage` of the same run folder stops at once with an error that
names the holder. The kernel drops a dead process's flock, so a lock whose record names a process of this host that
no longer runs is taken over, with a message. A record of another host is never taken over (posttrain cannot tell
from here whether that process still runs): the error says which file to delete if it does not.

The stages that `posttrain run` starts (`posttrain stage …`, one or several processes under `accelerate launch`)
find the holder's token in their environment (`POSTTRAIN_RUN_LOCK`) and run under its lock; they also inherit the
locked file descriptor, so that the lock stays held while a stage still runs after its `posttrain run` was killed.
Under a several-process launch started by hand, the main process (`RANK` 0) takes the lock for all of them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import StageError

LOCK_FILE = ".lock"
HOLDER_ENV = "POSTTRAIN_RUN_LOCK"


class RunLocked(StageError):
    """The run folder is in use by another posttrain process; the message names it."""


@dataclass
class RunLock:
    """A held lock: the run folder's lock file, its locked descriptor (to hand to child processes) and the token
    that the children find in their environment."""

    path: Path
    fd: int
    token: str
    previous_env: str | None


def _start_ticks(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), which tells a pid reused by another process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(record: dict) -> bool:
    """Whether the process a record of this host names still runs (the same process, not a reused pid)."""
    pid = record.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    ticks = record.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)


def read_record(path: Path) -> dict:
    """The holder a lock file names ({} when none)."""
    try:
        record = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def describe(record: dict) -> str:
    return (f"`{record.get('command', 'posttrain')}` (pid {record.get('pid', '?')} on host {record.get('host', '?')}, "
            f"started {record.get('started', '?')})")  # fmt: skip


def _refusal(path: Path, record: dict, held: bool) -> RunLocked:
    folder, here = path.parent, socket.gethostname()
    if record.get("host", here) != here:
        return RunLocked(f"{folder} is in use by {describe(record)}, as its lock {path} says; posttrain cannot check "
                         f"a process of another host: wait for it to end, or if no posttrain runs there for this "
                         f"folder, delete {path}")  # fmt: skip
    ended = (
        " — that process has ended, but a stage it started still runs" if held and not _alive(record) else ""
    )
    return RunLocked(f"{folder} is in use by {describe(record)}{ended}; one posttrain run or stage per run folder at a "
                     "time (two would write the same stage folders): wait for it to end or stop it, or give this run "
                     "another name or output_dir")  # fmt: skip


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError:
        return False


def _record(what: str) -> dict:
    started = time.time()
    pid, host = os.getpid(), socket.gethostname()
    return {"pid": pid, "host": host, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "command": what, "start_ticks": _start_ticks(pid), "token": f"{host}:{pid}:{started:.6f}"}  # fmt: skip


def _take(fd: int, path: Path, what: str) -> RunLock:
    """With the flock held on `path`: take over a dead holder's record (or refuse a live or foreign one), write
    ours and hand the token to the environment of the processes this one starts."""
    previous = read_record(path)
    if previous and (previous.get("host") != socket.gethostname() or _alive(previous)):
        os.close(fd)
        raise _refusal(path, previous, held=False)
    if previous:
        print(
            f"[lock] {path}: taking over the lock of {describe(previous)}, which no longer runs",
            file=sys.stderr,
        )
    record = _record(what)
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    os.fsync(fd)
    lock = RunLock(path, fd, record["token"], os.environ.get(HOLDER_ENV))
    os.environ[HOLDER_ENV] = record["token"]
    return lock


def acquire(run_dir: Path, what: str) -> RunLock | None:
    """Take the lock of `run_dir` for `what` (the command, as the holder's record shows it); raise RunLocked naming
    the holder when another process has it. None when this process runs under a lock already held for it: a stage
    started by the holder (its token in the environment), or a process other than the main one of a launch."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    token = os.environ.get(HOLDER_ENV)
    if token and read_record(path).get("token") == token:
        return None
    if os.environ.get("RANK", "0") != "0":
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(10):  # another process may unlink the file between our open and our flock: open again
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(path, read_record(path), held=True) from None
        if _same_file(fd, path):
            return _take(fd, path, what)
        os.close(fd)
    raise RunLocked(f"{path}: could not take the lock (the file keeps being replaced); try again")


def release(lock: RunLock | None) -> None:
    """Give the lock up: the file is removed, then the descriptor closed (a process that opened the old file and
    gets its flock sees that the file is gone and opens the new one)."""
    if lock is None:
        return
    if read_record(lock.path).get("token") == lock.token:
        lock.path.unlink(missing_ok=True)
    os.close(lock.fd)
    if lock.previous_env is None:
        os.environ.pop(HOLDER_ENV, None)
    else:
        os.environ[HOLDER_ENV] = lock.previous_env


def holder(run_dir: Path) -> dict | None:
    """Who holds `run_dir`'s lock now, read without taking it (for `--dry-run`): its record when the process it
    names may still run (this host: alive; another host: unknown), else None."""
    record = read_record(Path(run_dir) / LOCK_FILE)
    if not record or (record.get("host") == socket.gethostname() and not _alive(record)):
        return None
    return record
