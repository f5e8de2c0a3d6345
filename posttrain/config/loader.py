"""Recipes: YAML → frozen, nested dataclasses (`posttrain.config.sections`), and their hashes."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from posttrain.config.recipe import Recipe


class ConfigError(ValueError):
    """A recipe is wrong. The message has one line per problem: where, what is wrong, what to do."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        head = "recipe error" if len(problems) == 1 else f"{len(problems)} recipe errors"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


# ----------------------------------------------------------------------------------------------- sections


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
            return self._union(tp, args, value, path)
        if origin is Literal:
            if value in args:
                return value
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.fail(path, f"{value!r} is not {_type_name(tp)}{hint}")
            return None
        if dataclasses.is_dataclass(tp):
            return self.build(tp, value, path) if isinstance(value, dict) else self._bad(tp, value, path)
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
        if tp in (bool, int, float, str):
            return self._scalar(tp, value, path)
        raise TypeError(f"unsupported config type {tp!r} at {'.'.join(path)}")

    def _union(self, tp: Any, args: tuple, value: Any, path: tuple[str, ...]) -> Any:
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

    def _scalar(self, tp: type, value: Any, path: tuple[str, ...]) -> Any:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if tp is bool and isinstance(value, bool) or tp is str and isinstance(value, str):
            return value
        if tp is int and number and isinstance(value, int):
            return value
        if tp is float and number:
            return float(value)
        if tp is float and isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        return self._bad(tp, value, path)

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
    return load_recipe_located(path, overrides)[0]


def load_recipe_located(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[Recipe, Where]:
    """`load_recipe`, and where each key was set (`file:line`, or the `--set` item), for later checks that name
    the key they are about (the preflight)."""
    raw, where = load_raw(path)
    here = f"{path}:"
    extends = any(not w.startswith(here) for w in where.values())  # some key came from a parent file
    own_name = where.get(("name",), "").startswith(here)
    if extends and not own_name and not any(o.startswith("name=") for o in overrides):
        raise ConfigError(
            [f"{path}: set 'name:' — a recipe that extends another would otherwise share its run folder"]
        )
    raw = apply_overrides(raw, where, list(overrides))
    return from_dict(Recipe, raw, where, str(path)), where


def where_of(where: Where, key: str, default: str) -> str:
    """Where key `a.b.c` (or the nearest section above it) was set; `default` (the recipe file) when nowhere."""
    path = tuple(key.split("."))
    for i in range(len(path), 0, -1):
        if path[:i] in where:
            return where[path[:i]]
    return default


# ------------------------------------------------------------------------------------------------- helpers


def to_dict(obj: Any, for_hash: bool = False) -> Any:
    """Dataclass → plain JSON/YAML-ready structure (tuples become lists). `for_hash` leaves out the fields marked
    `posttrain.config.IF_SET` that hold their default."""
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
