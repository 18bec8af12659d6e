"""Random, tube, semantic and block-wise masks: exact ratios, structure, statistics, determinism."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from leanvl.masking import (
    _block_frame,
    block_mask,
    num_masked,
    random_mask,
    semantic_mask,
    tube_mask,
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_num_masked_rounds_and_validates():
    assert num_masked(196, 0.8) == 157
    assert num_masked(16, 0.5) == 8
    with pytest.raises(ValueError):
        num_masked(10, 1.5)


def test_random_mask_exact_count_per_sample():
    mask = random_mask(8, 100, 0.75, generator(0))
    assert mask.shape == (8, 100) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [75] * 8
    assert not torch.equal(mask[0], mask[1])
    assert torch.equal(mask, random_mask(8, 100, 0.75, generator(0)))
    assert not torch.equal(mask, random_mask(8, 100, 0.75, generator(1)))


def test_tube_mask_identical_across_frames():
    mask = tube_mask(4, 6, 49, 0.5, generator(0)).reshape(4, 6, 49)
    assert torch.all(mask == mask[:, :1])
    assert mask.sum(-1).unique().tolist() == [num_masked(49, 0.5)]
    assert not torch.equal(mask[0, 0], mask[1, 0])


def test_semantic_mask_exact_per_frame_and_deterministic():
    attention = torch.rand(3, 4, 49, generator=generator(5)).softmax(-1)
    mask = semantic_mask(attention, 0.8, generator(0))
    assert mask.shape == (3, 4 * 49) and mask.dtype == torch.bool
    assert mask.reshape(3, 4, 49).sum(-1).unique().tolist() == [num_masked(49, 0.8)]
    assert torch.equal(mask, semantic_mask(attention, 0.8, generator(0)))
    assert not torch.equal(mask, semantic_mask(attention, 0.8, generator(1)))


def test_semantic_mask_keeps_high_attention_tokens():
    # Per frame, 10 "object" tokens hold 20x the attention of the 86 background tokens.
    B, T, P = 50, 4, 96
    attention = torch.ones(B, T, P)
    attention[..., :10] = 20.0
    attention = attention / attention.sum(-1, keepdim=True)
    visible = ~semantic_mask(attention, 0.8, generator(0)).reshape(B, T, P)
    keep_high = visible[..., :10].float().mean().item()
    keep_low = visible[..., 10:].float().mean().item()
    # With 19 visible of 96 and weights 200 : 86, object tokens are drawn first nearly always.
    assert keep_high > 0.85
    assert keep_low < 0.15
    assert keep_high > 6 * keep_low


def test_semantic_mask_uniform_attention_is_like_random():
    attention = torch.full((200, 1, 20), 1 / 20)
    visible = ~semantic_mask(attention, 0.5, generator(3)).reshape(200, 20)
    rate = visible.float().mean(0)
    assert torch.all((rate > 0.35) & (rate < 0.65))


def test_semantic_mask_survives_zero_and_underflowed_attention():
    attention = torch.zeros(2, 2, 16)
    attention[0, 0, 3] = 1.0  # one non-zero entry but 8 visible tokens to draw
    mask = semantic_mask(attention, 0.5, generator(0)).reshape(2, 2, 16)
    assert mask.sum(-1).unique().tolist() == [8]
    assert not mask[0, 0, 3]
    assert semantic_mask(attention, 1.0).all()


def test_masks_of_a_full_size_batch_keep_their_ratio_per_sample():
    # a B/16 batch (64 clips x 8 frames x 196 patches): every sample gets its own mask
    attention = torch.rand(64, 8, 196).softmax(-1)
    semantic = semantic_mask(attention, 0.8, generator(0)).reshape(64, 8, 196)
    assert (semantic.sum(-1) == round(0.8 * 196)).all()
    random = random_mask(64, 8 * 196, 0.8, generator(0))
    assert (random.sum(-1) == round(0.8 * 8 * 196)).all()
    tube = tube_mask(64, 8, 196, 0.8, generator(0)).reshape(64, 8, 196)
    assert (tube == tube[:, :1]).all() and (tube[:, 0].sum(-1) == round(0.8 * 196)).all()
    assert len({tuple(row.tolist()) for row in tube[:, 0]}) > 1  # not one mask for all
    blocks = block_mask(64, 8, 14, 0.4, generator=generator(0))
    assert blocks.shape[0] == 64 and blocks.reshape(64, -1).any(-1).all()


def test_block_mask_exact_blocky_and_deterministic():
    mask = block_mask(16, 4, (14, 14), 0.4, generator=generator(0))
    assert mask.shape == (16, 4 * 196)
    frames = mask.reshape(64, 14, 14)
    assert frames.flatten(1).sum(1).unique().tolist() == [num_masked(196, 0.4)]
    # Block-wise: almost every masked patch has a masked 4-neighbour (random masking at 40%
    # would leave about 13% of them isolated).
    padded = torch.nn.functional.pad(frames, (1, 1, 1, 1))
    neighbours = (padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1]
                  | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:])
    isolated = (frames & ~neighbours).sum().item() / frames.sum().item()
    assert isolated < 0.02
    assert not torch.equal(frames[0], frames[1])  # frames masked independently
    assert torch.equal(mask, block_mask(16, 4, (14, 14), 0.4, generator=generator(0)))
    same = block_mask(2, 3, 8, 0.4, same_across_frames=True, generator=generator(0))
    same = same.reshape(2, 3, 64)
    assert torch.all(same == same[:, :1]) and same.sum(-1).unique().tolist() == [26]


def test_block_mask_is_made_of_rectangles():
    """Each frame is the union of the rectangles it lays down (at least ``min_patches`` each,
    unless fewer remain), plus, only where no rectangle fits the remainder, single patches
    that touch the blocks."""
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    rng, exact = random.Random(0), 0
    for _ in range(200):
        placed: list[tuple[int, int, int, int]] = []
        mask = _block_frame(rng, 14, 14, 78, 16, log_aspect, placed=placed)
        union, laid = np.zeros_like(mask), 0
        for top, left, h, w in placed:
            assert 0 <= top and top + h <= 14 and 0 <= left and left + w <= 14
            assert h * w >= min(16, 78 - laid) * 0.5  # rounding h and w from a sampled area
            laid += int((~union[top:top + h, left:left + w]).sum())
            union[top:top + h, left:left + w] = True
        assert mask.sum() == 78 and (union <= mask).all()
        extra = mask & ~union
        exact += not extra.any()
        padded = np.pad(mask, 1)
        touching = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        assert touching[extra].all()  # grown from the blocks, not scattered
    assert exact >= 190  # at 14 x 14 rectangles nearly always fill the frame (200 of 200 here)


def test_block_mask_small_grid_exact():
    mask = block_mask(32, 2, (4, 6), 0.4, generator=generator(2))
    assert mask.reshape(64, 24).sum(1).unique().tolist() == [num_masked(24, 0.4)]
