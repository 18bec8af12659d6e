"""Token masks for masked video modelling: random, tube, semantic (UMT) and block-wise (BEiT).

Every function returns a bool tensor B x N with True = masked, over the flattened t-major token
order of ``VideoViT`` (N = T * P, P patches per frame). The number of masked tokens is exact:
``round(ratio * P)`` in every frame (``round(ratio * N)`` per sample for ``random_mask``), so
a batch can drop its masked tokens with one reshape.

Randomness comes from an optional ``torch.Generator`` (seedable, and on the device the masks
are drawn on); without one the global RNG is used.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def num_masked(num_tokens: int, ratio: float) -> int:
    """How many of ``num_tokens`` a mask ratio masks: ``round(ratio * num_tokens)``."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    return int(round(ratio * num_tokens))


def _rand(shape: tuple[int, ...], generator: torch.Generator | None,
          device: torch.device | str | None) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator cannot feed CUDA kernels), then move.
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def random_mask(batch_size: int, num_tokens: int, ratio: float,
                generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Mask exactly ``round(ratio * num_tokens)`` uniformly random tokens per sample: B x N."""
    count = num_masked(num_tokens, ratio)
    noise = _rand((batch_size, num_tokens), generator, device)
    chosen = noise.argsort(dim=1)[:, :count]
    mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool, device=noise.device)
    return mask.scatter_(1, chosen, True)


def tube_mask(batch_size: int, num_frames: int, num_patches: int, ratio: float,
              generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """Mask the same random spatial positions in every frame (SMAUG, VideoMAE): B x T*P."""
    frame = random_mask(batch_size, num_patches, ratio, generator, device)
    return frame[:, None, :].expand(batch_size, num_frames, num_patches).reshape(batch_size, -1)


def semantic_mask(attention: torch.Tensor, ratio: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """UMT's attention-guided mask: per frame, sample the visible tokens by teacher attention.

    ``attention`` is B x T x P (the teacher's head-averaged [CLS] -> patch attention in its
    last block). In each frame ``P - round(ratio * P)`` visible tokens are drawn by multinomial
    sampling without replacement with probability proportional to attention, all B*T frames
    in one ``torch.multinomial`` call; the rest are masked. Returns B x T*P.
    """
    if attention.dim() != 3:
        raise ValueError(f"attention must be B x T x P, got shape {tuple(attention.shape)}")
    B, T, P = attention.shape
    visible = P - num_masked(P, ratio)
    mask = torch.ones(B * T, P, dtype=torch.bool, device=attention.device)
    if visible == 0:
        return mask.reshape(B, T * P)
    # Normalise per frame and floor at a tiny weight: multinomial without replacement fails
    # when fewer categories than samples are non-zero (underflowed softmax entries), and an
    # all-zero frame should fall back to uniform sampling rather than crash.
    weights = attention.detach().float().reshape(B * T, P).nan_to_num(0.0).clamp_min(0.0)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-30)
    weights = weights.clamp_min(1e-12)
    if generator is not None and generator.device != weights.device:
        weights = weights.to(generator.device)
    keep = torch.multinomial(weights, visible, replacement=False, generator=generator)
    mask.scatter_(1, keep.to(mask.device), False)
    return mask.reshape(B, T * P)


def reverse_mask(mask: torch.Tensor, time_steps: int) -> torch.Tensor:
    """The mask of the same clips played backwards: B x T*P with its T time steps reversed, so
    the reversed clip shows exactly the patches the original showed."""
    if mask.dim() != 2 or mask.shape[1] % time_steps:
        raise ValueError(f"mask must be B x T*P with T={time_steps}, got shape {tuple(mask.shape)}")
    return mask.reshape(mask.shape[0], time_steps, -1).flip(1).reshape(mask.shape[0], -1)


def _block_frame(rng: random.Random, height: int, width: int, count: int, min_patches: int,
                 log_aspect: tuple[float, float], max_attempts: int = 10,
                 placed: list[tuple[int, int, int, int]] | None = None) -> np.ndarray:
    """One frame of BEiT block-wise masking, topped up to exactly ``count`` masked patches.

    ``placed``, when given, receives each rectangle laid down as (top, left, height, width).
    """
    mask = np.zeros((height, width), dtype=bool)
    masked = 0
    while masked < count:
        remaining = count - masked
        added = 0
        for _ in range(max_attempts):
            area = rng.uniform(min(min_patches, remaining), remaining)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if not (1 <= h <= height and 1 <= w <= width):
                continue
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            block = mask[top:top + h, left:left + w]
            new = int(block.size - block.sum())
            # BEiT's rule: a block may overlap earlier ones but never overshoots the target.
            if 0 < new <= remaining:
                block[:] = True
                added = new
                if placed is not None:
                    placed.append((top, left, h, w))
                break
        if added == 0:
            break
        masked += added
    if masked < count:
        # BEiT stops short when no block fits; grow the existing blocks patch by patch (random
        # unmasked neighbours of masked patches) so every frame masks exactly ``count``.
        for _ in range(count - masked):
            grown = np.zeros_like(mask)
            grown[1:] |= mask[:-1]
            grown[:-1] |= mask[1:]
            grown[:, 1:] |= mask[:, :-1]
            grown[:, :-1] |= mask[:, 1:]
            candidates = np.flatnonzero(grown & ~mask)
            if candidates.size == 0:
                candidates = np.flatnonzero(~mask)
            mask.flat[candidates[rng.randrange(candidates.size)]] = True
    return mask


def block_mask(batch_size: int, num_frames: int, grid: tuple[int, int] | int,
               ratio: float = 0.4, min_patches: int = 16, min_aspect: float = 0.3,
               same_across_frames: bool = False, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """BEiT-style block-wise masking of each frame's h x w patch grid (E-ViLM): B x T*P.

    Rectangles of at least ``min_patches`` patches (aspect ratio log-uniform in
    [min_aspect, 1/min_aspect]) are placed at random until ``round(ratio * h * w)`` patches
    per frame are masked. ``same_across_frames`` repeats one frame's mask over T.
    """
    height, width = (grid, grid) if isinstance(grid, int) else grid
    count = num_masked(height * width, ratio)
    # One seed from the torch generator drives a Python RNG: the per-frame loop is cheap
    # scalar work where torch's per-call overhead would dominate.
    seed_source = torch.randint(2**62, (1,), generator=generator,
                                device=generator.device if generator is not None else "cpu")
    rng = random.Random(int(seed_source.item()))
    log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))
    frames = 1 if same_across_frames else num_frames
    masks = np.stack([_block_frame(rng, height, width, count, min_patches, log_aspect)
                      for _ in range(batch_size * frames)])
    mask = torch.from_numpy(masks).reshape(batch_size, frames, height * width)
    mask = mask.expand(batch_size, num_frames, height * width).reshape(batch_size, -1)
    return mask.to(device)
