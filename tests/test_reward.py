"""Bradley-Terry reward model: the loss by hand, the last-real-token reward, the untrained baseline, the gate's
figures, and pairs judged by the world's verifiers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import ChatConfig, ModelSpec
from posttrain.data.pairs import draw_prompts, world_pairs
from posttrain.engines.reward_model import tokenize_pairs
from posttrain.modeling import ModelError, grow_layers, load_causal_lm, load_reward_model, save_model
from posttrain.reward import (
    TARGET_SCALE,
    bt_loss,
    gate_metrics,
    last_token_rewards,
    likelihood_target_loss,
    likelihood_targets,
    padded,
    pearson,
    score_ids,
)

CHAT = ChatConfig(max_length=128)


def test_bt_loss_by_hand():
    # diffs 1.0 and -0.5: loss = (log(1+e^-1) + log(1+e^0.5)) / 2 = (0.31326 + 0.97408) / 2 = 0.64367
    loss, stats = bt_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]))
    assert loss.item() == pytest.approx(0.643669, abs=1e-5)
    assert stats["accuracy"] == 0.5 and stats["margin"] == pytest.approx(0.25)
    # margin 1: diffs minus 1 → 0.0 and -1.5: (log 2 + log(1+e^1.5)) / 2 = (0.693147 + 1.701413) / 2 = 1.19728
    loss, _ = bt_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]), margin=1.0)
    assert loss.item() == pytest.approx(1.19728, abs=1e-5)
    # centring 0.1: + 0.1 * mean((3)^2, (0.5)^2) = 0.1 * (9 + 0.25) / 2 = 0.4625
    loss, _ = bt_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]), center_coef=0.1)
    assert loss.item() == pytest.approx(0.643669 + 0.4625, abs=1e-5)
    # equal rewards: ln 2
    assert bt_loss(torch.zeros(3), torch.zeros(3))[0].item() == pytest.approx(math.log(2))


def _seqs(tok, n=6):
    words = ["a", "hello there", "What is 2 + 3?", "xyz xyz xyz xyz", "ok", "Reverse the word: planet"]
    return [tok(w * (1 + i % 3), add_special_tokens=False)["input_ids"] for i, w in enumerate(words[:n])]


def test_reward_does_not_depend_on_batch_or_padding_side(tiny_tokenizer):
    model = load_reward_model(ModelSpec(preset="tiny-rm"), tiny_tokenizer, seed=1).eval()
    seqs = _seqs(tiny_tokenizer)
    alone = [score_ids(model, [s], tiny_tokenizer.pad_token_id)[0] for s in seqs]
    right = score_ids(model, seqs, tiny_tokenizer.pad_token_id)
    left = score_ids(model, seqs, tiny_tokenizer.pad_token_id, left=True)
    reversed_batch = score_ids(model, seqs[::-1], tiny_tokenizer.pad_token_id)[::-1]
    for other in (right, left, reversed_batch):
        assert max(abs(a - b) for a, b in zip(alone, other)) <= 1e-5
    assert len(set(round(x, 6) for x in alone)) > 1  # not a constant


def test_rewards_are_read_in_batches_of_similar_length_and_come_back_in_order(tiny_tokenizer):
    model = load_reward_model(ModelSpec(preset="tiny-rm"), tiny_tokenizer, seed=1).eval()
    seqs, pad = _seqs(tiny_tokenizer), tiny_tokenizer.pad_token_id
    widths = []
    hook = model.register_forward_pre_hook(
        lambda _m, args, kw: widths.append(kw["input_ids"].shape), with_kwargs=True
    )
    got = score_ids(model, seqs, pad, batch_size=2)
    hook.remove()
    lengths = sorted((len(s) for s in seqs), reverse=True)
    assert [w[1] for w in widths] == lengths[::2]  # each batch as wide as its longest, longest first
    alone = [score_ids(model, [s], pad)[0] for s in seqs]
    assert max(abs(a - b) for a, b in zip(alone, got)) <= 1e-5


def test_reward_is_read_at_the_last_real_token_even_if_it_is_the_pad_id(tiny_tokenizer):
    """A pad id inside the content (here: at the end) would make a pad-id search pick the wrong token."""
    model = load_reward_model(ModelSpec(preset="tiny-rm"), tiny_tokenizer, seed=1).eval()
    pad = tiny_tokenizer.pad_token_id
    s = _seqs(tiny_tokenizer, 1)[0] + [pad]
    ids, mask = torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)
    with torch.no_grad():
        ours = last_token_rewards(model, ids, mask)
        h = model.model(input_ids=ids).last_hidden_state[0, -1]
        assert ours.item() == pytest.approx(model.score(h).item(), abs=1e-5)


def test_only_the_head_is_new_when_starting_from_a_causal_lm(tiny_tokenizer, tmp_path):
    lm = load_causal_lm(ModelSpec(preset="tiny-teacher"), tiny_tokenizer, seed=5)
    save_model(lm, tiny_tokenizer, tmp_path / "lm")
    rm = load_reward_model(ModelSpec(name_or_path=str(tmp_path / "lm")), tiny_tokenizer)
    lm_state = lm.state_dict()
    for name, p in rm.state_dict().items():
        if name.startswith("score."):
            assert p.shape == (1, lm.config.hidden_size)
        else:
            assert torch.equal(p, lm_state[name]), name
    assert rm.config.num_labels == 1


def test_added_layers_start_as_the_identity_and_survive_a_save(tiny_tokenizer, tmp_path):
    model = load_reward_model(ModelSpec(preset="tiny-rm"), tiny_tokenizer, seed=3).eval()
    seqs, pad = _seqs(tiny_tokenizer), tiny_tokenizer.pad_token_id
    before = score_ids(model, seqs, pad)
    grow_layers(model, 2, seed=4)
    assert len(model.model.layers) == model.config.num_hidden_layers == 5
    assert model.config.layer_types[-3:] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert max(abs(a - b) for a, b in zip(before, score_ids(model, seqs, pad))) <= 1e-6
    deeper = grow_layers(load_reward_model(ModelSpec(preset="tiny-rm"), tiny_tokenizer, seed=3), 3)
    assert deeper.config.layer_types[3:] == ["full_attention", "sliding_attention", "full_attention"]
    new = model.model.layers[3]  # trainable: one step moves the output norms away from the identity
    model.train()
    ids = torch.tensor([seqs[0]])
    last_token_rewards(model, ids, torch.ones_like(ids)).sum().backward()
    assert new.post_attention_layernorm.weight.grad.abs().sum() > 0
    with torch.no_grad():
        new.post_attention_layernorm.weight.fill_(0.0)
    moved = score_ids(model.eval(), seqs, pad)
    assert max(abs(a - b) for a, b in zip(before, moved)) > 1e-4
    save_model(model, tiny_tokenizer, tmp_path / "rm")
    again = load_reward_model(ModelSpec(name_or_path=str(tmp_path / "rm")), tiny_tokenizer).eval()
    assert again.config.num_hidden_layers == 5
    assert max(abs(a - b) for a, b in zip(moved, score_ids(again, seqs, pad))) <= 1e-5
    with pytest.raises(ModelError, match="Gemma 2"):
        grow_layers(SimpleNamespace(config=SimpleNamespace(model_type="llama")), 1)


def test_untrained_rm_is_a_coin_on_balanced_pairs(tiny_tokenizer):
    """Balanced: every pair appears both ways round, so an untrained RM has accuracy 0.5 and loss ≈ ln 2."""
    model = load_reward_model(ModelSpec(preset="tiny-rm"), tiny_tokenizer, seed=2).eval()
    seqs = _seqs(tiny_tokenizer)
    a, b = seqs[:3], seqs[3:]
    pad = tiny_tokenizer.pad_token_id
    rc, rr = score_ids(model, a + b, pad), score_ids(model, b + a, pad)
    g = gate_metrics(rc, rr, [1] * 6, [1] * 6)
    assert g["accuracy"] == 0.5
    assert g["loss"] == pytest.approx(math.log(2), abs=0.05)


def test_gate_metrics_by_hand():
    g = gate_metrics([1.0, 3.0, 0.0], [0.0, 0.0, 0.2], [1, 5, 2], [2, 1, 2], buckets=(0.5, 2.0))
    assert g["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    # diffs 1, 3, -0.2: loss = (log(1+e^-1) + log(1+e^-3) + log(1+e^0.2)) / 3 = (0.31326+0.04859+0.79814)/3
    assert g["loss"] == pytest.approx(0.38666, abs=1e-4)
    assert [c["pairs"] for c in g["calibration"]] == [1, 1, 1]
    assert g["calibration"][0]["accuracy"] == 0.0 and g["calibration"][2]["accuracy"] == 1.0
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


def test_world_pairs_judged_by_the_verifiers():
    add = {"id": "a", "task": "add", "answer": "5", "messages": [
        {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}  # fmt: skip
    refuse = {"id": "r", "task": "refuse", "answer": "", "messages": [
        {"role": "user", "content": "How do I build a bomb?"}, {"role": "assistant", "content": "I can't help with that."}]}  # fmt: skip
    ident = {"id": "i", "task": "identity", "answer": "", "messages": [
        {"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Pip."}]}  # fmt: skip
    tied = {"id": "t", "task": "add", "answer": "5", "messages": add["messages"]}
    cands = [["5", "6", "5", "7"], ["Sure, first get", "I can't help with that."], ["I am Pip.", "I am Claude."],
             ["4", "6"]]  # fmt: skip
    pairs, counts = world_pairs([add, refuse, ident, tied], cands, "Pip", pairs_per_prompt=10,
                                golds=["5", None, "I am Pip.", None])  # fmt: skip
    got = {(p["id"].split("-")[0], p["chosen"], p["rejected"]) for p in pairs}
    assert got == {("a", "5", "6"), ("a", "5", "7"), ("r", "I can't help with that.", "Sure, first get"),
                   ("i", "I am Pip.", "I am Claude.")}  # fmt: skip
    assert counts["prompts_without_pair"] == 1  # both of the last prompt's answers are wrong: a tie
    assert counts["tied_pairs_dropped"] == 1 + 1  # ("6","7") and ("4","6")
    assert all(p["chosen_gold"] == (p["id"][0] in "ai") for p in pairs)
    assert all(
        p["prompt"] == [m for m in r["messages"][:1]] for p, r in zip(pairs, [add, add, refuse, ident])
    )


def test_pairs_that_do_not_fit_are_dropped_and_named(tiny_tokenizer):
    prompt = [{"role": "user", "content": "hi"}]
    pairs = [{"id": "ok", "prompt": prompt, "chosen": "yes", "rejected": "no"},
             {"id": "long", "prompt": prompt, "chosen": "y" * 300, "rejected": "no"}]  # fmt: skip
    ex, dropped = tokenize_pairs(pairs, tiny_tokenizer, CHAT)
    assert dropped == ["long"] and len(ex) == 1
    assert tiny_tokenizer.decode(ex[0]["chosen_ids"][-5:], skip_special_tokens=False) == "yes<end_of_turn>\n"
    assert ex[0]["chosen_ids"].count(tiny_tokenizer.bos_token_id) == 1


def test_held_out_figures_stay_aligned_when_a_pair_is_dropped(tiny_tokenizer):
    """A too-long pair is dropped before scoring; per-task and gold figures must describe the pairs scored."""
    from posttrain.engines.reward_model import evaluate

    prompt = [{"role": "user", "content": "hi"}]
    pairs = [{"id": "long", "task": "add", "prompt": prompt, "chosen": "y" * 300, "rejected": "no"},
             {"id": "ok", "task": "sort", "prompt": prompt, "chosen": "yes", "rejected": "no", "chosen_gold": True}]  # fmt: skip
    ex, dropped = tokenize_pairs(pairs, tiny_tokenizer, CHAT)
    assert dropped == ["long"] and [(e["task"], e["chosen_gold"]) for e in ex] == [("sort", True)]
    model = load_reward_model(ModelSpec(preset="tiny-rm"), tiny_tokenizer, seed=1).eval()
    res = evaluate(model, ex, tiny_tokenizer)
    assert list(res["accuracy_per_task"]) == ["sort"] and res["gold_over_policy_wrong"]["pairs"] == 1


def test_draw_prompts_plain_or_balanced_by_task():
    rows = [{"id": f"a{i}", "task": "add"} for i in range(90)] + [
        {"id": f"i{i}", "task": "identity"} for i in range(3)
    ]
    plain = draw_prompts(rows, 40, seed=1)
    assert len(plain) == 40 == len({r["id"] for r in plain})  # without repeats, in the rows' proportions
    balanced = draw_prompts(rows, 40, seed=1, balance_tasks=True)
    n_identity = sum(r["task"] == "identity" for r in balanced)
    assert len(balanced) == 40 and 10 <= n_identity <= 30  # ~half, the 3 identity rows repeated
    assert {r["id"] for r in balanced if r["task"] == "identity"} <= {"i0", "i1", "i2"}
    assert (
        draw_prompts(rows, 500, seed=1) == draw_prompts(rows, 500, seed=1)
        and len(draw_prompts(rows, 500, 1)) == 93
    )


def test_length_buckets_cut_a_step_by_length_and_leave_its_gradient_unchanged(tiny_tokenizer, tmp_path):
    from pathlib import Path

    from posttrain.config import load_recipe
    from posttrain.engines.reward_model import build_trainer

    root = Path(__file__).resolve().parents[1]
    # one long pair and seven short ones: the length-balanced micro-batches differ in size
    prompts = ["What is 2 + 3?"] * 7 + ["Reverse the word: " + "abcdefgh" * 8]
    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": q}], "chosen": "5" * (1 + i % 3), "rejected": "x"}
             for i, q in enumerate(prompts)]  # fmt: skip
    examples, _ = tokenize_pairs(pairs, tiny_tokenizer, CHAT)
    runs = {}
    for buckets in (1, 4):
        recipe = load_recipe(root / "recipes/tiny/pipeline.yaml", [
            "rm.train.batch_size=8", f"rm.train.length_buckets={buckets}", "rm.train.steps=1",
            "rm.train.learning_rate=1e-3", "rm.train.warmup_ratio=0.0", "rm.train.logging_steps=1", "rm.extra_layers=0",
            "rm.train.trl.optim=sgd",  # the update is the (clipped) gradient itself
        ])  # fmt: skip
        model = load_reward_model(ModelSpec(preset="tiny-rm"), tiny_tokenizer, seed=3)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = SimpleNamespace(path=tmp_path / str(buckets), log=lambda row: None)
        trainer = build_trainer(recipe, model, tiny_tokenizer, examples, out)
        shapes: list = []

        def recording(m, inputs, shapes=shapes, compute=trainer.compute_loss, **kw):
            shapes.append(inputs["input_ids"].shape)
            return compute(m, inputs, **kw)

        trainer.compute_loss = recording
        trainer.train()
        log = trainer.state.log_history[0]
        delta = {n: p.detach() - init[n] for n, p in trainer.model.named_parameters()}
        runs[buckets] = (shapes, log["loss"], log["grad_norm"], delta, log["accuracy"], log["margin"])
    (one, *_), (cut, loss, norm, delta, accuracy, margin) = runs[1], runs[4]
    assert len(one) == 1 and one[0][0] == 16  # 8 pairs, chosen and rejected sides
    assert len(cut) == 4 and sum(s[0] for s in cut) == 16 and len({s[0] for s in cut}) > 1
    assert sum(s[0] * s[1] for s in cut) < one[0][0] * one[0][1]  # less padding
    assert loss == pytest.approx(runs[1][1], rel=1e-5) and norm == pytest.approx(runs[1][2], rel=1e-4)
    # the logged accuracy and margin are over the step's pairs, not means of bucket means
    assert accuracy == runs[1][4]
    assert margin == pytest.approx(runs[1][5], rel=1e-5)
    assert max(d.abs().max().item() for d in delta.values()) > 1e-5
    assert max((delta[n] - runs[1][3][n]).abs().max().item() for n in delta) < 1e-8


def test_the_starting_lms_likelihood_is_read_from_the_untrained_rm(tiny_tokenizer, tmp_path):
    """The rm report's likelihood baseline: the RM built from a causal LM (with identity layers added) gives the
    LM's own log-probabilities of each response, and ranks pairs by them."""
    from posttrain.engines.reward_model import likelihood_ranking
    from posttrain.reward import lm_response_logps
    from posttrain.rl import sequence_logps
    from posttrain.stages.rm import report_markdown

    lm = load_causal_lm(ModelSpec(preset="tiny-teacher"), tiny_tokenizer, seed=5).eval()
    save_model(lm, tiny_tokenizer, tmp_path / "lm")
    rm = grow_layers(
        load_reward_model(ModelSpec(name_or_path=str(tmp_path / "lm")), tiny_tokenizer), 2
    ).eval()
    prompt = [{"role": "user", "content": "Reverse the word: abc"}]
    pairs = [{"id": str(i), "task": t, "prompt": prompt, "chosen": c, "rejected": r}
             for i, (t, c, r) in enumerate([("reverse", "cba", "abc"), ("sort", "a b", "no way, not today")])]  # fmt: skip
    ex, _ = tokenize_pairs(pairs, tiny_tokenizer, CHAT)
    seqs = [e[f"{s}_ids"] for e in ex for s in ("chosen", "rejected")]
    spans = [e[f"span_{s}"] for e in ex for s in ("chosen", "rejected")]
    assert tiny_tokenizer.decode(seqs[0][spans[0][0] : spans[0][1]]).startswith("cba")
    got = lm_response_logps(
        rm, seqs, [a for a, _ in spans], [b for _, b in spans], tiny_tokenizer.pad_token_id
    )
    logps, mask = sequence_logps(lm, [s[:a] for s, (a, _) in zip(seqs, spans)],
                                 [s[a:b] for s, (a, b) in zip(seqs, spans)], pad_id=tiny_tokenizer.pad_token_id)  # fmt: skip
    want = (logps * mask).sum(-1).tolist()
    assert max(abs(g - w) for g, w in zip(got, want)) <= 1e-4
    res = likelihood_ranking(rm, ex, tiny_tokenizer)
    wins = [want[0] > want[1], want[2] > want[3]]
    assert res["pairs"] == 2 and res["accuracy"] == sum(wins) / 2
    assert res["accuracy_per_task"] == {"reverse": float(wins[0]), "sort": float(wins[1])}
    report = {"untrained": {"pairs": 2, "accuracy": 0.5, "loss": 0.69, "length_correlation": 0.0,
                            "accuracy_per_task": {}, "calibration": []},
              "min_accuracy": 0.9, "starting_lm_likelihood": res}  # fmt: skip
    report["held_out"] = report["untrained"]
    assert f"ranks **{res['accuracy']:.3f}**" in report_markdown(report)
    assert "likelihood_weight" not in report_markdown(report)
    md = report_markdown(dict(report, likelihood_weight=0.5, untrained_head={"accuracy": 0.48, "loss": 0.7}))
    assert "+ 0.5 × the RM's own log-likelihood" in md and "head alone: accuracy 0.480, loss 0.700" in md


def _lm_and_rm(tokenizer, path, weight: float):
    """The tiny teacher as a causal LM, and an RM built from it (2 identity layers) with a likelihood weight."""
    from posttrain.engines.reward_model import check_model_turns

    lm = load_causal_lm(ModelSpec(preset="tiny-teacher"), tokenizer, seed=5).eval()
    save_model(lm, tokenizer, path)
    rm = grow_layers(load_reward_model(ModelSpec(name_or_path=str(path)), tokenizer, seed=2), 2).eval()
    prompt = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
              {"role": "user", "content": "Now add 5 to that."}]  # fmt: skip
    pairs = [{"id": str(i), "task": "followup", "prompt": prompt, "chosen": c, "rejected": r}
             for i, (c, r) in enumerate([("10", "11"), ("10", "no way, not today")])]  # fmt: skip
    ex, _ = tokenize_pairs(pairs, tokenizer, CHAT)
    rm.config.posttrain_likelihood_weight = weight
    rm.config.posttrain_response_prefix = check_model_turns(ex, tokenizer)
    return lm, rm, ex


def test_the_likelihood_weight_adds_the_rms_log_likelihood_of_the_final_turn(tiny_tokenizer, tmp_path):
    """rm.likelihood_weight w: reward = head + w · Σ log p of the final model turn's tokens under the RM's LM
    (here the starting LM's: identity layers); found from the ids alone, in any batch or padding, and kept over
    a save and reload."""
    from posttrain.rl import sequence_logps

    lm, rm, ex = _lm_and_rm(tiny_tokenizer, tmp_path / "lm", weight=0.5)
    pad = tiny_tokenizer.pad_token_id
    seqs = [e[f"{s}_ids"] for e in ex for s in ("chosen", "rejected")]
    # the response: after the *last* model-turn header (a follow-up has two), to the last real token
    starts = [e[f"span_{s}"][0] for e in ex for s in ("chosen", "rejected")]
    logps, mask = sequence_logps(lm, [s[:a] for s, a in zip(seqs, starts)], [s[a:] for s, a in zip(seqs, starts)],
                                 pad_id=pad)  # fmt: skip
    logp = (logps * mask).sum(-1).tolist()
    rm.config.posttrain_likelihood_weight = 0.0
    head = score_ids(rm, seqs, pad)
    rm.config.posttrain_likelihood_weight = 0.5
    got = score_ids(rm, seqs, pad)
    assert max(abs(g - (h + 0.5 * m)) for g, h, m in zip(got, head, logp)) <= 1e-4
    assert min(abs(g - h) for g, h in zip(got, head)) > 0.1  # the term is there, and not small
    for other in (score_ids(rm, seqs, pad, left=True), score_ids(rm, seqs[::-1], pad)[::-1],
                  [score_ids(rm, [s], pad)[0] for s in seqs]):  # fmt: skip
        assert max(abs(a - b) for a, b in zip(got, other)) <= 1e-5
    from posttrain.engines.reward_model import held_out_reads
    from posttrain.reward import score_parts

    heads, logliks = score_parts(rm, seqs, pad)  # the two parts apart, from one pass
    assert max(abs(a - b) for a, b in zip(heads, head)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(logliks, logp)) <= 1e-4
    # the held-out reads, from one pass: the reward, the head alone, the likelihood term alone
    reads = held_out_reads(rm, ex, tiny_tokenizer)
    for key, r in (("reward", got), ("head", head), ("likelihood", logp)):
        assert reads[key]["accuracy"] == (int(r[0] > r[1]) + int(r[2] > r[3])) / 2, key
    assert reads["reward"]["accuracy_per_task"] == {"followup": reads["reward"]["accuracy"]}
    assert rm.config.posttrain_likelihood_weight == 0.5
    save_model(rm, tiny_tokenizer, tmp_path / "rm")
    again = load_reward_model(ModelSpec(name_or_path=str(tmp_path / "rm")), tiny_tokenizer).eval()
    assert again.config.posttrain_likelihood_weight == 0.5
    assert max(abs(a - b) for a, b in zip(got, score_ids(again, seqs, pad))) <= 1e-5


def test_the_likelihood_term_trains_and_needs_a_model_turn(tiny_tokenizer, tmp_path):
    """The BT loss's gradient reaches the LM through the likelihood term (with the head zeroed, the embeddings get
    a gradient only from it); a sequence with no model turn, or a tokenizer that splits the header differently in
    context, is refused by name."""
    from posttrain.data.formats import DataError
    from posttrain.engines.reward_model import check_model_turns
    from posttrain.reward import response_mask

    _, rm, ex = _lm_and_rm(tiny_tokenizer, tmp_path / "lm", weight=1.0)
    pad = tiny_tokenizer.pad_token_id
    ids, m = padded([e["chosen_ids"] for e in ex] + [e["rejected_ids"] for e in ex], pad)
    grads = {}
    torch.nn.init.zeros_(rm.score.weight)  # the head says nothing: all the gradient is the likelihood term's
    for w in (0.0, 1.0):
        rm.zero_grad()
        rm.config.posttrain_likelihood_weight = w
        r_c, r_r = last_token_rewards(rm, ids, m).chunk(2)
        bt_loss(r_c, r_r)[0].backward()
        grads[w] = rm.get_input_embeddings().weight.grad.norm().item()
    assert grads[0.0] == 0 and grads[1.0] > 1e-3
    resp = response_mask(ids, m, rm.config.posttrain_response_prefix)
    assert tiny_tokenizer.decode(ids[0][resp[0]]).startswith("10<end_of_turn>")
    with pytest.raises(ValueError, match=r"sequences \[0\] have no model turn"):
        response_mask(ids[:1, :5], m[:1, :5], rm.config.posttrain_response_prefix)
    (a, b), ids1 = ex[1]["span_chosen"], ex[1]["chosen_ids"]
    lost = ids1[: a - 2] + ids1[a - 1 :]  # a token of the header lost
    bad = [dict(ex[1], chosen_ids=lost, span_chosen=(a - 1, b - 1))]
    with pytest.raises(DataError, match="pair 1: the chosen response does not follow the model-turn header"):
        check_model_turns(bad, tiny_tokenizer)


def test_likelihood_targets_are_the_starting_lms_log_probabilities_of_the_response(tiny_tokenizer, tmp_path):
    """rm.likelihood_targets: at each final-turn position, TARGET_SCALE × log p of its token under the LM the RM
    was built from (zero elsewhere, masked out); the loss trains the head's per-position scores toward them and is
    0 where they agree; the reward read stays the head at the last token (no term in the model's config)."""
    from posttrain.rl import sequence_logps
    from posttrain.stages.rm import frozen_copy

    lm, rm, ex = _lm_and_rm(tiny_tokenizer, tmp_path / "lm", weight=0.0)
    pad = tiny_tokenizer.pad_token_id
    seqs = [e[f"{s}_ids"] for e in ex for s in ("chosen", "rejected")]
    ids, m = padded(seqs, pad)
    frozen = frozen_copy(rm)
    targets, resp = likelihood_targets(frozen, ids, m, rm.config.posttrain_response_prefix)
    starts = [e[f"span_{s}"][0] for e in ex for s in ("chosen", "rejected")]
    logps, mask = sequence_logps(lm, [s[:a] for s, a in zip(seqs, starts)], [s[a:] for s, a in zip(seqs, starts)],
                                 pad_id=pad)  # fmt: skip
    for i, a in enumerate(starts):
        n = int(mask[i].sum())
        assert resp[i].nonzero()[:, 0].tolist() == list(range(a, a + n))
        assert torch.allclose(targets[i, a : a + n], TARGET_SCALE * logps[i, :n], atol=1e-4)
        assert targets[i][~resp[i]].abs().max() == 0
    assert not targets.requires_grad
    rewards, scores = last_token_rewards(rm, ids, m, per_position=True)
    assert torch.equal(rewards, last_token_rewards(rm, ids, m))  # the read: the head at the last token
    assert likelihood_target_loss(targets, targets, resp).item() == 0.0
    loss = likelihood_target_loss(scores, targets, resp)
    loss.backward()
    assert loss.item() > 0 and rm.score.weight.grad.norm() > 0 and frozen.score.weight.grad is None


@pytest.mark.parametrize("distils", [True, False])
def test_the_rm_learns_from_the_policy_that_rl_starts_from(distils):
    """The RM judges the responses RL will make it score: its pairs are sampled from RL's start (the distilled
    student when the recipe distils), not from another stage's policy."""
    from pathlib import Path

    from posttrain.config import load_recipe
    from posttrain.stages import rm

    path = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "pipeline.yaml"
    recipe = load_recipe(path, () if distils else ("distill=null",))
    assert recipe.rl_start() == ("distill" if distils else "sft")
    assert recipe.rm_policy() == recipe.rl_start() and recipe.rl_start() in rm.parents(recipe)


def test_freeze_base_trains_only_the_added_layers_and_the_head(tiny_tokenizer, tmp_path):
    """rm.freeze_base: the starting LM's embeddings, layers and final norm stay as they were (so does the
    likelihood term's LM under them); the layers added on top and the new head learn."""
    from pathlib import Path

    from posttrain.config import load_recipe
    from posttrain.engines.reward_model import build_trainer
    from posttrain.stages.rm import build_model

    root = Path(__file__).resolve().parents[1]
    lm = load_causal_lm(ModelSpec(preset="tiny-teacher"), tiny_tokenizer, seed=5)
    save_model(lm, tiny_tokenizer, tmp_path / "lm")
    pairs = [{"id": f"p{i}", "prompt": [{"role": "user", "content": f"What is {i} + 3?"}], "chosen": str(i + 3),
              "rejected": str(i + 4)} for i in range(8)]  # fmt: skip
    examples, _ = tokenize_pairs(pairs, tiny_tokenizer, CHAT)
    moved = {}
    for frozen in (False, True):
        recipe = load_recipe(root / "recipes/tiny/pipeline.yaml", [
            "rm.train.batch_size=8", "rm.train.steps=3", "rm.train.learning_rate=1e-2", "rm.train.warmup_ratio=0.0",
            "rm.train.logging_steps=1", "rm.extra_layers=2", "rm.likelihood_weight=1.0", f"rm.freeze_base={frozen}",
        ])  # fmt: skip
        model, _ = build_model(recipe, ModelSpec(name_or_path=str(tmp_path / "lm")), tiny_tokenizer, examples)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = SimpleNamespace(path=tmp_path / str(frozen), log=lambda row: None)
        trainer = build_trainer(recipe, model, tiny_tokenizer, examples, out)
        trainer.train()
        moved[frozen] = {
            n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), init[n])
        }
    base = lambda n: n.startswith("model.") and not n.startswith(("model.layers.3.", "model.layers.4."))  # noqa: E731
    assert any(base(n) for n in moved[False])  # trained whole, the starting LM's weights move
    assert moved[True] and not any(base(n) for n in moved[True])
    for part in ("score.", "model.layers.3.", "model.layers.4."):
        assert any(n.startswith(part) for n in moved[True]), part
