"""Recipes: YAML → frozen, nested dataclasses.

A recipe is a YAML file whose sections mirror the dataclasses below (`model:`, `chat:`, `data:` …, then one
section per stage). Loading is strict:

- an unknown key is an error that names the file, the line, the key and the closest valid key;
- a value of the wrong type is an error that names the same and the type expected;
- cross-field problems (each dataclass's `problems()`) are collected and raised together, one line each;
- `extends: other.yaml` (relative to the file) inherits a recipe; keys set here override it, mappings merge
  key by key, lists are replaced whole; `extends` may be chained;
- `--set a.b=value` overrides any key from the command line (the value is parsed as YAML).

Every problem found is reported in one `ConfigError`, before any model loads. Defaults live only in the
dataclasses. `config_hash` gives a stable hash of any section (key order and file layout do not change it).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from posttrain.data.sources import DataConfig
from posttrain.distill import DistillConfig
from posttrain.generation import EvalConfig, SamplingConfig
from posttrain.reward import RMConfig
from posttrain.rl import RLConfig
from posttrain.training import TrainConfig
from posttrain.world import WorldConfig


class ConfigError(ValueError):
    """A recipe is wrong. The message has one line per problem: where, what is wrong, what to do."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = "recipe error" if len(problems) == 1 else f"{len(problems)} recipe errors"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


# ----------------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class ModelSpec:
    """A model: a hub id or local folder (`name_or_path`), or one of the built-in tiny presets (`preset`).

    dtype: `auto` is bf16 on a GPU that supports it and fp32 on CPU; fp16 is not offered (Gemma overflows in it).
    attn_implementation: `auto` is eager for Gemma 2 (it needs attention soft-capping, which SDPA drops), or
    FlashAttention 2 when `flash_attention_2` is asked for and flash-attn ≥ 2.6 is installed.
    tokenizer: `tiny` (the built-in character tokenizer), a hub id or a folder; default: the model's own.
    """

    name_or_path: str | None = None
    preset: Literal["tiny-student", "tiny-teacher", "tiny-rm"] | None = None
    tokenizer: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    attn_implementation: Literal["auto", "eager", "flash_attention_2", "sdpa"] = "auto"

    def problems(self) -> list[str]:
        out = []
        if (self.name_or_path is None) == (self.preset is None):
            out.append(
                "set exactly one of 'name_or_path' (hub id or folder) and 'preset' (tiny-student, ...)"
            )
        if self.dtype == "fp16":
            out.append("dtype: fp16 overflows in Gemma's activations; set bf16 (GPU) or fp32 (CPU), or auto")
        if self.attn_implementation == "sdpa":
            out.append("attn_implementation: sdpa drops Gemma 2's attention soft-capping; set eager or auto")
        return out


@dataclass(frozen=True)
class ChatConfig:
    """Gemma chat formatting (see posttrain/chat.py).

    system: `fold` puts a system message's text and a blank line before the first user turn (as Gemma 3's
    template does); `reject` makes a system message an error.
    train_on: `all` trains every model turn; `last` only the final one.
    max_length: tokens per rendered conversation; longer prompts are cut from the left (data layer).
    """

    system: Literal["fold", "reject"] = "fold"
    train_on: Literal["all", "last"] = "all"
    max_length: int = 512

    def problems(self) -> list[str]:
        return [] if self.max_length >= 8 else [f"max_length: {self.max_length} is too small; set at least 8"]


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment tracking. wandb runs offline unless `mode: online` and a server is configured."""

    wandb: bool = False
    mode: Literal["offline", "online"] = "offline"
    project: str = "posttrain"


LAUNCHERS = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


def launcher_file(name: str) -> Path | None:
    """A launcher name (`cpu`, `ddp-cpu`, `zero3` … in recipes/accelerate/) or a path to an accelerate config."""
    path = LAUNCHERS / f"{name}.yaml" if "/" not in name and not name.endswith(".yaml") else Path(name)
    return path if path.is_file() else None


def launcher_processes(name: str) -> int:
    """How many processes a launcher starts (`num_processes` of its accelerate config; `local`: one)."""
    path = None if name == "local" else launcher_file(name)
    if path is None:
        return 1
    try:
        n = (yaml.safe_load(path.read_text()) or {}).get("num_processes", 1)
    except yaml.YAMLError:
        return 1  # accelerate itself reports a broken config file when the stage starts
    return n if isinstance(n, int) else 1


@dataclass(frozen=True)
class MergeConfig:
    """The `merge:` section: average the `rlhf` runs' policies (`posttrain.merging`).

    method: `liti` (WARP: SLERP of the runs' task vectors from the starting policy, then θ = (1 − η) θ_init +
    η θ_slerp), `slerp` (the same with η = 1) or `linear` (a weighted average, `weights` default uniform).
    eta: the η of the model saved as `merge/model`. sweep: the η values evaluated for the reward–KL plot (liti).
    """

    method: Literal["linear", "slerp", "liti"] = "liti"
    eta: float = 0.5
    sweep: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    weights: tuple[float, ...] | None = None

    def problems(self) -> list[str]:
        out = []
        if not all(0.0 <= e <= 1.0 for e in (self.eta, *self.sweep)):
            out.append(
                f"eta and sweep values must be in [0, 1] (got eta {self.eta}, sweep {list(self.sweep)})"
            )
        if self.weights is not None and (self.method != "linear" or any(w < 0 for w in self.weights)):
            out.append("weights: only for method linear, and non-negative")
        return out


@dataclass(frozen=True)
class Recipe:
    """A whole pipeline. `name` decides the output folder: `<output_dir>/<name>/<stage>/`.

    launcher: how `posttrain run` starts each stage — `local` (a plain process) or an accelerate config: a name in
    recipes/accelerate/ (cpu, ddp-cpu, ddp, zero2, zero3, zero3-offload, multinode) or a path; `launchers` sets it
    per stage (e.g. `launchers: {rlhf: zero3-offload}`). The one-process stages (data, eval, merge) run as a plain
    process when they inherit a several-process `launcher` (`launcher_for`).
    seed: every stage's seed (data draws, initialisation, data order, sampling); `seeds` sets it per stage (e.g.
    `seeds: {sft: 1}`), so that a seed study reruns only that stage and the ones after it.
    teacher_train: set it to train the teacher with SFT on the data stage's conversations (the `teacher` stage;
    the tiny recipe does, from a preset); leave it unset when `teacher` names a trained model. generate: how the
    teacher samples responses. sft: the student's SFT run. rm: the reward model's pairs, training and gate.
    eval: the evaluation done at the end of each stage. distill, rlhf, merge: those stages (absent: skipped).
    """

    name: str
    model: ModelSpec
    output_dir: str = "runs"
    seed: int = 0
    launcher: str = "cpu"
    launchers: dict[str, str] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    chat: ChatConfig = field(default_factory=ChatConfig)
    teacher: ModelSpec | None = None
    reward_model: ModelSpec | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher_train: TrainConfig | None = None
    generate: SamplingConfig = field(default_factory=SamplingConfig)
    sft: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    distill: DistillConfig | None = None
    rlhf: RLConfig | None = None
    merge: MergeConfig | None = None
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def seed_for(self, stage: str) -> int:
        """The seed of `stage`: `seeds.<stage>` when set, else `seed`."""
        return self.seeds.get(stage, self.seed)

    def launcher_for(self, stage: str) -> str:
        """The launcher that starts `stage`: its own (`launchers`), else the recipe's — except that a stage which
        runs in one process (data, eval, merge) is started as a plain process (`local`) when the recipe's launcher
        would start several, so that one recipe-wide `launcher: zero3` serves the whole pipeline."""
        from posttrain.dist import MULTI_PROCESS_STAGES

        if stage in self.launchers:
            return self.launchers[stage]
        if stage not in MULTI_PROCESS_STAGES and launcher_processes(self.launcher) > 1:
            return "local"
        return self.launcher

    def problems(self) -> list[str]:
        from posttrain.runner import STAGES

        out = []
        for section, keys in (("launchers", self.launchers), ("seeds", self.seeds)):
            out += [
                f"{section}.{k}: no such stage; stages are {', '.join(STAGES)}"
                for k in keys
                if k not in STAGES
            ]
        if not self.name or any(c in self.name for c in "/\\ ") or self.name.startswith("."):
            out.append(f"name: {self.name!r} must be a plain folder name (no spaces or slashes)")
        for stage, name in [("launcher", self.launcher), *self.launchers.items()]:
            if name != "local" and launcher_file(name) is None:
                out.append(
                    f"{'launchers.' + stage if stage != 'launcher' else 'launcher'}: {name!r} is neither 'local' nor a "
                    f"launcher in recipes/accelerate/ ({', '.join(sorted(p.stem for p in LAUNCHERS.glob('*.yaml')))}) "
                    "nor an existing accelerate config file"
                )  # fmt: skip
        from posttrain.dist import MULTI_PROCESS_STAGES

        for stage, name in self.launchers.items():
            if stage not in MULTI_PROCESS_STAGES and launcher_processes(name) > 1:
                out.append(
                    f"launchers.{stage}: {name!r} starts {launcher_processes(name)} processes, but stage {stage} runs "
                    f"in one; give it a one-process launcher (`launchers: {{{stage}: local}}` or cpu), or leave it "
                    "out: a one-process stage that inherits a several-process `launcher` runs as a plain process"
                )
        if self.rlhf is not None and self.rlhf.reward == "world" and self.data.source != "world":
            out.append(
                f"rlhf.reward: 'world' scores responses with the built-in world's verifiers, but data.source is "
                f"{self.data.source!r}; use reward: rm"
            )
        for section, train in (("distill.train", self.distill and self.distill.train),
                               ("rlhf.train", self.rlhf and self.rlhf.train)):  # fmt: skip
            if train is not None and train.length_buckets > 1:
                out.append(
                    f"{section}.length_buckets: only the SFT stages (sft, teacher_train) and rm cut batches by "
                    "length (RL and distillation batches are sampled responses)"
                )
        for section, train, spec in (
            ("sft", self.sft, self.model),
            ("teacher_train", self.teacher_train, self.teacher),
        ):
            if (
                train is not None
                and train.packing
                and (spec is None or spec.attn_implementation != "flash_attention_2")
            ):
                out.append(
                    f"{section}.packing: packed sequences would attend to each other with eager attention; "
                    "set packing: false, or attn_implementation: flash_attention_2 for that model (GPU)"
                )
        return out

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# --------------------------------------------------------------------------------------------- YAML + lines


class _Loader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key (`lines` attribute of each mapping)."""


class _Mapping(dict):
    lines: dict[str, int]


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _Mapping:
    out = _Mapping()
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise ConfigError(
                [f"{node.start_mark.name}:{key_node.start_mark.line + 1}: key {key!r} appears twice"]
            )
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)

Where = dict[tuple[str, ...], str]  # key path → "file:line" (or "--set ...") that set it


def _read_yaml(path: Path) -> tuple[dict, Where]:
    try:
        with open(path) as stream:  # a named stream, so that YAML marks carry the file name
            data = yaml.load(stream, Loader=_Loader) or _Mapping()  # noqa: S506 - _Loader is a SafeLoader
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the recipe ({e.strerror})"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{at}: not valid YAML ({getattr(e, 'problem', e)})"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: a recipe is a mapping of sections, got {type(data).__name__}"])
    where: Where = {}

    def walk(node: dict, prefix: tuple[str, ...]) -> None:
        for k, v in node.items():
            where[prefix + (str(k),)] = f"{path}:{getattr(node, 'lines', {}).get(k, '?')}"
            if isinstance(v, dict):
                walk(v, prefix + (str(k),))

    walk(data, ())
    return data, where


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, Where]:
    """Read a recipe file and its `extends:` chain into one plain dict, with where each key was set."""
    path = Path(path)
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in _seen + (path.resolve(),))
        raise ConfigError([f"{path}: 'extends' forms a cycle ({chain})"])
    data, where = _read_yaml(path)
    parent = data.pop("extends", None)
    where.pop(("extends",), None)
    if parent is None:
        return data, where
    if not isinstance(parent, str):
        raise ConfigError([f"{path}:{data.lines.get('extends', '?')}: 'extends' takes one file path"])
    parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
    if not parent_path.exists():
        line = getattr(data, "lines", {}).get("extends", "?")
        raise ConfigError([f"{path}:{line}: extends {parent!r}, but {parent_path} does not exist"])
    base, base_where = load_raw(parent_path, _seen + (path.resolve(),))
    return _merge(base, data), {**base_where, **where}


def apply_overrides(raw: dict, where: Where, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides (value parsed as YAML) to a raw recipe dict; returns a new dict."""
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: write it as key.path=value, e.g. --set sft.learning_rate=1e-5")
            continue
        parts = tuple(key.strip().split("."))
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        patch: Any = parsed
        for p in reversed(parts):
            patch = {p: patch}
        raw = _merge(raw, patch)
        where[parts] = f"--set {item}"
        for i in range(1, len(parts)):
            where.setdefault(parts[:i], f"--set {item}")
    if problems:
        raise ConfigError(problems)
    return raw


# ------------------------------------------------------------------------------------------ dict → dataclass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {
        type(None): "null",
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }.get(tp, getattr(tp, "__name__", str(tp)))


class _Builder:
    def __init__(self, where: Where, source: str):
        self.where, self.source, self.problems = where, source, []

    def at(self, path: tuple[str, ...]) -> str:
        for i in range(len(path), 0, -1):
            if path[:i] in self.where:
                return self.where[path[:i]]
        return self.source

    def fail(self, path: tuple[str, ...], msg: str) -> None:
        self.problems.append(f"{self.at(path)}: {'.'.join(path) or '(top level)'}: {msg}")

    def convert(self, tp: Any, value: Any, path: tuple[str, ...]) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return value
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1:
                return self.convert(inner[0], value, path)
            for a in inner:  # first member that accepts the value without a problem
                trial = _Builder(self.where, self.source)
                out = trial.convert(a, value, path)
                if not trial.problems:
                    return out
            return self._bad(tp, value, path)
        if origin is Literal:
            if value in args:
                return value
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.fail(path, f"{value!r} is not {_type_name(tp)}{hint}")
            return None
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                return self._bad(tp, value, path)
            return self.build(tp, value, path)
        if origin in (list, tuple):
            if not isinstance(value, list):
                return self._bad(tp, value, path)
            return tuple(self.convert(args[0], v, path + (str(i),)) for i, v in enumerate(value))
        if origin is dict:
            if not isinstance(value, dict):
                return self._bad(tp, value, path)
            # an entry set to null is left out: how an extending recipe drops an inherited one (e.g. an RL run)
            return {
                str(k): self.convert(args[1], v, path + (str(k),))
                for k, v in value.items()
                if v is not None or _allows_none(args[1])
            }
        if tp is bool:
            return value if isinstance(value, bool) else self._bad(tp, value, path)
        if tp is int:
            return (
                value
                if isinstance(value, int) and not isinstance(value, bool)
                else self._bad(tp, value, path)
            )
        if tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
                try:
                    return float(value)
                except ValueError:
                    pass
            return self._bad(tp, value, path)
        if tp is str:
            return value if isinstance(value, str) else self._bad(tp, value, path)
        raise TypeError(f"unsupported config type {tp!r} at {'.'.join(path)}")

    def _bad(self, tp: Any, value: Any, path: tuple[str, ...]) -> None:
        shown = "null" if value is None else f"{value!r} ({type(value).__name__})"
        self.fail(path, f"expected {_type_name(tp)}, got {shown}")
        return None

    def build(self, cls: type, raw: dict, path: tuple[str, ...] = ()) -> Any:
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        kwargs = {}
        for key, value in raw.items():
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(fields)}"
                self.fail(path + (str(key),), f"unknown key {key!r}; {hint}")
                continue
            kwargs[key] = self.convert(hints[key], value, path + (key,))
        for name, f in fields.items():
            if (
                name not in kwargs
                and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING
            ):
                self.problems.append(f"{self.at(path)}: {'.'.join(path + (name,))}: missing required key")
        if any(v is None and not _allows_none(hints[k]) for k, v in kwargs.items()):
            return None  # a problem was recorded for it
        try:
            obj = cls(**kwargs)
        except TypeError:
            return None
        for msg in obj.problems() if hasattr(obj, "problems") else []:
            self.problems.append(f"{self.at(path)}: {'.'.join(path) or '(top level)'}: {msg}")
        return obj


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def from_dict(cls: type, raw: dict, where: Where | None = None, source: str = "<recipe>") -> Any:
    """Build dataclass `cls` from a plain dict; every problem is collected into one ConfigError."""
    b = _Builder(where or {}, source)
    obj = b.build(cls, raw)
    if b.problems:
        raise ConfigError(b.problems)
    return obj


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, merge `extends`, apply `--set` overrides, validate. Raises ConfigError listing every problem."""
    raw, where = load_raw(path)
    here = f"{path}:"
    extends = any(not w.startswith(here) for w in where.values())  # some key came from a parent file
    own_name = where.get(("name",), "").startswith(here)
    if extends and not own_name and not any(o.startswith("name=") for o in overrides):
        raise ConfigError(
            [f"{path}: set 'name:' — a recipe that extends another would otherwise share its run folder"]
        )
    raw = apply_overrides(raw, where, list(overrides))
    return from_dict(Recipe, raw, where, str(path))


# ------------------------------------------------------------------------------------------------- helpers


def to_dict(obj: Any, for_hash: bool = False) -> Any:
    """Dataclass → plain JSON/YAML-ready structure (tuples become lists). `for_hash` leaves out the fields marked
    `posttrain.training.IF_SET` that hold their default."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: to_dict(getattr(obj, f.name), for_hash)
            for f in dataclasses.fields(obj)
            if not (for_hash and f.metadata.get("hash") == "if_set" and getattr(obj, f.name) == f.default)
        }
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, for_hash) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v, for_hash) for k, v in obj.items()}
    return obj


def config_hash(obj: Any) -> str:
    """Stable short hash of a config section (dataclass or plain data): same values → same hash."""
    blob = json.dumps(to_dict(obj, for_hash=True), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)
