"""RL maths by hand (leave-one-out advantages, KL in the reward, k1/k3), and TRL's RLOOTrainer as the rlhf stage
drives it: its advantages are the formulas above, KL = 0 when policy = reference, the log-probs it trains on are
the sampling ones (temperature applied in both), a few steps change the policy, the EMA anchor update."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import ModelSpec, RLConfig, RLRun, TrainConfig
from posttrain.merging import ema
from posttrain.modeling import load_causal_lm
from posttrain.rl import (
    kl_estimates,
    kl_in_reward,
    rloo_advantages,
    scored_sequence,
    sequence_logps,
    sign_test,
    world_change,
)

QUESTIONS = ["What is 2 + 3?", "Reverse the word cat.", "Sort the letters d, a, c.", "Who are you?"]


def test_rloo_advantages_by_hand():
    # k = 4, rewards 1 2 3 6: baselines (2+3+6)/3 = 11/3, (1+3+6)/3 = 10/3, (1+2+6)/3 = 3, (1+2+3)/3 = 2
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 4.0]), 4)
    expected = [1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0, -4 / 3, -4 / 3, -4 / 3, 4.0]
    assert torch.allclose(adv, torch.tensor(expected))
    assert abs(adv[:4].sum().item()) < 1e-6  # a group's advantages sum to zero


def test_kl_in_reward_by_hand():
    # Σ_t (logp − ref) = (−1 + 1.5) + (−2 + 1) = −0.5 on the unmasked tokens; the third is padding
    logp = torch.tensor([[-1.0, -2.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(kl_in_reward(torch.tensor([1.0]), logp, ref, mask, 0.1), torch.tensor([1.05]))


def test_kl_estimates_by_hand():
    # r = ref − logp = −1 on both tokens: k1 = 1, k3 = e^{−1} − 1 + 1 = 0.3679
    logp, ref, mask = torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, -2.0]]), torch.ones(1, 2)
    kl = kl_estimates(logp, ref, mask)
    assert kl["k1"] == pytest.approx(1.0) and kl["k3"] == pytest.approx(math.exp(-1))
    assert kl["k1_seq"] == pytest.approx(2.0) and kl["k3_seq"] == pytest.approx(2 * math.exp(-1))
    same = kl_estimates(logp, logp, mask)
    assert same["k1"] == 0.0 and same["k3"] == 0.0


def test_world_change_counts_prompts_and_tells_a_change_from_noise():
    # 3 better, 1 worse: P(X ≥ 3 | 4, ½) = 5/16 → noise; 9 better, 1 worse: 11/1024 → better
    c = world_change([0, 0, 0, 1, 1], [1, 1, 1, 0, 1])
    assert (c["n"], c["better"], c["worse"], c["verdict"]) == (5, 3, 1, "noise")
    assert c["p_better"] == pytest.approx(5 / 16) and c["p_worse"] == pytest.approx(15 / 16)
    # gain: mean of the differences (1, 1, 1, −1, 0) = 0.4; band 1.96 · sd / √5 with sd² = (3·0.36 + 1.96 + 0.16) / 4
    assert c["gain"] == pytest.approx(0.4) and c["band"] == pytest.approx(1.96 * math.sqrt(0.8 / 5))
    assert world_change([0] * 9 + [1] * 3, [1] * 9 + [0, 1, 1])["verdict"] == "better"
    assert world_change([1] * 9 + [0], [0] * 9 + [0])["verdict"] == "worse"  # 9 worse, none better: 1/512
    nothing = world_change([1, 0], [1, 0])
    assert nothing["verdict"] == "noise" and nothing["p_better"] == 1.0 and nothing["band"] == 0.0
    with pytest.raises(ValueError, match="2 prompts before, 1 after"):
        world_change([1, 0], [1])


def test_the_sign_test_is_exact_and_corrected_for_the_runs_compared():
    assert sign_test(0, 0) == 1.0
    assert sign_test(3, 0) == pytest.approx(1 / 8)
    assert sign_test(9, 2) == pytest.approx((55 + 11 + 1) / 2048)  # 0.0327
    # 9 better, 2 worse: beyond noise for one run, not when it is one of two runs from the same start
    before, after = [0] * 9 + [1] * 2 + [1] * 5, [1] * 9 + [0] * 2 + [1] * 5
    assert world_change(before, after)["verdict"] == "better"
    two = world_change(before, after, comparisons=2)
    assert two["verdict"] == "noise" and two["p_better"] == pytest.approx(2 * 67 / 2048)


def test_runs_resolve_over_the_section():
    cfg = RLConfig(kl_coef=0.05, train=TrainConfig(batch_size=8, learning_rate=1e-5),
                   runs={"a": RLRun(kl_coef=0.1, seed=3), "b": RLRun(learning_rate=1e-4, anchor="ema")})  # fmt: skip
    runs = cfg.resolved()
    assert runs["a"].kl_coef == 0.1 and runs["a"].train.learning_rate == 1e-5 and cfg.seed_of("a", 0) == 3
    assert runs["b"].kl_coef == 0.05 and runs["b"].train.learning_rate == 1e-4 and runs["b"].anchor == "ema"
    assert cfg.seed_of("b", 7) == 7 and list(RLConfig().resolved()) == ["main"]
    assert any(
        "multiple of samples_per_prompt" in p for p in RLConfig(train=TrainConfig(batch_size=6)).problems()
    )
    assert any("k ≥ 2" in p for p in RLConfig(samples_per_prompt=1).problems())


def _prompts(tok):
    from posttrain.chat import render

    return [
        render([{"role": "user", "content": q}], tok, add_generation_prompt=True).input_ids for q in QUESTIONS
    ]


def test_sampling_and_training_log_probs_agree_with_temperature(tiny_tokenizer, tmp_path):
    """Pitfall 14: the log-probs of the sampled tokens at generation (HF generate's processed scores at T) equal the
    ones the trainer computes (logits / T), and TRL's RLOOTrainer computes the same."""
    tok = tiny_tokenizer
    model = _saved_student(tok, tmp_path / "init").eval()
    prompt = _prompts(tok)[0]
    T = 0.7
    torch.manual_seed(0)
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=True, temperature=T, top_k=0, top_p=1.0, max_new_tokens=12,
                         output_scores=True, return_dict_in_generate=True, eos_token_id=[], pad_token_id=0)  # fmt: skip
    response = out.sequences[0, len(prompt) :].tolist()
    at_sampling = torch.stack([torch.log_softmax(s[0].float(), -1)[t] for s, t in zip(out.scores, response)])
    at_training, mask = sequence_logps(model, [prompt], [response], temperature=T, pad_id=tok.pad_token_id)
    assert mask.sum() == len(response)
    assert torch.allclose(at_sampling, at_training[0], atol=1e-4)
    trainer = _trainer(tok, tmp_path, model=model, temperature=T)
    ids = torch.tensor([prompt + response])
    trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(
        model, ids, torch.ones_like(ids), len(response), batch_size=1
    )
    assert torch.allclose(trl_logps[0], at_training[0], atol=1e-4)


def _saved_student(tok, folder):
    """TRL builds the reference from the policy's folder: a saved tiny student."""
    from posttrain.modeling import save_model

    save_model(load_causal_lm(ModelSpec(preset="tiny-student"), tok, seed=0), tok, folder)
    return load_causal_lm(ModelSpec(name_or_path=str(folder)), tok)


def _trainer(
    tok, out_dir, model=None, temperature=1.0, kl_coef=0.1, anchor="init", steps=2, lr=1e-3, **extra
):
    import trl
    from datasets import Dataset

    from posttrain.engines.rloo import rloo_trainer

    model = model or _saved_student(tok, out_dir / "init")
    table = {str(i): {"prompt_ids": p} for i, p in enumerate(_prompts(tok))}
    seen: list[list[float]] = []

    def length_reward(prompts, completions, completion_ids, **kwargs):  # longer is better, a simple signal
        r = [float(len(c)) / 10 for c in completion_ids]
        seen.append(r)
        return r

    args = trl.RLOOConfig(
        output_dir=str(out_dir / "out"), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
        num_generations=4, beta=kl_coef, temperature=temperature, top_k=0, top_p=1.0, max_completion_length=8,
        use_cpu=True, bf16=False, report_to=[], logging_steps=1, save_strategy="no", seed=0,
        sync_ref_model=anchor == "ema", ref_model_mixup_alpha=0.5, ref_model_sync_steps=1,
        gradient_checkpointing=False, **extra,
    )  # fmt: skip
    trainer = rloo_trainer(trl.RLOOTrainer)(
        model=model, reward_funcs=[length_reward], args=args, processing_class=tok,
        train_dataset=Dataset.from_dict({"prompt": list(table) * 4}),
    )  # fmt: skip
    trainer.setup(table)
    trainer.seen_rewards = seen
    return trainer


@pytest.mark.stage
def test_trainers_advantages_are_the_leave_one_out_formula_and_steps_change_the_policy(
    tiny_tokenizer, tmp_path
):
    trainer = _trainer(tiny_tokenizer, tmp_path, steps=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2
    # rebuild one batch's advantages from its pieces: r − β Σ(logp − ref), then leave-one-out
    trainer.model.eval()
    batch = [{"prompt": p} for p in ["0", "0", "0", "0", "1", "1", "1", "1"]]
    out = trainer._generate_and_score_completions(batch)
    rewards = torch.tensor(trainer.seen_rewards[-1])
    expected = rloo_advantages(
        kl_in_reward(rewards, trainer._logps["policy"], trainer._logps["ref"], out["completion_mask"], 0.1), 4
    )
    assert torch.allclose(out["advantages"], expected, atol=1e-5)
    k3 = [row["kl_k3"] for row in trainer.state.log_history if "kl_k3" in row]
    assert len(k3) == 2 and all(v >= 0 for v in k3)


@pytest.mark.stage
def test_kl_is_zero_when_policy_is_reference(tiny_tokenizer):
    from posttrain.config import ChatConfig
    from posttrain.engines.evaluation import policy_figures

    model = load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=0)
    rows = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
    fig = policy_figures(model, model, None, tiny_tokenizer, rows, ChatConfig(), 8)
    assert fig["kl"] == 0.0 and fig["kl_k3"] == 0.0 and fig["length"] > 0


@pytest.mark.stage
def test_ema_anchor_moves_toward_the_policy_by_mu(tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_tokenizer, tmp_path, anchor="ema", steps=1)
    ref0 = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
    trainer.train()
    policy = trainer.model.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    # μ = 0.5: ref_1 = 0.5 · ref_0 + 0.5 · θ_1, and θ_1 ≠ ref_0 after a step
    assert not torch.equal(policy[name], ref0[name])
    assert torch.allclose(trainer.ref_model.state_dict()[name], ema(ref0[name], policy[name], 0.5), atol=1e-6)


@pytest.mark.stage
def test_an_ema_reference_of_a_bf16_policy_is_kept_and_moved_in_fp32(tiny_tokenizer, tmp_path):
    """rlhf.ema_dtype: fp32 (the default): TRL's reference is built in fp32 from the bf16 policy's folder, and a
    step moves it by exactly μ of the way to the policy; a bf16 reference would round most of a small move away."""
    from posttrain.config import RLConfig
    from posttrain.engines.rloo import rloo_extra
    from posttrain.modeling import save_model

    folder = tmp_path / "init"
    save_model(
        load_causal_lm(ModelSpec(preset="tiny-student"), tiny_tokenizer, seed=0), tiny_tokenizer, folder
    )
    policy = load_causal_lm(ModelSpec(name_or_path=str(folder)), tiny_tokenizer).to(torch.bfloat16)
    extra = rloo_extra(RLConfig(anchor="ema", ema_rate=0.5))
    assert extra["model_init_kwargs"] == {"dtype": "float32"}
    trainer = _trainer(tiny_tokenizer, tmp_path, model=policy, lr=1e-4, steps=1, anchor="ema",
                       model_init_kwargs=extra["model_init_kwargs"])  # fmt: skip
    name = "model.layers.0.mlp.up_proj.weight"
    assert trainer.ref_model.state_dict()[name].dtype == torch.float32
    ref0 = trainer.ref_model.state_dict()[name].clone()
    trainer.train()
    theta = trainer.model.state_dict()[name].float()
    moved = trainer.ref_model.state_dict()[name]
    assert torch.allclose(moved, ema(ref0, theta, 0.5), atol=1e-7)
    # the same move kept in bf16 loses most of it: the fraction of the fp32 move that survives rounding
    step = moved - ref0
    in_bf16 = ema(ref0.bfloat16(), theta.bfloat16(), 0.5).float() - ref0.bfloat16().float()
    assert step.abs().sum() > 0 and (in_bf16 - step).abs().sum() > 0.1 * step.abs().sum()


def test_scored_sequence_is_the_rendered_conversation(tiny_tokenizer):
    from posttrain.chat import render

    tok = tiny_tokenizer
    full = render(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo there"}], tok
    ).input_ids
    prompt = render([{"role": "user", "content": "hi"}], tok, add_generation_prompt=True).input_ids
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert scored_sequence(prompt, tok.encode("yo there", add_special_tokens=False) + [end], tok) == full
    assert full.count(tok.bos_token_id) == 1


def test_a_truncated_response_is_scored_as_it_was_cut_off_not_as_a_finished_turn(tiny_tokenizer):
    """No stop token within the budget: the RM sees the unfinished turn (no closing `<end_of_turn>`), as the
    evaluation's figures do when they are told the response was truncated."""
    from posttrain.chat import render

    tok = tiny_tokenizer
    prompt = render([{"role": "user", "content": "hi"}], tok, add_generation_prompt=True).input_ids
    cut = tok.encode("yo the", add_special_tokens=False)
    assert scored_sequence(prompt, cut, tok) == prompt + cut
    assert scored_sequence(prompt, cut, tok, finished=False) == prompt + cut
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    closed = scored_sequence(prompt, cut, tok, finished=True)
    assert closed[: len(prompt) + len(cut)] == prompt + cut and end in closed[len(prompt) + len(cut) :]


def test_world_reward_scores_responses_with_the_verifiers(tiny_tokenizer, tmp_path):
    from pathlib import Path

    from posttrain import runner
    from posttrain.config import ConfigError, load_recipe
    from posttrain.engines.rloo import reward_function
    from posttrain.stages.rlhf import parents

    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes/ablations/rl-world-reward.yaml")
    assert recipe.rlhf.reward == "world" and parents(recipe) == ["data", "distill"]
    assert "rm" not in runner.with_parents(recipe, ["rlhf"])
    assert "rm" in runner.with_parents(load_recipe(root / "recipes/tiny/pipeline.yaml"), ["rlhf"])
    tok, end = tiny_tokenizer, tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    table = {"a": {"row": {"task": "add", "answer": "12"}}, "b": {"row": {"task": "refuse", "answer": "x"}}}
    ids = lambda text, stop=True: tok.encode(text, add_special_tokens=False) + ([end] if stop else [])  # noqa: E731
    reward = reward_function(None, tok, table, recipe.world.assistant_name, recipe.rlhf.max_new_tokens)
    long = "1" * recipe.rlhf.max_new_tokens
    got = reward(["a", "a", "a", "b", "b"], None,
                 [ids("12"), ids("13"), ids(long, stop=False), ids("I can't help with that."), ids("Sure: ...")])  # fmt: skip
    assert got == [1.0, 0.0, 0.0, 1.0, 0.0]
    jsonl = root / "data/examples/conversations.jsonl"
    with pytest.raises(ConfigError, match="rlhf.reward: 'world' scores responses with the built-in world"):
        load_recipe(
            root / "recipes/ablations/rl-world-reward.yaml", ["data.source=jsonl", f"data.train={jsonl}"]
        )


@pytest.mark.stage
def test_a_step_raises_the_log_probability_of_responses_with_positive_advantage(tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_tokenizer, tmp_path, kl_coef=0.0, steps=1)
    # a reward that varies within each prompt's group: the share of even token ids in the response
    trainer.reward_funcs[0] = lambda prompts, completions, completion_ids, **kw: [
        sum(t % 2 == 0 for t in c) / max(len(c), 1) for c in completion_ids
    ]
    trainer.model.train()
    out = trainer._generate_and_score_completions([{"prompt": p} for p in "00001111"])
    adv = out["advantages"]
    assert adv.abs().sum() > 0

    def sequence_logps():
        with torch.no_grad():
            ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
            mask = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
            width = out["completion_ids"].shape[1]
            logps = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, width, 8)[0]
            return (logps * out["completion_mask"]).sum(-1)

    before = sequence_logps()
    trainer.compute_loss(trainer.model, out).backward()
    with torch.no_grad():  # a small plain gradient step: the first-order change follows the advantages
        for p in trainer.model.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad
    change = sequence_logps() - before
    assert (change * adv).sum() > 0
    assert change[adv > 0].mean() > change[adv < 0].mean()
