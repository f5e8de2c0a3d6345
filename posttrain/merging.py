"""Weight averaging: pure tensor functions (the specification the `merge` stage and the EMA anchor of RL are tested
against, tests/test_merging.py), and a streaming merge of saved models.

Formulas (θ: weights of one tensor; θ_init: the shared initialisation, e.g. the SFT policy):

    linear     θ = Σ_m w_m θ_m / Σ_m w_m
    task vec   δ_m = θ_m − θ_init
    slerp      slerp(δ_0, δ_1; λ) = sin((1−λ)Ω)/sin Ω · δ_0 + sin(λΩ)/sin Ω · δ_1,   cos Ω = <δ_0, δ_1> / (|δ_0| |δ_1|)
               falls back to (1−λ) δ_0 + λ δ_1 when the vectors are (near-)parallel (sin Ω < 1e-6) or one is 0
    slerp (M)  iteratively: δ ← slerp(δ, δ_m; 1/(m+1)) for m = 1 … M−1 (equal weights, as in WARP)
    liti       θ = (1 − η) θ_init + η (θ_init + δ_merged)          (WARP's interpolation towards the init)
    ema        θ_avg ← (1 − μ) θ_avg + μ θ

Arithmetic is in float64 and the result is cast back to the inputs' dtype (so averaging identical models
returns them bit for bit). SLERP is applied per tensor (each parameter tensor is one vector), as mergekit and WARP's implementation do.

`merge_models` streams tensor by tensor from safetensors folders (sharded or not) and writes each result
straight to disk, so peak memory is a few tensors, not whole models. Before anything is read it checks that
configs, parameter names and shapes, and tokenizers agree, and names what differs. Tied embeddings stay tied
(the tied head is not stored, as in the inputs). The output folder is written under a temporary name; its
weight index is written last, then the folder is renamed into place.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from posttrain.config import MergeConfig
from posttrain.files import replace_folder

# ----------------------------------------------------------------------------------------- pure functions


def linear(tensors: list[torch.Tensor], weights: list[float] | None = None) -> torch.Tensor:
    """Weighted average; weights are normalised to sum to 1. Shapes: all equal, any."""
    weights = [1.0] * len(tensors) if weights is None else list(weights)
    if len(weights) != len(tensors) or sum(weights) <= 0:
        raise ValueError(f"need one positive-sum weight per tensor ({len(tensors)}), got {weights}")
    total = sum(weights)
    out = torch.zeros_like(tensors[0], dtype=torch.float64)  # float64, so that averaging copies is exact
    for t, w in zip(tensors, weights):
        out += (w / total) * t.double()
    return out


def slerp(d0: torch.Tensor, d1: torch.Tensor, lam: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation between two task vectors of any (equal) shape; lam=0 → d0, lam=1 → d1."""
    a, b = d0.float().flatten(), d1.float().flatten()
    na, nb = a.norm(), b.norm()
    if na < eps or nb < eps:
        return ((1 - lam) * a + lam * b).view_as(d0)
    cos = torch.clamp(a @ b / (na * nb), -1.0, 1.0)
    omega = torch.arccos(cos)
    s = torch.sin(omega)
    if s < eps:
        return ((1 - lam) * a + lam * b).view_as(d0)
    return ((torch.sin((1 - lam) * omega) / s) * a + (torch.sin(lam * omega) / s) * b).view_as(d0)


def slerp_many(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Equal-weight SLERP of M task vectors, iteratively: δ ← slerp(δ, δ_m; 1/(m+1))."""
    out = deltas[0].float()
    for m, d in enumerate(deltas[1:], start=1):
        out = slerp(out, d, 1.0 / (m + 1))
    return out


def liti(init: torch.Tensor, merged: torch.Tensor, eta: float) -> torch.Tensor:
    """(1 − η) θ_init + η θ_merged."""
    return (1 - eta) * init.float() + eta * merged.float()


def ema(avg: torch.Tensor, new: torch.Tensor, mu: float) -> torch.Tensor:
    """(1 − μ) θ_avg + μ θ_new."""
    return (1 - mu) * avg.float() + mu * new.float()


# ------------------------------------------------------------------------------------ reading safetensors


class MergeError(ValueError):
    """Models that cannot be merged; the message names what differs."""


class Weights:
    """The tensors of a saved model folder (one safetensors file or a sharded index), read one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            self.where = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif single.exists():
            with safe_open(single, "pt") as f:
                self.where = {k: single for k in f.keys()}
        else:
            raise MergeError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
        self.meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        for file in sorted(set(self.where.values())):
            with safe_open(file, "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    self.meta[k] = (sl.get_dtype(), tuple(sl.get_shape()))

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], "pt") as f:
            return f.get_tensor(name)


IGNORED_CONFIG_KEYS = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype"}


def check_compatible(folders: list[Path]) -> list[Weights]:
    """Configs, tokenizers, parameter names and shapes must agree; raise MergeError naming the difference."""
    configs = []
    for f in folders:
        try:
            configs.append(json.loads((f / "config.json").read_text()))
        except FileNotFoundError:
            raise MergeError(f"{f}: no config.json — is this a saved model folder?") from None
    ref = configs[0]
    for f, c in zip(folders[1:], configs[1:]):
        keys = sorted((set(ref) | set(c)) - IGNORED_CONFIG_KEYS)
        diff = [k for k in keys if ref.get(k) != c.get(k)]
        if diff:
            shown = ", ".join(f"{k}: {ref.get(k)!r} vs {c.get(k)!r}" for k in diff[:5])
            raise MergeError(f"configs differ between {folders[0]} and {f}: {shown}")
    toks = [_tokenizer_fingerprint(f) for f in folders]
    for f, t in zip(folders[1:], toks[1:]):
        if t != toks[0]:
            raise MergeError(f"tokenizers differ between {folders[0]} and {f} (tokenizer.json / vocabulary)")
    weights = [Weights(f) for f in folders]
    for w in weights[1:]:
        missing, extra = set(weights[0].meta) - set(w.meta), set(w.meta) - set(weights[0].meta)
        if missing or extra:
            raise MergeError(
                f"parameter names differ between {folders[0]} and {w.folder}: "
                f"only in the first: {sorted(missing)[:3]}, only in the second: {sorted(extra)[:3]}"
            )
        shapes = [k for k in w.meta if w.meta[k][1] != weights[0].meta[k][1]]
        if shapes:
            k = shapes[0]
            raise MergeError(
                f"shape of {k} differs: {weights[0].meta[k][1]} in {folders[0]}, {w.meta[k][1]} in {w.folder}"
            )
    return weights


def _tokenizer_fingerprint(folder: Path) -> str | None:
    p = folder / "tokenizer.json"
    if not p.exists():
        return None
    data = json.loads(p.read_text())
    return json.dumps({"model": data.get("model"), "added_tokens": data.get("added_tokens")}, sort_keys=True)


# ------------------------------------------------------------------------------------ streaming writing

_FROM_ST = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _nbytes(st_dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.tensor([], dtype=_FROM_ST[st_dtype]).element_size()


def write_streaming(path: Path, names: list[str], meta: dict, produce) -> None:
    """Write a safetensors file whose header is known in advance; `produce(name)` gives each tensor in turn,
    so only one tensor is held at a time."""
    header, offset = {}, 0
    for n in names:
        st_dtype, shape = meta[n]
        nbytes = _nbytes(st_dtype, shape)
        header[n] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for n in names:
            t = produce(n).to(_FROM_ST[meta[n][0]]).contiguous()
            if list(t.shape) != header[n]["shape"]:
                raise MergeError(f"{n}: produced shape {list(t.shape)}, expected {header[n]['shape']}")
            f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")  # no copy of the bytes


def plan_shards(names: list[str], meta: dict, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into shards of at most `max_shard_bytes` (a larger tensor is a shard alone)."""
    shards, cur, size = [], [], 0
    for n in names:
        nbytes = _nbytes(*meta[n])
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += nbytes
    shards.append(cur)
    return shards


def merge_models(
    models: list[str | Path],
    out: str | Path,
    method: str = "linear",
    weights: list[float] | None = None,
    base: str | Path | None = None,
    eta: float = MergeConfig().eta,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Merge saved models into `out` (a loadable model folder with provenance). Returns `out`."""
    folders = [Path(m) for m in models]
    if method not in ("linear", "slerp", "liti"):
        raise MergeError(f"method {method!r} is not one of linear, slerp, liti")
    if method in ("slerp", "liti") and base is None:
        raise MergeError(f"method {method} needs --base (the shared initialisation, e.g. the SFT model)")
    if method != "linear" and weights is not None:
        raise MergeError(f"{method} merges with equal weights (WARP); drop --weights or use linear")
    all_w = check_compatible(folders + ([Path(base)] if base else []))
    inputs, init = all_w[: len(folders)], (all_w[-1] if base else None)
    names = sorted(inputs[0].meta)

    def produce(name: str) -> torch.Tensor:
        ts = [w.get(name) for w in inputs]
        if method == "linear":
            return linear(ts, weights)
        t0 = init.get(name).float()
        deltas = [t.float() - t0 for t in ts]
        merged = t0 + slerp_many(deltas)
        return liti(t0, merged, eta) if method == "liti" else merged

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = plan_shards(names, inputs[0].meta, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = (
            "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        write_streaming(tmp / fname, shard, inputs[0].meta, produce)
        weight_map.update({n: fname for n in shard})
    for f in folders[0].iterdir():  # config, generation config, tokenizer files
        if f.is_file() and not f.name.startswith("model") and f.name != "provenance.json":
            shutil.copy2(f, tmp / f.name)
    provenance = {
        "method": method, "models": [str(f) for f in folders], "weights": weights, "base": str(base) if base else None,
        "eta": eta if method == "liti" else None,
    }  # fmt: skip
    (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    if len(shards) > 1:  # the index last: a folder with an index has every shard
        total = sum(_nbytes(*m) for m in inputs[0].meta.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    replace_folder(tmp, out)
    return out
