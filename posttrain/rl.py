"""REINFORCE with a leave-one-out baseline and a KL penalty in the reward (the `rlhf` stage), and the figures
that judge a policy against its reference: sampled KL, reward, world score.

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

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from posttrain.training import IF_SET, TrainConfig

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RLRun:
    """One run of the `rlhf` stage: the keys set here replace the section's (unset keys keep them)."""

    kl_coef: float | None = None
    seed: int | None = None
    learning_rate: float | None = None
    anchor: Literal["init", "ema"] | None = None
    ema_rate: float | None = None
    temperature: float | None = None


@dataclass(frozen=True)
class RLConfig:
    """The `rlhf:` section (leave it out, or null, to skip RL).

    init_from: the policy (and the KL reference) to start from — `auto` is `distill` when the recipe distils,
    else `sft`. kl_coef: β above. anchor: `init` (the starting policy) or `ema` (WARP) with rate `ema_rate`.
    samples_per_prompt: k ≥ 2. temperature: of sampling and of the log-probabilities trained. prompts: how many
    training prompts (0: all). balance_tasks: draw the training prompts with equal weight per task family (the
    rows' `task` field), rarer families repeated, so that a family with few prompts is not drowned by the others'
    updates. train.batch_size counts responses (a multiple of k). runs: named variants, each
    written to `rlhf/<run>/` (default: one run, `main`). reward: `rm` (the `rm` stage's model, Gemma 2's RLHF) or
    `world` (the built-in world's verifiers: 1 for a right response, else 0 — the true reward that the RM
    approximates; with it the stage needs no RM, which separates what RL does from what the RM knows).
    """

    init_from: Literal["auto", "sft", "distill"] = "auto"
    reward: Literal["rm", "world"] = "rm"
    kl_coef: float = 0.05
    anchor: Literal["init", "ema"] = "init"
    ema_rate: float = 0.01
    samples_per_prompt: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    prompts: int = 0
    balance_tasks: bool = field(default=False, metadata=IF_SET)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, learning_rate=1e-6))
    runs: dict[str, RLRun] = field(default_factory=dict)

    def problems(self) -> list[str]:
        out = []
        if self.samples_per_prompt < 2:
            out.append(
                f"samples_per_prompt: {self.samples_per_prompt}; the leave-one-out baseline needs k ≥ 2"
            )
        elif (self.train.batch_size * self.train.grad_accum) % self.samples_per_prompt:
            out.append(
                f"train.batch_size × grad_accum ({self.train.batch_size} × {self.train.grad_accum}) must be a "
                f"multiple of samples_per_prompt ({self.samples_per_prompt}): each prompt's k responses share a batch"
            )
        for name, run in self.resolved().items():
            if not name or any(c in name for c in "/\\ ") or name.startswith("."):
                out.append(f"runs: {name!r} must be a plain folder name")
            if run.kl_coef < 0 or run.temperature <= 0 or not 0.0 < run.ema_rate <= 1.0:
                out.append(f"runs.{name}: kl_coef ≥ 0, temperature > 0 and 0 < ema_rate ≤ 1 are required")
        return out

    def resolved(self) -> dict[str, RLConfig]:
        """Run name → this section with the run's keys applied (and `runs` emptied)."""
        base = dataclasses.replace(self, runs={})
        if not self.runs:
            return {"main": base}
        out = {}
        for name, run in self.runs.items():
            over = {
                k: v for k, v in dataclasses.asdict(run).items() if v is not None and k != "learning_rate"
            }
            cfg = dataclasses.replace(base, **{k: v for k, v in over.items() if k != "seed"})
            if run.learning_rate is not None:
                cfg = dataclasses.replace(
                    cfg, train=dataclasses.replace(cfg.train, learning_rate=run.learning_rate)
                )
            out[name] = cfg
        return out

    def seed_of(self, name: str, recipe_seed: int) -> int:
        run = self.runs.get(name)
        return run.seed if run is not None and run.seed is not None else recipe_seed


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
    (N, T_max) log-probs and (N, T_max) mask, responses right-aligned to position 0."""
    import torch
    import torch.nn.functional as F

    width = max((len(r) for r in responses), default=0)
    out = torch.zeros(len(responses), width)
    mask = torch.zeros(len(responses), width)
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in range(0, len(prompts), batch_size):
            seqs = [p + r for p, r in zip(prompts[b : b + batch_size], responses[b : b + batch_size])]
            w = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), w), pad_id, dtype=torch.long)
            att = torch.zeros_like(ids)
            for i, s in enumerate(seqs):
                ids[i, : len(s)], att[i, : len(s)] = torch.tensor(s), 1
            logits = model(input_ids=ids.to(device), attention_mask=att.to(device)).logits.float()
            logps = F.log_softmax(logits / temperature, dim=-1)
            for i, (p, r) in enumerate(zip(prompts[b : b + batch_size], responses[b : b + batch_size])):
                if r:
                    pos = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=logps.device)
                    out[b + i, : len(r)] = logps[i, pos, torch.tensor(r, device=logps.device)].cpu()
                    mask[b + i, : len(r)] = 1
    return out, mask


def scored_sequence(prompt: list[int], response: list[int], tokenizer: Any) -> list[int]:
    """What the reward model scores: the rendered prompt, the response's own tokens (stop tokens removed) and the
    turn's closing `<end_of_turn>\n` — the conversation as `posttrain.chat` renders it for RM training, built from
    the sampled ids so that a malformed response is scored as it was sampled rather than refused."""
    from posttrain.generation import stop_ids

    stops = set(stop_ids(tokenizer)) | {tokenizer.pad_token_id}
    tail = tokenizer.encode("<end_of_turn>\n", add_special_tokens=False)
    return list(prompt) + [t for t in response if t not in stops] + tail


def policy_figures(
    policy, reference, reward_model, tokenizer, rows: list[dict], chat: Any, max_new_tokens: int,
    temperature: float = 1.0, batch_size: int = 64, seed: int = 0, keep_rewards: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """On `rows`' prompts, the policy samples one response each (plain temperature): the mean RM reward of those
    responses, KL(π ‖ π_ref) estimated on them (k1 and k3, per sequence), their length and truncation rate
    (and each response's reward under "rewards" with `keep_rewards`)."""
    from posttrain.generation import SamplingConfig, generate, prompt_ids
    from posttrain.reward import score_ids

    prompts = [
        prompt_ids(r["messages"], tokenizer, chat, max_new_tokens, str(r.get("id", "?"))) for r in rows
    ]
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                         batch_size=batch_size, engine="hf")  # fmt: skip
    gens = generate(policy, tokenizer, prompts, cfg, seed=seed)
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    responses = [g.ids + ([] if g.truncated else [end]) for g in gens]
    logp, mask = sequence_logps(policy, prompts, responses, temperature, tokenizer.pad_token_id)
    ref_logp, _ = sequence_logps(reference, prompts, responses, temperature, tokenizer.pad_token_id)
    kl = kl_estimates(logp, ref_logp, mask)
    out = {"kl": kl["k1_seq"], "kl_k3": kl["k3_seq"],
           "length": sum(len(g.ids) for g in gens) / max(len(gens), 1),
           "truncation_rate": sum(g.truncated for g in gens) / max(len(gens), 1)}  # fmt: skip
    if reward_model is not None:
        seqs = [scored_sequence(p, g.ids, tokenizer) for p, g in zip(prompts, gens)]
        rewards = score_ids(reward_model, seqs, tokenizer.pad_token_id, batch_size)
        out["reward"] = sum(rewards) / max(len(rewards), 1)
        if keep_rewards:
            out["rewards"] = rewards
    return out


def win_rate(rewards: list[float], baseline: list[float]) -> float:
    """The share of prompts where `rewards` beats `baseline` (ties count half)."""
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rewards, baseline)]
    return sum(wins) / max(len(wins), 1)


def world_change(before: list[float], after: list[float]) -> dict[str, Any]:
    """The world score of the same prompts before and after, compared prompt by prompt: how many got better and
    how many worse, and whether the difference is beyond noise — a sign test on the prompts that changed
    (|better − worse| > 2 √(better + worse), about 95% under the normal approximation; prompts that did not change
    carry no evidence either way)."""
    if len(before) != len(after):
        raise ValueError(f"world_change: {len(before)} prompts before, {len(after)} after")
    better = sum(b > a for a, b in zip(before, after))
    worse = sum(b < a for a, b in zip(before, after))
    beyond = abs(better - worse) > 2 * (better + worse) ** 0.5
    verdict = "noise" if not beyond else "better" if better > worse else "worse"
    return {"n": len(before), "better": better, "worse": worse, "verdict": verdict}
