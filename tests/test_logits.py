"""Token log-probabilities a tile at a time (`posttrain.logits`) against the full (positions × vocabulary)
computation they replace, values and gradients, with Gemma 2's soft-cap and a temperature."""

from __future__ import annotations

import pytest
import torch

from posttrain.logits import LOGITS_CHUNK, TOKEN_TILE, VOCAB_TILE, padded, token_logps


def _full(hidden, weight, targets, cap, temperature):
    z = hidden @ weight.T
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    return torch.log_softmax(z / temperature, -1).gather(-1, targets[:, None])[:, 0]


@pytest.mark.parametrize("cap, temperature", [(None, 1.0), (30.0, 1.0), (30.0, 0.7)])
def test_tiled_log_probs_equal_the_full_softmax_across_vocabulary_tiles(cap, temperature):
    g = torch.Generator().manual_seed(0)
    vocab = VOCAB_TILE * 2 + 123  # three vocabulary tiles, the last one partial
    hidden = (torch.randn(37, 8, generator=g) * 3).requires_grad_(True)
    weight = torch.randn(vocab, 8, generator=g).requires_grad_(True)
    targets = torch.randint(0, vocab, (37,), generator=g)
    targets[0], targets[1] = 0, vocab - 1  # the first and the last entry of the vocabulary
    ours = token_logps(hidden, weight, targets, cap, temperature)
    ref = _full(hidden, weight, targets, cap, temperature)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    g_ours = torch.autograd.grad(ours.sum(), (hidden, weight))
    g_ref = torch.autograd.grad(ref.sum(), (hidden, weight))
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g_ours, g_ref))


def test_no_positions_give_no_log_probs():
    assert token_logps(torch.zeros(0, 4), torch.zeros(10, 4), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_the_largest_tile_is_below_a_chunk_of_the_real_vocabulary():
    # TRL's tile (4,096 positions × 32,768 entries) against the project's bound (1,024 positions × 256,000)
    assert TOKEN_TILE * VOCAB_TILE < LOGITS_CHUNK * 256_000


def test_padding_left_and_right_by_hand():
    ids, mask = padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = padded([[5, 6, 7], [8]], pad_id=0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
