"""Clip transforms on tensors (no PIL per frame): resize, random-resized crop, flip, normalise.

A clip is a uint8 tensor ``T x 3 x H x W``; every frame of a clip gets the same crop and flip.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from leanvl.config import NORMALIZATIONS


def resolve_normalization(name: str, mean: Sequence[float] | None = None,
                          std: Sequence[float] | None = None) -> tuple[tuple, tuple]:
    """Mean/std for ``clip`` or ``imagenet``, or the given values for ``custom``."""
    if name in NORMALIZATIONS:
        return NORMALIZATIONS[name]
    if name == "custom" and mean is not None and std is not None:
        return tuple(mean), tuple(std)
    raise ValueError(f"unknown normalization {name!r}; expected clip, imagenet or custom "
                     "(with mean and std)")


def to_tensor_clip(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``T x H x W x 3`` (numpy or tensor) to uint8 ``T x 3 x H x W``."""
    clip = torch.as_tensor(frames)
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"expected frames T x H x W x 3, got {tuple(clip.shape)}")
    return clip.permute(0, 3, 1, 2).contiguous()


def _resize(clip: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(clip.shape[-2:]) == size:
        return clip.float()
    return F.interpolate(clip.float(), size=size, mode="bilinear", align_corners=False,
                         antialias=True)


def random_resized_crop_box(height: int, width: int, scale: Sequence[float],
                            ratio: Sequence[float], rng: np.random.Generator
                            ) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering ``scale`` of the area with aspect in ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)  # fall back to a centre square
    return (height - side) // 2, (width - side) // 2, side, side


class ClipTransform:
    """Training: random-resized crop (+ optional flip); evaluation: resize + centre crop.

    Returns float ``T x 3 x size x size`` normalised with ``mean``/``std`` (0-1 scale).
    """

    def __init__(self, size: int, train: bool, mean: Sequence[float], std: Sequence[float],
                 crop_scale: Sequence[float] = (0.5, 1.0), flip: bool = False,
                 ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.size, self.train, self.flip = int(size), train, flip
        self.crop_scale, self.ratio = tuple(crop_scale), tuple(ratio)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255

    def __call__(self, clip: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Transform one uint8 ``T x 3 x H x W`` clip."""
        if clip.ndim != 4 or clip.shape[1] != 3:
            raise ValueError(f"expected a clip T x 3 x H x W, got {tuple(clip.shape)}")
        height, width = clip.shape[-2:]
        if self.train:
            rng = rng if rng is not None else np.random.default_rng()
            top, left, h, w = random_resized_crop_box(height, width, self.crop_scale,
                                                      self.ratio, rng)
            clip = _resize(clip[..., top:top + h, left:left + w], (self.size, self.size))
            if self.flip and rng.random() < 0.5:
                clip = clip.flip(-1)
        else:
            scale = self.size / min(height, width)
            new = (max(self.size, round(height * scale)), max(self.size, round(width * scale)))
            clip = _resize(clip, new)
            top, left = (new[0] - self.size) // 2, (new[1] - self.size) // 2
            clip = clip[..., top:top + self.size, left:left + self.size]
        return (clip - self.mean) / self.std

    def denormalize(self, clip: torch.Tensor) -> torch.Tensor:
        """Back to uint8 ``T x 3 x H x W`` for pictures."""
        return (clip * self.std + self.mean).round().clamp(0, 255).to(torch.uint8)
