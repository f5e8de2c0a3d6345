"""Tiny presets build and train; the attention and precision guards; tied embeddings survive save → load."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import ModelSpec
from posttrain.modeling import (
    PRESETS,
    ModelError,
    check_tied,
    load_causal_lm,
    load_reward_model,
    preset_config,
    resolve_attention,
    resolve_dtype,
    save_model,
)


@pytest.mark.parametrize("preset", ["tiny-student", "tiny-teacher"])
def test_presets_forward_backward(preset, tiny_tokenizer):
    model = load_causal_lm(ModelSpec(preset=preset), tiny_tokenizer)
    assert model.config._attn_implementation == "eager" and model.dtype == torch.float32
    assert model.config.head_dim == PRESETS[preset]["head_dim"] == model.config.query_pre_attn_scalar
    ids = torch.randint(6, len(tiny_tokenizer), (2, 24))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.generation_config.eos_token_id == [1, tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")]


def test_teacher_larger_than_student(tiny_tokenizer):
    n = {
        p: sum(x.numel() for x in load_causal_lm(ModelSpec(preset=p), tiny_tokenizer).parameters())
        for p in PRESETS
    }
    assert n["tiny-teacher"] > 3 * n["tiny-student"]


def test_attention_guard(tiny_tokenizer):
    cfg = preset_config("tiny-student", tiny_tokenizer)
    assert resolve_attention(cfg, "auto") == "eager"
    with pytest.raises(ModelError, match="sdpa.*soft-capping"):
        resolve_attention(cfg, "sdpa")
    with pytest.raises(ModelError, match="flash-attn >= 2.6"):
        resolve_attention(cfg, "flash_attention_2")  # not installed on CPU machines
    cfg.attn_logit_softcapping = None
    with pytest.raises(ModelError, match="attn_logit_softcapping set to null"):
        resolve_attention(cfg, "auto")


def test_dtype_policy():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(ModelError, match="fp16 is not supported for Gemma"):
        resolve_dtype("fp16", "cpu")


def test_save_load_keeps_tied_embeddings(tiny_tokenizer, tmp_path):
    model = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=3)
    with torch.no_grad():
        model.get_input_embeddings().weight[7] += 1.0  # a change made through the embedding shows in the head
    save_model(model, tiny_tokenizer, tmp_path / "m")
    loaded = load_causal_lm(ModelSpec(name_or_path=str(tmp_path / "m")), tiny_tokenizer)
    assert torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    ids = torch.randint(6, 100, (1, 10))
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    loaded.lm_head.weight = torch.nn.Parameter(loaded.lm_head.weight.detach().clone() + 1)
    with pytest.raises(ModelError, match="differ"):
        check_tied(loaded)


def test_reward_model_one_output_pad_set(tiny_tokenizer, tmp_path):
    rm = load_reward_model(ModelSpec(preset="tiny-rm"), tiny_tokenizer)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tiny_tokenizer.pad_token_id
    ids = torch.randint(6, 100, (3, 12))
    assert rm(input_ids=ids).logits.shape == (3, 1)
    # from a causal LM checkpoint only the head is new: the backbone weights are the LM's
    lm = load_causal_lm(ModelSpec(preset="tiny-rm"), tiny_tokenizer, seed=5)
    save_model(lm, tiny_tokenizer, tmp_path / "lm")
    rm2 = load_reward_model(ModelSpec(name_or_path=str(tmp_path / "lm")), tiny_tokenizer)
    lm_sd, rm_sd = lm.model.state_dict(), rm2.model.state_dict()
    assert lm_sd.keys() == rm_sd.keys() and all(torch.equal(lm_sd[k], rm_sd[k]) for k in lm_sd)


def test_inference_window_masks_and_cache_agree(tiny_tokenizer):
    from posttrain.modeling import set_inference_window

    model = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer).eval()
    torch.manual_seed(0)
    ids = torch.randint(6, len(tiny_tokenizer), (1, 30))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        assert set_inference_window(model, 8) == 64
        windowed = model(input_ids=ids).logits
        # positions 0..7 see at most 8 tokens either way; later ones lose what lies beyond the window
        assert torch.allclose(full[:, :8], windowed[:, :8], atol=1e-6)
        assert not torch.allclose(full[:, 8:], windowed[:, 8:], atol=1e-3)
        # greedy generation with the KV cache equals recomputing the whole sequence at every step
        gen = model.generate(input_ids=ids[:, :12], max_new_tokens=20, do_sample=False)[0, 12:]
        seq = ids[:, :12]
        for _ in range(len(gen)):
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    assert seq[0, 12:].tolist() == gen.tolist()


def test_inference_window_needs_sliding_layers(tiny_tokenizer):
    from posttrain.modeling import set_inference_window

    model = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer)
    model.config.sliding_window = None
    with pytest.raises(ModelError, match="eval.sliding_window"):
        set_inference_window(model, 8)
