"""Pieces the evaluation tasks share: eval-mode context, progress bars on rank 0, a loader that
sees every item on every rank, and batching/concatenation of feature dataclasses."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from leanvl.models.base import TextFeatures, VideoFeatures, feature_fields, map_features

Features = TypeVar("Features", VideoFeatures, TextFeatures)


def is_main_process() -> bool:
    """True on rank 0, or when torch.distributed is not initialised."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def progress(iterable: Iterable, desc: str, total: int | None = None, enabled: bool = True
             ) -> Iterable:
    """A tqdm bar over ``iterable`` on rank 0 only (and only when ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False,
                disable=not (enabled and is_main_process()))


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model.eval()`` and ``torch.no_grad()`` for the block; restores the training flag."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def eval_loader(dataset: Dataset, collate, batch_size: int, num_workers: int = 0) -> DataLoader:
    """A sequential loader over the whole dataset, with no distributed sampler: every rank sees
    every item (evaluation here is computed redundantly per rank, see the task docstrings)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                      num_workers=num_workers, drop_last=False,
                      pin_memory=torch.cuda.is_available())


def batches(count: int, size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(count)``, ``size`` at a time."""
    size = max(1, int(size))
    for start in range(0, count, size):
        yield slice(start, min(start + size, count))


def move_features(features: Features, device: torch.device | str | None,
                  dtype: torch.dtype | None = None) -> Features:
    """The features on ``device`` (no copy when already there); floating-point fields cast
    to ``dtype`` when given."""
    if device is None and dtype is None:
        return features

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.to(device, non_blocking=True) if device is not None else tensor

    return map_features(features, move)


def cat_features(parts: Sequence[Features]) -> Features:
    """Concatenate feature batches along the batch dimension (all fields, any subclass).

    Fields named in the class's ``padded_fields`` (text padded to each batch's longest caption)
    are zero-padded to a common length first; padding is invisible behind a zero mask. Any
    other field must have the same shape in every batch.
    """
    if not parts:
        raise ValueError("no feature batches to concatenate")
    first = feature_fields(parts[0])
    padded = set(getattr(type(parts[0]), "padded_fields", ()))
    values: dict[str, Any] = {}
    for name, value in first.items():
        if value is None or not torch.is_tensor(value):
            values[name] = value
            continue
        tensors = [getattr(p, name) for p in parts]
        if name in padded and value.dim() >= 2:
            length = max(t.shape[1] for t in tensors)
            tensors = [_pad_length(t, length) for t in tensors]
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) > 1:
            raise ValueError(f"feature field '{name}' changes shape across batches: "
                             f"{sorted(shapes)}; a model must return a fixed number of tokens")
        values[name] = torch.cat(tensors, dim=0)
    return type(parts[0])(**values)


def _pad_length(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of ``tensor`` to ``length``."""
    missing = length - tensor.shape[1]
    if missing <= 0:
        return tensor
    pad = tensor.new_zeros(tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, pad], dim=1)


def num_rows(features: VideoFeatures | TextFeatures) -> int:
    """Batch size of a feature object."""
    return int(features.embedding.shape[0])


def unwrap_model(model: Any) -> Any:
    """The bare model inside DDP / FSDP-style ``.module`` wrappers and ``torch.compile``, whose
    wrappers do not expose the contract methods (``encode_video``, ``match``, ...)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel | torch.nn.DataParallel):
            model = model.module
        else:
            return model


def has_method(model: Any, name: str) -> bool:
    """Whether the model implements an optional contract method (not just the base stub)."""
    from leanvl.models.base import VideoLanguageModel

    method = getattr(type(model), name, None)
    if method is None:
        return False
    base = getattr(VideoLanguageModel, name, None)
    return base is None or method is not base
