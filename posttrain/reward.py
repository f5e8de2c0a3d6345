"""Bradley-Terry reward modelling as pure tensor functions: the loss, reading the reward at the last real token,
the quality gate's figures — the specification the `rm` stage's `RewardTrainer` is tested against
(tests/test_reward.py). The pairs themselves come from `posttrain.data.pairs`.

    P(chosen ≻ rejected) = σ(r(chosen) − r(rejected))
    L = −log σ(r_c − r_r − m) + c · mean((r_c + r_r)²)      m: margin (0 = plain BT), c: reward centring

The reward of a sequence is the scalar head applied to the hidden state of its last real token, found from the
attention mask (transformers' `*ForSequenceClassification` searches for the pad id instead, which is wrong
whenever a pad id occurs in the content or the padding is unusual), with position ids from the mask, so that a
score does not depend on the batch it is in or on the padding side.

With `rm.likelihood_weight` w > 0 the reward also reads the RM's own language model — its decoder's hidden
states through the tied LM head (the input embeddings) — on the final model turn:

    r(x, y) = head(h_last) + w · Σ_t log p(y_t | x, y_<t)          (y: the tokens after the last `<start_of_turn>model\n`)

An RM started from a causal LM then begins from that LM's judgement of each response (how likely it finds it) and
the Bradley-Terry loss trains both terms. The sum, not the mean over tokens: a mean rewards any long, predictable
response (RL against it taught the tiny policy to answer letter-counting questions with the refusal, whose first
token alone is unlikely), while the sum is highest for what the LM itself would answer. The weight and the
model-turn prefix's token ids are kept in the model's config (`posttrain_likelihood_weight`,
`posttrain_response_prefix`), so whatever loads the RM scores the same way.

With `rm.likelihood_targets` c > 0 the reward stays the head alone — the standard read any library makes — and the
starting LM's judgement is taught to the head instead: training adds c × the mean squared distance between the
head's score at every position of the final model turn and TARGET_SCALE × the log-probability the LM the RM was
built from gives that position's token (`likelihood_targets`, from a frozen copy). The targets are dense and
local — a wrong token is unlikely exactly where it stands — so the layers under the head learn where a response
departs from what the LM would say; Bradley-Terry at the last token then has those features to read.
"""

from __future__ import annotations

import math
from typing import Any

from posttrain.logits import padded, token_logps, unwrapped

# ------------------------------------------------------------------------------------------------- maths


def bt_loss(r_chosen, r_rejected, margin=None, center_coef: float = 0.0):
    """Bradley-Terry loss. r_chosen, r_rejected: (B,); margin: (B,) or a float or None.

    Returns (loss, stats) with stats = {"accuracy", "margin" (mean r_c − r_r), "loss"} detached floats."""
    import torch.nn.functional as F

    diff = r_chosen - r_rejected
    m = 0.0 if margin is None else margin
    loss = -F.logsigmoid(diff - m).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    stats = {"accuracy": (diff > 0).float().mean().item(), "margin": diff.mean().item(), "loss": loss.item()}
    return loss, stats


def _position_ids(attention_mask):
    """Positions counted over the real tokens only: a score does not depend on the padding side."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_rewards(model, input_ids, attention_mask, per_position: bool = False, parts: bool = False):
    """Scalar reward per sequence: (B, T), (B, T) → (B,), read at the last position where attention_mask is 1
    (with `per_position`, also the head's score at every position, (B, T): what `likelihood_target_loss` trains).

    The model's own forward runs (through its DDP or DeepSpeed wrapper when training, so that gradients are
    synchronised); its pooled output, which looks for the pad id, is ignored: the per-position scores of the
    `score` head are taken from a hook and read at the mask's last position. With a likelihood weight in the
    model's config, w × the log-likelihood of the final model turn is added, from the same hidden states; with
    `parts`, the two are returned apart instead: (the head's rewards (B,), the log-likelihoods (B,) or None)."""
    import torch

    position_ids = _position_ids(attention_mask)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    base = unwrapped(model)
    hook = base.score.register_forward_hook(lambda _m, inp, out: seen.append((inp[0], out)))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    finally:
        hook.remove()
    hidden, scores = seen[-1]
    T = attention_mask.shape[1]
    last = T - 1 - attention_mask.long().flip(-1).argmax(-1)  # (B,)
    rewards = scores[torch.arange(last.shape[0], device=last.device), last, 0].float()
    w = getattr(base.config, "posttrain_likelihood_weight", 0.0)
    loglik = None
    if w:
        response = response_mask(input_ids, attention_mask, base.config.posttrain_response_prefix)
        loglik = _token_logps(base, hidden, input_ids, response)
    if parts:
        return rewards, loglik
    if w:
        rewards = rewards + w * loglik
    return (rewards, scores[..., 0].float()) if per_position else rewards


def response_mask(input_ids, attention_mask, prefix: list[int]):
    """(B, T) bool: the real tokens after the last occurrence of `prefix` (the final model turn's header) in each
    row. A row without the prefix is an error: its response cannot be found."""
    import torch

    k = len(prefix)
    if input_ids.shape[1] < k:
        hit = torch.zeros(input_ids.shape[0], 0, dtype=torch.bool, device=input_ids.device)
    else:
        windows = input_ids.unfold(1, k, 1)  # (B, T − k + 1, k)
        hit = (windows == torch.tensor(prefix, device=input_ids.device)).all(-1)
        hit &= attention_mask[:, k - 1 :].bool()  # the window's last token is real (padding never matches)
    if not hit.any(-1).all():
        bad = (~hit.any(-1)).nonzero()[:, 0].tolist()
        raise ValueError(f"reward: sequences {bad[:5]} have no model turn (token ids {prefix}) to score")
    start = hit.shape[1] - 1 - hit.long().flip(-1).argmax(-1) + k  # (B,) first response position
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (pos[None, :] >= start[:, None]) & attention_mask.bool()


def _response_token_logps(base, hidden, input_ids, response):
    """log p of each row's `response` tokens under the LM inside a Gemma 2 sequence-classification model: `hidden`
    (B, T, H), the decoder's output, through the tied LM head with the final logit soft-cap, a tile at a time
    (`posttrain.logits`: only the response positions are projected). → (B, T) float, 0 outside `response`."""
    import torch

    emb = base.get_input_embeddings().weight
    cap = getattr(base.config, "final_logit_softcapping", None)
    target = response[:, 1:]  # position t predicts token t + 1
    lp = token_logps(hidden[:, :-1][target], emb, input_ids[:, 1:][target], cap)
    at = torch.zeros_like(response)
    at[:, 1:] = target
    return torch.zeros(input_ids.shape, device=lp.device, dtype=lp.dtype).masked_scatter(at, lp)


def _token_logps(base, hidden, input_ids, response):
    """Σ log p over each row's `response` positions (`_response_token_logps`). → (B,) float."""
    return _response_token_logps(base, hidden, input_ids, response).sum(-1)


# likelihood targets in tenths of a nat: within reach of a new head's first few hundred steps
TARGET_SCALE = 0.1


def likelihood_targets(lm, input_ids, attention_mask, prefix: list[int]):
    """What `rm.likelihood_targets` trains the head toward: at every position t of the final model turn, the
    starting LM's log-probability of its token, log p(y_t | x, y_<t), × TARGET_SCALE.
    `lm`: a frozen copy of the RM as it was built from the causal LM (its added layers the identity), read through
    its tied LM head. → (targets (B, T) float, response mask (B, T) bool); no gradient."""
    import torch

    base = unwrapped(lm)
    with torch.no_grad():
        hidden = base.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=_position_ids(attention_mask)
        ).last_hidden_state
        response = response_mask(input_ids, attention_mask, prefix)
        per_token = _response_token_logps(base, hidden, input_ids, response)
    return per_token.float() * TARGET_SCALE, response


def likelihood_target_loss(scores, targets, response):
    """Mean squared distance between the head's per-position scores and `likelihood_targets` over the response
    positions: dense supervision that teaches the layers under the head, token by token, where a response departs
    from what the LM would say. (B, T) each → scalar."""
    return ((scores - targets)[response] ** 2).mean()


def score_ids(
    model, sequences: list[list[int]], pad_id: int, batch_size: int = 64, left: bool = False
) -> list[float]:
    """Rewards of token sequences, batched (right padding unless `left`), in the order given."""
    return _read_batches(model, sequences, pad_id, batch_size, left)[0]


def _read_batches(
    model, sequences: list[list[int]], pad_id: int, batch_size: int, left: bool, parts: bool = False
) -> tuple[list[float], list[float] | None]:
    """`last_token_rewards` of `sequences` without gradients, in batches of similar length (longest first, so that
    a batch carries little padding), back in the order given: (the reward — the head alone with `parts` — of each
    sequence, and with `parts` the likelihood term of each, or None where the model has none)."""
    import torch

    n = len(sequences)
    order = sorted(range(n), key=lambda i: -len(sequences[i]))
    first: list[float] = [0.0] * n
    second: list[float] | None = [0.0] * n if parts else None
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in range(0, n, batch_size):
            idx = order[b : b + batch_size]
            ids, mask = padded([sequences[i] for i in idx], pad_id, left)
            out = last_token_rewards(model, ids.to(device), mask.to(device), parts=parts)
            head, loglik = out if parts else (out, None)
            if parts and loglik is None:  # the weight is the model's: every batch has the term or none does
                second = None
            heads, logliks = head.tolist(), (loglik.tolist() if second is not None else None)
            for j, i in enumerate(idx):
                first[i] = heads[j]
                if second is not None:
                    second[i] = logliks[j]
    return first, second


def score_parts(
    model, sequences: list[list[int]], pad_id: int, batch_size: int = 64
) -> tuple[list[float], list[float] | None]:
    """The two parts of each sequence's reward, from one forward pass: (the head's score at the last token, the
    likelihood term's Σ log p of the final model turn, or None when the model's config has no likelihood weight).
    `score_ids` gives head + weight × log-likelihood."""
    return _read_batches(model, sequences, pad_id, batch_size, left=False, parts=True)


def lm_response_logps(
    model, sequences: list[list[int]], starts: list[int], ends: list[int], pad_id: int, batch_size: int = 64
) -> list[float]:  # fmt: skip
    """Σ log p(token) over `sequence[start:end]` (the response) under the language model inside a Gemma 2
    sequence-classification model (`_token_logps`) — the starting causal LM's likelihood, where the model was
    built from one and not yet trained (added identity layers change nothing)."""
    import torch

    base = unwrapped(model)
    device = base.get_input_embeddings().weight.device
    out: list[float] = []
    with torch.no_grad():
        for b in range(0, len(sequences), batch_size):
            ids, mask = (t.to(device) for t in padded(sequences[b : b + batch_size], pad_id))
            pos = torch.arange(ids.shape[1], device=device)[None, :]
            lo = torch.tensor(starts[b : b + batch_size], device=device)[:, None]
            hi = torch.tensor(ends[b : b + batch_size], device=device)[:, None]
            h = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
            out += _token_logps(base, h, ids, (pos >= lo) & (pos < hi)).tolist()
    return out


def gate_metrics(r_chosen: list[float], r_rejected: list[float], len_chosen: list[int], len_rejected: list[int],
                 buckets: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)) -> dict[str, Any]:  # fmt: skip
    """Held-out figures: pairwise accuracy, BT loss, correlation of reward with response length, and calibration
    (accuracy and the BT-predicted probability, by |r_c − r_r| bucket)."""
    n = len(r_chosen)
    diffs = [c - r for c, r in zip(r_chosen, r_rejected)]
    acc = sum(d > 0 for d in diffs) / max(n, 1)
    loss = sum(math.log1p(math.exp(-d)) if d > -30 else -d for d in diffs) / max(n, 1)
    rewards, lengths = r_chosen + r_rejected, len_chosen + len_rejected
    calib, edges = [], (0.0,) + buckets + (math.inf,)
    for lo, hi in zip(edges, edges[1:]):
        sel = [d for d in diffs if lo <= abs(d) < hi]
        if sel:
            calib.append({"abs_margin": f"[{lo}, {hi})", "pairs": len(sel),
                          "accuracy": round(sum(d > 0 for d in sel) / len(sel), 4),
                          "predicted": round(sum(1 / (1 + math.exp(-abs(d))) for d in sel) / len(sel), 4)})  # fmt: skip
    return {"pairs": n, "accuracy": round(acc, 4), "loss": round(loss, 4),
            "length_correlation": round(pearson(rewards, lengths), 4), "calibration": calib}  # fmt: skip


def pearson(x: list[float], y: list[float]) -> float:
    n = len(x)
    if n < 2:
        return 0.0
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0
