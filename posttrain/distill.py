"""Token-level divergences between a student and a teacher, for on-policy distillation (the `distill` stage), as
pure tensor functions: the specification TRL's `DistillationTrainer` loss is tested against (tests/test_distill.py).

On the student's own samples, per trained position t, with p_s = softmax(cap(z_s) / T), p_t = softmax(cap(z_t) / T)
and cap(z) = c · tanh(z / c) (Gemma 2's final logit soft-cap, c = 30; no cap when c is None):

    forward  (β = 0):  KL(p_t ‖ p_s) = Σ_v p_t(v) (log p_t(v) − log p_s(v))       mass-covering
    reverse  (β = 1):  KL(p_s ‖ p_t)                                              mode-seeking
    JSD_β  (0 < β < 1): β · KL(p_t ‖ m) + (1 − β) · KL(p_s ‖ m),  m = β · p_t + (1 − β) · p_s

(the generalised JSD of GKD, Agarwal et al. 2024, with TRL's convention for β), averaged over the positions where
`mask` is 1. The soft-cap is applied before the temperature, as Gemma 2 computes its logits; a teacher whose cap is
left out is a different distribution from the one it was trained with.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from posttrain.config import Divergence

if TYPE_CHECKING:
    import torch


def capped_log_probs(
    logits: torch.Tensor, softcap: float | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """(…, V) logits → (…, V) log-probabilities after the soft-cap and the temperature."""
    import torch
    import torch.nn.functional as F

    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.log_softmax(z / temperature, dim=-1)


def beta_of(kind: Divergence, beta: float = 0.5) -> float:
    return {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, beta)


def token_divergence(log_ps: torch.Tensor, log_pt: torch.Tensor, beta: float) -> torch.Tensor:
    """(…, V), (…, V) log-probs → (…) divergence per position (see the module docstring for β)."""
    import torch

    if beta == 0.0:
        return (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    if beta == 1.0:
        return (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_pt + math.log(beta), log_ps + math.log(1 - beta)]), dim=0)
    kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
    kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    kind: Divergence = "jsd",
    beta: float = 0.5,
    temperature: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Student logits (B, T, V), teacher logits (B, T, V), mask (B, T) → (mean divergence over masked positions,
    stats {"divergence", "tokens", "student_entropy"}). Gradients flow to the student only."""
    import torch

    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"student and teacher vocabularies differ ({student_logits.shape[-1]} vs {teacher_logits.shape[-1]} "
            "logits); distillation needs the same tokenizer"
        )
    log_ps = capped_log_probs(student_logits, student_softcap, temperature)
    with torch.no_grad():
        log_pt = capped_log_probs(teacher_logits, teacher_softcap, temperature)
    per_token = token_divergence(log_ps, log_pt, beta_of(kind, beta))  # (B, T)
    m = mask.to(per_token.dtype)
    n = m.sum().clamp(min=1)
    loss = (per_token * m).sum() / n
    with torch.no_grad():
        entropy = (-(log_ps.exp() * log_ps).sum(-1) * m).sum() / n
    return loss, {"divergence": loss.item(), "tokens": int(m.sum().item()), "student_entropy": entropy.item()}
