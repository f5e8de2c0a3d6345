"""Distillation divergences against hand-computed values, with soft-cap and temperature; identical models give 0;
agreement with TRL's own generalised JSD."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.distill import capped_log_probs, distill_loss

# student p_s = (0.5, 0.5), teacher p_t = (0.9, 0.1), as logits
S = torch.log(torch.tensor([[[0.5, 0.5]]]))
T = torch.log(torch.tensor([[[0.9, 0.1]]]))
M = torch.ones(1, 1)


def test_forward_kl_by_hand():
    # KL(t‖s) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.9·0.587787 − 0.1·1.609438 = 0.368064
    assert distill_loss(S, T, M, "forward_kl")[0].item() == pytest.approx(0.368064, abs=1e-5)


def test_reverse_kl_by_hand():
    # KL(s‖t) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) = −0.293893 + 0.804719 = 0.510826
    assert distill_loss(S, T, M, "reverse_kl")[0].item() == pytest.approx(0.510826, abs=1e-5)


def test_jsd_by_hand():
    # β = 0.5: m = (0.7, 0.3); KL(t‖m) = 0.9 ln(9/7) + 0.1 ln(1/3) = 0.226183 − 0.109861 = 0.116322
    # KL(s‖m) = 0.5 ln(5/7) + 0.5 ln(5/3) = −0.168236 + 0.255413 = 0.087177; JSD = (0.116322 + 0.087177) / 2
    assert distill_loss(S, T, M, "jsd", beta=0.5)[0].item() == pytest.approx(0.1017495, abs=1e-5)
    # β = 0.1: m = 0.1·p_t + 0.9·p_s = (0.54, 0.46)
    # KL(t‖m) = 0.9 ln(0.9/0.54) + 0.1 ln(0.1/0.46) = 0.459743 − 0.152606 = 0.307137
    # KL(s‖m) = 0.5 ln(0.5/0.54) + 0.5 ln(0.5/0.46) = −0.038481 + 0.041690 = 0.003209
    # JSD = 0.1·0.307137 + 0.9·0.003209 = 0.033602
    assert distill_loss(S, T, M, "jsd", beta=0.1)[0].item() == pytest.approx(0.033602, abs=1e-5)


def test_softcap_then_temperature_by_hand():
    # logits (60, 0), cap 30: 30·tanh(2) = 28.92083, then T = 10: softmax((2.892083, 0)) = (0.947454, 0.052546)
    lp = capped_log_probs(torch.tensor([60.0, 0.0]), softcap=30.0, temperature=10.0)
    assert lp.exp().tolist() == pytest.approx([0.947454, 0.052546], abs=1e-5)
    # without the cap the same temperature gives softmax((6, 0)) = (0.997527, 0.002473): the cap matters
    assert capped_log_probs(torch.tensor([60.0, 0.0]), None, 10.0).exp()[0].item() == pytest.approx(
        0.997527, abs=1e-5
    )


def test_identical_student_and_teacher_give_zero_and_mask_selects_positions():
    z = torch.randn(2, 5, 11)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        loss, stats = distill_loss(z, z.clone(), torch.ones(2, 5), kind, temperature=0.7, student_softcap=30.0,
                                   teacher_softcap=30.0)  # fmt: skip
        assert abs(loss.item()) < 1e-6 and stats["tokens"] == 10
    # positions outside the mask do not count: a different teacher there changes nothing
    t = z.clone()
    t[:, 3:] = torch.randn(2, 2, 11)
    mask = torch.zeros(2, 5)
    mask[:, :3] = 1
    assert abs(distill_loss(z, t, mask, "jsd")[0].item()) < 1e-6


def test_gradient_reaches_the_student_only_and_vocab_mismatch_is_an_error():
    s = torch.randn(1, 3, 7, requires_grad=True)
    t = torch.randn(1, 3, 7, requires_grad=True)
    distill_loss(s, t, torch.ones(1, 3), "reverse_kl")[0].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None
    with pytest.raises(ValueError, match="vocabularies differ"):
        distill_loss(torch.randn(1, 2, 7), torch.randn(1, 2, 8), torch.ones(1, 2))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_trls_generalized_jsd(beta):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    torch.manual_seed(0)
    hs, ht = torch.randn(2, 4, 8), torch.randn(2, 4, 6)
    ws, wt = torch.randn(13, 8), torch.randn(13, 6)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    ours = distill_loss(hs @ ws.T, ht @ wt.T, mask, "jsd", beta=beta, temperature=0.8, student_softcap=3.0,
                        teacher_softcap=3.0)[0]  # fmt: skip
    theirs = _chunked_divergence_loss(hs, ht, ws, wt, mask, beta, student_final_logit_softcapping=3.0,
                                      teacher_final_logit_softcapping=3.0, temperature=0.8)[0]  # fmt: skip
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4, abs=1e-5)
    assert math.isfinite(ours.item())


# ------------------------------------------------------------------ the stage's trainer on tiny models


def _distill_trainer(tok, tmp_path, teacher, on_policy_fraction=1.0, steps=2, lr=1e-3, until_below=0.0):
    import trl
    from datasets import Dataset

    from posttrain.chat import render
    from posttrain.config import ModelSpec
    from posttrain.engines.distillation import mixed_policy_trainer
    from posttrain.modeling import load_causal_lm

    student = load_causal_lm(ModelSpec(preset="tiny-student"), tok, seed=0)
    teacher = teacher(student)
    qs = ["What is 2 + 3?", "Reverse the word cat.", "Who are you?", "Sort the letters b, a."]
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    table = {
        str(i): {"prompt_ids": render([{"role": "user", "content": q}], tok, add_generation_prompt=True).input_ids,
                 "fixed_ids": tok.encode("fixed answer", add_special_tokens=False) + [end]}
        for i, q in enumerate(qs)
    }  # fmt: skip
    args = trl.DistillationConfig(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=lr, beta=0.0,
        max_completion_length=8, use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no",
        gradient_checkpointing=False, seed=0,
    )  # fmt: skip
    trainer = mixed_policy_trainer(trl.DistillationTrainer)(
        model=student, teacher_model=teacher, args=args, processing_class=tok,
        train_dataset=Dataset.from_dict({"prompt": list(table) * 2}),
    )  # fmt: skip
    trainer.setup(table, on_policy_fraction, 0, until_below)
    return trainer, table


@pytest.mark.stage
def test_a_few_real_steps_change_the_student_and_the_teacher_stays(tiny_tokenizer, tmp_path):
    from posttrain.config import ModelSpec
    from posttrain.modeling import load_causal_lm

    trainer, _ = _distill_trainer(
        tiny_tokenizer,
        tmp_path,
        lambda s: load_causal_lm(ModelSpec(preset="tiny-teacher"), tiny_tokenizer, seed=1),
    )
    s0 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    t0 = {k: v.clone() for k, v in trainer.teacher_model.state_dict().items()}
    trainer.train()
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, s0[k])]
    assert len(changed) > len(s0) // 2
    assert all(torch.equal(v, t0[k]) for k, v in trainer.teacher_model.state_dict().items())
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(x > 0 and math.isfinite(x) for x in losses)


@pytest.mark.stage
def test_a_teacher_identical_to_the_student_gives_divergence_zero(tiny_tokenizer, tmp_path):
    import copy

    trainer, _ = _distill_trainer(
        tiny_tokenizer, tmp_path, lambda s: copy.deepcopy(s).eval(), steps=1, lr=0.0
    )
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(abs(x) < 1e-6 for x in losses)


@pytest.mark.stage
def test_off_policy_batches_use_the_teachers_fixed_responses(tiny_tokenizer, tmp_path):
    import copy

    trainer, table = _distill_trainer(
        tiny_tokenizer, tmp_path, lambda s: copy.deepcopy(s), on_policy_fraction=0.0
    )
    prompts = [v["prompt_ids"] for v in table.values()]
    assert trainer._generate_single_turn(prompts, None, {}) == [v["fixed_ids"] for v in table.values()]
    trainer._fraction = 1.0  # on-policy: the student samples (not the fixed answer)
    assert trainer._generate_single_turn(prompts, None, {}) != [v["fixed_ids"] for v in table.values()]
    ids, _, _ = trainer._tokenize_prompts(list(table))
    assert ids == prompts and all(p.count(tiny_tokenizer.bos_token_id) == 1 and p[0] == tiny_tokenizer.bos_token_id
                                  for p in ids)  # fmt: skip


def test_until_unlikely_keeps_each_completion_through_its_first_unlikely_token():
    from posttrain.engines.distillation import until_unlikely

    logps = torch.tensor([[0.9, 0.05, 0.9, 0.01], [0.9, 0.9, 0.9, 0.01], [0.01, 0.9, 0.9, 0.9]]).log()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])  # the second row's last token is padding
    assert until_unlikely(logps, mask, 0.1).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert until_unlikely(logps, mask, 0.001).tolist() == [[1] * 4] * 3


@pytest.mark.stage
def test_completion_token_logps_are_the_models_own(tiny_tokenizer):
    """Read through the backbone and the tiled, soft-capped projection: the log-probabilities of the model's own
    logits (Gemma 2 caps them in its forward), with a left-padded prompt as TRL's batches have."""
    from posttrain.config import ModelSpec
    from posttrain.engines.distillation import completion_token_logps
    from posttrain.modeling import load_causal_lm

    model = load_causal_lm(ModelSpec(preset="tiny-teacher"), tiny_tokenizer, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prompt, completion = torch.randint(5, 90, (2, 6), generator=g), torch.randint(5, 90, (2, 4), generator=g)
    prompt_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ids, mask = torch.cat([prompt, completion], 1), torch.cat([prompt_mask, torch.ones_like(completion)], 1)
    with torch.no_grad():
        ours = completion_token_logps(model, ids, mask, completion)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, -5:-1].float()
    theirs = logits.log_softmax(-1).gather(-1, completion[..., None])[..., 0]
    assert ours.shape == (2, 4) and torch.allclose(ours, theirs, atol=1e-4)


@pytest.mark.stage
def test_training_until_the_teachers_first_unlikely_token_trains_fewer_tokens(tiny_tokenizer, tmp_path):
    """`distill.train_until_teacher_below`: a teacher of other weights finds the student's samples unlikely
    early, so only part of each sampled response is trained (the share is logged), and the steps still train."""
    from posttrain.config import ModelSpec
    from posttrain.modeling import load_causal_lm

    trainer, _ = _distill_trainer(
        tiny_tokenizer, tmp_path, lambda s: load_causal_lm(ModelSpec(preset="tiny-teacher"), tiny_tokenizer, seed=1),
        until_below=0.05,
    )  # fmt: skip
    trainer.train()
    shares = [r["trained_token_share"] for r in trainer.state.log_history if "trained_token_share" in r]
    assert shares and all(0.0 < x < 1.0 for x in shares)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert losses and all(x > 0 and math.isfinite(x) for x in losses)


@pytest.mark.stage
def test_the_cut_responses_loss_is_the_divergence_over_the_kept_tokens_alone(tiny_tokenizer, tmp_path):
    """With the cut, TRL's loss on a generated batch is `posttrain.distill`'s forward KL averaged over each response's
    tokens through its first unlikely one, and nothing after it counts."""
    from posttrain.config import ModelSpec
    from posttrain.distill import distill_loss
    from posttrain.engines.distillation import completion_token_logps, until_unlikely
    from posttrain.modeling import load_causal_lm

    trainer, _ = _distill_trainer(
        tiny_tokenizer, tmp_path, lambda s: load_causal_lm(ModelSpec(preset="tiny-teacher"), tiny_tokenizer, seed=1),
        until_below=0.02,
    )  # fmt: skip
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    c = inputs["completion_ids"].shape[1]
    with torch.no_grad():
        teacher_logps = completion_token_logps(trainer.teacher_model, ids, mask, inputs["completion_ids"])
        keep = until_unlikely(teacher_logps, inputs["completion_mask"], 0.02)
        kept = inputs["completion_mask"] * keep
        assert torch.equal(inputs["tool_mask"], keep) and 0 < kept.sum() < inputs["completion_mask"].sum()
        loss = trainer.compute_loss(trainer.model, inputs)
        logits = [m(input_ids=ids, attention_mask=mask).logits[:, -c - 1 : -1] for m in (trainer.model,
                                                                                         trainer.teacher_model)]  # fmt: skip
    want, _ = distill_loss(*logits, kept, "forward_kl")  # Gemma 2's forward caps its logits: no second cap
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert trainer._metrics["train"]["trained_token_share"][-1] == pytest.approx(
        (kept.sum() / inputs["completion_mask"].sum()).item()
    )


def test_different_vocabularies_are_refused_naming_the_difference(tiny_tokenizer):
    from posttrain.config import ConfigError
    from posttrain.engines.distillation import check_same_vocabulary

    class Other:
        def get_vocab(self):
            v = dict(tiny_tokenizer.get_vocab())
            v["<extra>"] = len(v)
            return v

    check_same_vocabulary(tiny_tokenizer, tiny_tokenizer, "s", "t")
    with pytest.raises(ConfigError, match=r"only in the teacher \['<extra>'\]"):
        check_same_vocabulary(tiny_tokenizer, Other(), "s", "t")
