"""Log-probabilities of given tokens under a causal LM without a (positions × vocabulary) tensor.

Gemma's vocabulary has 256,000 entries: one fp32 logits tensor for a micro-batch of 4,096 positions is 4 GiB, and
RL, the reward model's terms and the evaluation would each form several. Here the positions are selected first,
the backbone gives their hidden states, and the (tied) LM head projects them a tile at a time — at most
`TOKEN_TILE` positions × `VOCAB_TILE` entries — with the model's final logit soft-cap and the temperature applied
inside each tile, folded into a running log-sum-exp (TRL's `ChunkedLogProbFunction`, the kernel TRL's SFT and
RLOO trainers use; it has a backward, so it serves training too). No code of the project forms a tensor of more
than `LOGITS_CHUNK` positions × the vocabulary.

    log p(y_t | x, y_<t) = z_t[y_t] − logsumexp_v z_t[v],   z_t = cap(h_t · Wᵀ) / T,   cap(z) = c · tanh(z / c)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LOGITS_CHUNK = 1024  # positions: the largest (positions × vocabulary) block formed (TRL's tiles are smaller)
TOKEN_TILE = 4096  # TRL's tile height (`trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE`)
VOCAB_TILE = (
    32768  # the tile width on a GPU: TOKEN_TILE × VOCAB_TILE ≈ 524 × 256,000 < LOGITS_CHUNK × 256,000
)
CPU_VOCAB_TILE = 8192  # on a CPU the fold runs in torch, with several tile-sized temporaries: a narrower tile


def vocab_tile(device) -> int:
    """The tile width for a device: TRL's on a GPU (its Triton kernel folds a tile in place), narrower on a CPU."""
    return VOCAB_TILE if getattr(device, "type", device) == "cuda" else CPU_VOCAB_TILE


def match_trl_tiles(device) -> int:
    """Set the tile width of TRL's own tiled kernels — the fused LM head of its SFT and RLOO trainers
    (`trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE`) and the distillation divergence
    (`trl.kernels.chunked_divergence.VOCAB_CHUNK_SIZE`), both read when a kernel runs — to `vocab_tile(device)`.
    At TRL's 32,768 entries a CPU fold of 4,096 positions holds about 4 GiB of temporaries. Returns the width."""
    import trl.kernels.chunked_divergence as divergence
    import trl.trainer.utils as trl_utils

    width = vocab_tile(device)
    if not hasattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE") or not hasattr(divergence, "VOCAB_CHUNK_SIZE"):
        raise RuntimeError("this TRL version has no tile widths to set; check posttrain.logits against it")
    trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = width
    divergence.VOCAB_CHUNK_SIZE = width
    return width


def padded(sequences: list[list[int]], pad_id: int, left: bool = False):
    """Token sequences → (B, T) ids padded with `pad_id` (right padding unless `left`) and their attention mask."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        sl = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


def token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """(N, H) hidden states, (V, H) LM head, (N,) target ids → (N,) fp32 log-probabilities of the targets under
    softmax(cap(h · Wᵀ) / T), a tile at a time. Differentiable in `hidden` and `weight`."""
    import torch
    from trl.kernels import ChunkedLogProbFunction

    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    logps, *_ = ChunkedLogProbFunction.apply(
        hidden, weight, None, targets, temperature, vocab_tile(hidden.device), softcap, 1.0, ()
    )
    return logps


def unwrapped(model):
    """The transformers model inside a DDP or DeepSpeed wrapper (which keep it in `.module`)."""
    return getattr(model, "module", model)


def lm_head(model) -> tuple[torch.Tensor, float | None]:
    """A causal LM's output projection (V, H) and its final logit soft-cap (None when it has none)."""
    model = unwrapped(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return model.get_output_embeddings().weight, getattr(config, "final_logit_softcapping", None)


def backbone(model):
    """The decoder under a `*ForCausalLM` / `*ForSequenceClassification` head (`Gemma2Model` for Gemma 2)."""
    model = unwrapped(model)
    return getattr(model, model.base_model_prefix)
