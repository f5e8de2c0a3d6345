"""REINFORCE with a leave-one-out baseline and a KL penalty in the reward (the `rlhf` stage), as pure tensor
functions: the specification that TRL's `RLOOTrainer` is tested against (tests/test_rl.py), and the figures that
compare a policy with its start (per-sequence KL estimates, win rate, the prompt-by-prompt world change).

For a prompt x the policy samples k responses y_1..y_k at temperature T (plain sampling: top-k/top-p would make
the sampled distribution differ from the one scored, and the KL estimate unsound). Per response:

    R_i   = r_RM(x, y_i) − β · Σ_t (log π(y_i,t) − log π_ref(y_i,t))         (β = rlhf.kl_coef; k1 estimate)
    A_i   = R_i − (1 / (k − 1)) Σ_{j ≠ i} R_j                                 (leave-one-out baseline)
    L(θ)  = − (1/N) Σ_i A_i · Σ_t log π_θ(y_i,t | x, y_i,<t)                    (N responses in the batch)

KL estimators per token, with r = log π_ref − log π on the policy's own samples (Schulman 2020):
k1 = −r (unbiased, noisy, can be negative per token), k3 = e^r − 1 − r (unbiased, ≥ 0).

The anchor π_ref is the starting policy, or (WARP) an exponential moving average of the policy:
π_ref ← (1 − μ) π_ref + μ π after every optimizer step (`merging.ema`).

TRL names: kl_coef → RLOOConfig.beta, samples_per_prompt → num_generations, anchor: ema → sync_ref_model with
ref_model_mixup_alpha = μ and ref_model_sync_steps = 1.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from posttrain.chat import stop_ids
from posttrain.logits import backbone, lm_head, padded, token_logps

if TYPE_CHECKING:
    import torch


# ----------------------------------------------------------------------------------------------- the maths


def kl_in_reward(
    rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """(N,), (N, T), (N, T), (N, T) → (N,): r − β · Σ_t (log π − log π_ref) over the response tokens."""
    return rewards - kl_coef * ((logp - ref_logp) * mask).sum(-1)


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """(N·k,) rewards, each prompt's k responses consecutive → (N·k,) leave-one-out advantages."""
    g = rewards.view(-1, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)
    return (g - baseline).view(-1)


def kl_estimates(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """(N, T) log-probs of the policy's own samples under π and π_ref, (N, T) mask → {"k1", "k3"} per token and
    {"k1_seq", "k3_seq"} per sequence (sums over tokens, averaged over sequences)."""
    m = mask.float()
    r = (ref_logp - logp).float() * m
    k1, k3 = -r, (r.exp() - 1 - r) * m
    n = m.sum().clamp(min=1)
    return {"k1": (k1.sum() / n).item(), "k3": (k3.sum() / n).item(),
            "k1_seq": k1.sum(-1).mean().item(), "k3_seq": k3.sum(-1).mean().item()}  # fmt: skip


def sequence_logps(
    model, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0, pad_id: int = 0,
    batch_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token log π(y_t | x, y_<t) of each response (logits / temperature, after the model's soft-cap):
    (N, T_max) log-probs and (N, T_max) mask, responses right-aligned to position 0. Only the response positions
    are projected through the LM head, a tile at a time (`posttrain.logits`); under ZeRO-3 the head is gathered
    for it (it is read outside its module's forward)."""
    import torch
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    width = max((len(r) for r in responses), default=0)
    out = torch.zeros(len(responses), width)
    mask = torch.zeros(len(responses), width)
    weight, cap = lm_head(model)
    device = weight.device
    with torch.no_grad():
        for b in range(0, len(prompts), batch_size):
            ps, rs = prompts[b : b + batch_size], responses[b : b + batch_size]
            ids, att = (t.to(device) for t in padded([p + r for p, r in zip(ps, rs)], pad_id))
            hidden = backbone(model)(input_ids=ids, attention_mask=att).last_hidden_state
            rows = [i for i, r in enumerate(rs) if r]
            if not rows:
                continue
            pos = [torch.arange(len(ps[i]) - 1, len(ps[i]) + len(rs[i]) - 1) for i in rows]
            picked = torch.cat([hidden[i, p.to(device)] for i, p in zip(rows, pos)])
            targets = torch.tensor([t for i in rows for t in rs[i]], device=device)
            with maybe_gather_lm_head_ctx(weight):  # a no-op where the head is whole already
                lp = token_logps(picked, weight, targets, cap, temperature).cpu()
            for i, chunk in zip(rows, lp.split([len(rs[i]) for i in rows])):
                out[b + i, : len(chunk)], mask[b + i, : len(chunk)] = chunk, 1
    return out, mask


def scored_sequence(
    prompt: list[int], response: list[int], tokenizer: Any, finished: bool | None = None
) -> list[int]:
    """What the reward model scores: the rendered prompt, the response's own tokens (stop tokens removed) and, when
    the response ended its turn, the turn's closing `<end_of_turn>\n` — the conversation as `posttrain.chat` renders
    it for RM training, built from the sampled ids so that a malformed response is scored as it was sampled rather
    than refused. A response that did not end its turn (truncated: no stop token within the budget) is scored as it
    was cut off, never as a finished turn. `finished` says which; by default a stop token among `response`'s ids
    (TRL's completions keep the one that ended them)."""
    ends = set(stop_ids(tokenizer))
    stops = ends | {tokenizer.pad_token_id}
    if finished is None:
        finished = any(t in ends for t in response)
    tail = tokenizer.encode("<end_of_turn>\n", add_special_tokens=False) if finished else []
    return list(prompt) + [t for t in response if t not in stops] + tail


def win_rate(rewards: list[float], baseline: list[float]) -> float:
    """The share of prompts where `rewards` beats `baseline` (ties count half)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline)]
    return sum(wins) / max(len(wins), 1)


def sign_test(better: int, worse: int) -> float:
    """One-sided exact sign test over the prompts that changed: P(X ≥ better) for X ~ Binomial(better + worse, ½),
    the chance of at least this many improvements if a changed prompt were as likely to get worse. 1.0 when
    nothing changed."""
    n = better + worse
    return sum(math.comb(n, k) for k in range(better, n + 1)) / 2**n


def world_change(
    before: list[float], after: list[float], comparisons: int = 1, alpha: float = 0.05
) -> dict[str, Any]:
    """The world score of the same prompts before and after, compared prompt by prompt: how many got better and
    how many worse; the gain (mean of the per-prompt differences) with its 95% band (± 1.96 standard errors of
    that mean: the noise of scoring these prompts once); and whether the change is beyond noise — a one-sided exact
    sign test on the prompts that changed (`sign_test`; prompts that did not change carry no evidence either way),
    Bonferroni-corrected for the `comparisons` made together (e.g. the RL runs of one stage): "better" when
    comparisons × P(≥ better) < alpha, "worse" likewise the other way, else "noise"."""
    if len(before) != len(after):
        raise ValueError(f"world_change: {len(before)} prompts before, {len(after)} after")
    diffs = [b - a for a, b in zip(before, after)]
    n = len(diffs)
    better = sum(d > 0 for d in diffs)
    worse = sum(d < 0 for d in diffs)
    gain = sum(diffs) / n if n else 0.0
    var = sum((d - gain) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    p_better = min(1.0, comparisons * sign_test(better, worse))
    p_worse = min(1.0, comparisons * sign_test(worse, better))
    verdict = "better" if p_better < alpha else "worse" if p_worse < alpha else "noise"
    return {"n": n, "better": better, "worse": worse, "gain": gain, "band": 1.96 * math.sqrt(var / n) if n else 0.0,
            "p_better": p_better, "p_worse": p_worse, "comparisons": comparisons, "verdict": verdict}  # fmt: skip
