"""Merge formulas against hand-computed examples; the streaming merge of saved tiny models."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from posttrain.config import ModelSpec
from posttrain.merging import MergeError, ema, linear, liti, merge_models, slerp, slerp_many
from posttrain.modeling import load_causal_lm, save_model


def test_linear_by_hand():
    a, b = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])
    # weights 1:3 → 0.25 a + 0.75 b = [[4, 5], [6, 7]]
    assert torch.equal(linear([a, b], [1, 3]), torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(linear([a, b]), torch.tensor([[3.0, 4.0], [5.0, 6.0]]))


def test_slerp_by_hand():
    d0, d1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    # orthogonal unit vectors: Ω = π/2, λ = 1/2 → sin(π/4)/1 · (d0 + d1) = (√2/2, √2/2)
    h = math.sqrt(2) / 2
    assert torch.allclose(slerp(d0, d1, 0.5), torch.tensor([[h, h], [0.0, 0.0]]))
    assert torch.allclose(slerp(d0, d1, 0.0), d0) and torch.allclose(slerp(d0, d1, 1.0), d1)
    # parallel vectors fall back to linear interpolation: (1, 0) and (3, 0) at λ = 1/2 → (2, 0)
    p0, p1 = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])
    assert torch.allclose(slerp(p0, p1, 0.5), torch.tensor([2.0, 0.0]))
    assert torch.allclose(slerp(torch.zeros(2), p1, 0.25), torch.tensor([0.75, 0.0]))
    # three orthogonal unit vectors, equal weights: the norm stays 1 (a point on the sphere)
    e = torch.eye(3)
    assert torch.allclose(slerp_many([e[0], e[1], e[2]]).norm(), torch.tensor(1.0), atol=1e-6)


def test_liti_and_ema_by_hand():
    init, merged = torch.tensor([[0.0, 2.0], [4.0, 6.0]]), torch.tensor([[2.0, 2.0], [0.0, 10.0]])
    # η = 0.25: 0.75 init + 0.25 merged = [[0.5, 2], [3, 7]]
    assert torch.equal(liti(init, merged, 0.25), torch.tensor([[0.5, 2.0], [3.0, 7.0]]))
    # μ = 0.1: 0.9 avg + 0.1 new
    assert torch.allclose(
        ema(torch.tensor([10.0, 0.0]), torch.tensor([0.0, 10.0]), 0.1), torch.tensor([9.0, 1.0])
    )


@pytest.fixture(scope="module")
def saved(tiny_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("init", 0), ("a", 1), ("b", 2)):
        m = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=seed)
        out[name] = save_model(m, tiny_tokenizer, root / name)
    return out


def _state(folder, tokenizer):
    return load_causal_lm(ModelSpec(name_or_path=str(folder)), tokenizer).state_dict()


def test_averaging_identical_models_is_bitwise(saved, tiny_tokenizer, tmp_path):
    out = merge_models([saved["a"], saved["a"], saved["a"]], tmp_path / "m", "linear")
    ref, got = _state(saved["a"], tiny_tokenizer), _state(out, tiny_tokenizer)
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_merged_model_matches_formula_keeps_ties_loads_and_generates(saved, tiny_tokenizer, tmp_path):
    out = merge_models([saved["a"], saved["b"]], tmp_path / "m", "linear", weights=[1, 3])
    a, b = _state(saved["a"], tiny_tokenizer), _state(saved["b"], tiny_tokenizer)
    model = load_causal_lm(ModelSpec(name_or_path=str(out)), tiny_tokenizer)
    got = model.state_dict()
    assert all(torch.allclose(got[k], 0.25 * a[k] + 0.75 * b[k], atol=1e-6) for k in a)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert json.loads((out / "provenance.json").read_text())["weights"] == [1, 3]
    ids = torch.tensor([[tiny_tokenizer.bos_token_id, 4]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > 2


def test_liti_eta_zero_is_init_and_slerp_endpoints(saved, tiny_tokenizer, tmp_path):
    out = merge_models([saved["a"], saved["b"]], tmp_path / "l0", "liti", base=saved["init"], eta=0.0)
    init, got = _state(saved["init"], tiny_tokenizer), _state(out, tiny_tokenizer)
    assert all(torch.allclose(init[k], got[k], atol=1e-6) for k in init)
    one = merge_models([saved["a"]], tmp_path / "s1", "slerp", base=saved["init"])
    a, got = _state(saved["a"], tiny_tokenizer), _state(one, tiny_tokenizer)
    assert all(torch.allclose(a[k], got[k], atol=1e-5) for k in a)


def test_sharded_output_loads(saved, tiny_tokenizer, tmp_path):
    out = merge_models([saved["a"], saved["b"]], tmp_path / "sh", "linear", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    a, b, got = (_state(p, tiny_tokenizer) for p in (saved["a"], saved["b"], out))
    assert all(torch.allclose(got[k], 0.5 * (a[k] + b[k]), atol=1e-6) for k in a)
    again = merge_models([out, out], tmp_path / "sh2", "linear")  # sharded inputs too
    assert all(torch.equal(got[k], v) for k, v in _state(again, tiny_tokenizer).items())


def test_mismatches_are_named(saved, tiny_tokenizer, tmp_path):
    teacher = save_model(
        load_causal_lm(ModelSpec(preset="tiny-teacher"), tiny_tokenizer), tiny_tokenizer, tmp_path / "t"
    )
    with pytest.raises(MergeError, match="configs differ .*hidden_size: 64 vs 128"):
        merge_models([saved["a"], teacher], tmp_path / "x")
    with pytest.raises(MergeError, match="needs --base"):
        merge_models([saved["a"], saved["b"]], tmp_path / "x", "slerp")
    with pytest.raises(MergeError, match="no config.json"):
        merge_models([saved["a"], tmp_path], tmp_path / "x")
    other = tmp_path / "othertok"
    subprocess.run(["cp", "-r", str(saved["b"]), str(other)], check=True)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["~"], tok["model"]["vocab"]["}"] = (
        tok["model"]["vocab"]["}"],
        tok["model"]["vocab"]["~"],
    )
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(MergeError, match="tokenizers differ"):
        merge_models([saved["a"], other], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_merge_cli(saved, tmp_path):
    cmd = [sys.executable, "-m", "posttrain", "merge", "--method", "liti", "--models", str(saved["a"]), str(saved["b"]),
           "--base", str(saved["init"]), "--eta", "0.5", "--out", str(tmp_path / "w")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "w" / "provenance.json").read_text())["eta"] == 0.5


@pytest.mark.stage
def test_merge_peak_memory_is_a_few_tensors_not_the_models(tmp_path):
    """Three 192 MB models of 16 MB tensors, merged (liti) in a fresh process: the peak memory growth stays within a
    few tensors (loading the models would take 3 × 192 MB)."""
    from posttrain.bench import merge_memory

    m = merge_memory(tmp_path, n_models=3, n_tensors=12, side=2048)
    assert m["peak_growth"] < 4 * m["tensor_bytes"], m
