"""The stage output contract: one folder per stage, written under a temporary name and renamed when complete.

    runs/<recipe>/<stage>[/<run>]/
      config.yaml       the resolved config of this stage
      metrics.jsonl     one JSON object per logged step (and a final summary row)
      provenance.json   parents, config hash, data hashes, git commit, library versions, wall time
      model/README.md   each exported model's card (`posttrain.cards`): lineage, figures, chat template
      DONE              written last; holds the config hash and the parents' hashes

A stage writes into `<folder>.partial/`; only on success is `DONE` written and the folder renamed into
place, so a folder without `DONE` is never read as a result, and a failed rerun leaves the last good result.
When a stage runs as several processes, only the main one writes here.

A stage reads its parents' outputs through `Parents`, which its caller (the runner) hands it: each parent's
finished folder and DONE hash, the model a parent saved (`stage_model`) and the data splits it wrote
(`split_path`). A stage never looks up another stage's folder itself.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.cards import write_cards
from posttrain.config import ConfigError, ModelSpec, Recipe, config_hash, dump_yaml
from posttrain.data.jsonl import split_path
from posttrain.dist import barrier, is_main
from posttrain.errors import DiskFull
from posttrain.files import (
    file_sha256,
    folder_bytes,
    free_bytes,
    human_bytes,
    out_of_space,
    replace_folder,
    write_atomic,
)

GATE_FAILED = (
    "GATE_FAILED"  # in `<stage>.partial/`: a quality gate's message; with STAGE_HASH, the config that failed
)
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "tokenizers")


def stage_model(folder: Path, like: ModelSpec | None = None) -> ModelSpec:
    """The model a finished stage saved (`<folder>/model`, its tokenizer beside it), loaded with the dtype and
    attention of `like` (the recipe's spec for that role)."""
    model = str(Path(folder) / "model")
    like = like or ModelSpec()
    return ModelSpec(
        name_or_path=model, tokenizer=model, dtype=like.dtype, attn_implementation=like.attn_implementation
    )


@dataclass(frozen=True)
class Parents:
    """What a stage reads from the stages before it, handed over by its caller: each parent's finished folder
    and the config hash its DONE records (a stage's own hash covers them)."""

    folders: dict[str, Path] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)

    def model(self, stage: str, like: ModelSpec | None = None) -> ModelSpec:
        return stage_model(self.folders[stage], like)

    def split(self, stage: str, name: str) -> Path:
        return split_path(self.folders[stage], name)


def teacher_spec(recipe: Recipe, parents: Parents) -> ModelSpec:
    """The teacher a stage loads: the `teacher` stage's model when the recipe trains its own
    (`teacher_train:`), else the recipe's `teacher:` itself (a hub model, a folder such as the shipped tiny one)."""
    if recipe.teacher is None:
        raise ConfigError(["this stage needs a 'teacher:' model in the recipe"])
    return parents.model("teacher", recipe.teacher) if recipe.teacher_train is not None else recipe.teacher


def stage_hash(config: Any, parents: dict[str, str]) -> str:
    """The identity of a stage's result: its own config and its parents' hashes."""
    return config_hash({"config": config, "parents": parents})


def read_done(folder: Path) -> dict | None:
    """The DONE record of a finished stage folder, or None when the folder is incomplete or missing."""
    try:
        return json.loads((folder / "DONE").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def git_commit() -> str | None:
    """The commit the code ran from, with "+dirty" when tracked files differ from it (the commit alone would not
    reproduce the run); None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + "+dirty" if changed else head) or None


def versions() -> dict[str, str]:
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def trim_metrics(f: Path, last_step: int) -> None:
    """On resume from a checkpoint at `last_step`: drop the rows of metrics file `f` logged after it (they will
    be redone). The main process does it when a stage runs as several."""
    if f.exists() and is_main():
        rows = [r for r in f.read_text().splitlines() if r and json.loads(r).get("step", 0) <= last_step]
        write_atomic(f, "".join(r + "\n" for r in rows))


class StageOutput:
    """Context manager for one stage folder. Use `.path` for files; `.log(row)` for metrics."""

    def __init__(
        self,
        final: Path,
        stage: str,
        config: Any,
        parents: dict[str, str] | None = None,
        resume: bool = False,
    ):
        self.final, self.stage, self.config = Path(final), stage, config
        self.parents = parents or {}
        self.hash = stage_hash(config, self.parents)
        self.path = self.final.with_name(self.final.name + ".partial")
        self.summary: dict[str, Any] = {}
        self.resume = resume
        self.resumed = False

    def __enter__(self) -> StageOutput:
        marker = self.path / "STAGE_HASH"
        # same config and parents: keep checkpoints and finished shards (every process decides before any writes)
        self.resumed = self.resume and marker.exists() and marker.read_text().strip() == self.hash
        barrier()
        if is_main():
            if not self.resumed:
                shutil.rmtree(self.path, ignore_errors=True)
                self.path.mkdir(parents=True)
                write_atomic(marker, self.hash + "\n")
            (self.path / "config.yaml").write_text(dump_yaml(self.config))
        barrier()
        self.started = time.time()
        return self

    def log(self, row: dict[str, Any]) -> None:
        if not is_main():
            return
        with open(self.path / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, default=float) + "\n")

    def __exit__(self, exc_type, exc, tb) -> bool:
        if (
            exc_type is not None
        ):  # the .partial folder stays for inspection; the last good result is untouched
            full = out_of_space(exc, self.path)
            if full:
                raise DiskFull(self.disk_full(full)) from exc
            return False
        if not is_main():
            return False
        try:
            self.finish()
        except Exception as e:
            full = out_of_space(e, self.path)
            if full:
                raise DiskFull(self.disk_full(full)) from e
            raise
        return False

    def disk_full(self, what: str) -> str:
        """The error of a stage that ran out of disk space while writing."""
        before = (f"the previous output {self.final} is untouched" if read_done(self.final)
                  else f"there is no previous output in {self.final}")  # fmt: skip
        return (f"stage {self.stage}: the disk holding {self.path} ran out of space ({what}); "
                f"{human_bytes(free_bytes(self.path))} free now. Nothing was marked done: {before}. {self.path} keeps this "
                f"attempt ({human_bytes(folder_bytes(self.path))}; a training stage's rerun resumes from its last complete checkpoint there; or delete "
                f"it to free the space). Free space on that disk, point output_dir at a larger one, or lower the "
                f"stage's keep_checkpoints / set save_optimizer: false; then rerun the same command")  # fmt: skip

    def finish(self) -> None:
        """The end of a successful stage: the summary row, provenance, model cards, DONE, the folder in place."""
        wall = time.time() - self.started
        self.log({"summary": True, "wall_time_s": round(wall, 3), **self.summary})
        data_files = sorted(
            p for p in self.path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json")
        )
        provenance = {
            "stage": self.stage,
            "config_hash": self.hash,
            "parents": self.parents,
            "data_hashes": {str(p.relative_to(self.path)): file_sha256(p) for p in data_files},
            "git_commit": git_commit(),
            "versions": versions(),
            "host": socket.gethostname(),
            "wall_time_s": round(wall, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (self.path / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        write_cards(self.path, self.final.parent.name)  # every exported model says where it came from
        write_atomic(
            self.path / "DONE", json.dumps({"config_hash": self.hash, "parents": self.parents}) + "\n"
        )
        (self.path / "STAGE_HASH").unlink(missing_ok=True)
        replace_folder(self.path, self.final)


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip


def check_exported(stage_folder: Path) -> tuple[list[str], int]:
    """Every model a stage exported (`model/` folders with a config.json), read back from disk by another
    process than the one that wrote it (`check_model_folder`). Returns (problems, tensors checked)."""
    problems, count = [], 0
    for model in sorted(
        q.parent for q in Path(stage_folder).rglob("config.json") if q.parent.name == "model"
    ):
        p, n = check_model_folder(model)
        problems, count = problems + p, count + n
    return problems, count


def check_model_folder(model: Path) -> tuple[list[str], int]:
    """A saved model folder's weights read back: each safetensors file is complete, no tensor is empty (a ZeRO-3
    save without the gather writes empty ones), a sharded model's index names only shards that exist. Returns
    (problems, tensors checked)."""
    problems, count = [], 0
    files = sorted(model.glob("*.safetensors"))
    if not files:
        problems.append(f"{model}: no *.safetensors weights")
    index = model / "model.safetensors.index.json"
    if index.exists():
        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        problems += [f"{index}: names shard {s} that is missing" for s in sorted(shards)
                     if not (model / s).exists()]  # fmt: skip
    for f in files:
        header, n = safetensors_header(f)
        if header is None:
            problems.append(f"{f}: not a safetensors file (truncated header)")
            continue
        end = 0
        for name, t in header.items():
            if name == "__metadata__":
                continue
            count += 1
            numel = 1
            for d in t["shape"]:
                numel *= d
            begin, stop = t["data_offsets"]
            end = max(end, stop)
            if numel == 0:
                problems.append(f"{f}: tensor {name} is empty (shape {t['shape']})")
            elif stop - begin != numel * _DTYPE_BYTES.get(t["dtype"], 0):
                problems.append(f"{f}: tensor {name} has {stop - begin} bytes for shape {t['shape']}")
        if f.stat().st_size < 8 + n + end:
            problems.append(f"{f}: truncated ({f.stat().st_size} bytes, the header needs {8 + n + end})")
    return problems, count


def safetensors_header(f: Path) -> tuple[dict | None, int]:
    """(the header of safetensors file `f`, its length in bytes); (None, n) when it cannot be read."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            return (json.loads(fh.read(n)) if 0 < n < 100_000_000 else None), n
    except (OSError, ValueError):
        return None, -1
