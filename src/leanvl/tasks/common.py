"""Pieces the evaluation tasks share: eval-mode context, progress bars on rank 0, a sequential
loader, batching/concatenation of feature dataclasses, and the split of evaluation work over the
ranks of a process group (``shard`` / ``shard_dataset`` give a rank its rows, ``gather_rows`` /
``gather_features`` put every rank's rows back together in order)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader, Dataset

from leanvl.engine import distributed
from leanvl.engine.precision import full_precision
from leanvl.models.base import TextFeatures, VideoFeatures, feature_fields, map_features

Features = TypeVar("Features", VideoFeatures, TextFeatures)


def progress(iterable: Iterable, desc: str, total: int | None = None, enabled: bool = True
             ) -> Iterable:
    """A tqdm bar over ``iterable`` on rank 0 only (and only when ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False,
                disable=not (enabled and distributed.is_main()))


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
    """A sequential loader over the whole of ``dataset``, with no distributed sampler (to split
    the work, pass this rank's block from ``shard_dataset``)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate,
                      num_workers=num_workers, drop_last=False,
                      pin_memory=torch.cuda.is_available())


def batches(stop: int, size: int, start: int = 0) -> Iterator[slice]:
    """Consecutive slices covering ``range(start, stop)``, ``size`` at a time."""
    size = max(1, int(size))
    for first in range(start, stop, size):
        yield slice(first, min(first + size, stop))


def shard_sizes(count: int) -> list[int]:
    """How many of ``count`` rows each rank handles: contiguous blocks whose sizes differ by at
    most one; ``[count]`` without a process group or when there are fewer rows than ranks
    (every rank then handles all of them)."""
    world = distributed.world_size()
    if world == 1 or count < world:
        return [count]
    return [(r + 1) * count // world - r * count // world for r in range(world)]


def shard(count: int) -> slice:
    """This rank's block of ``range(count)`` (see ``shard_sizes``)."""
    sizes = shard_sizes(count)
    if len(sizes) == 1:
        return slice(0, count)
    rank = distributed.rank()
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def shard_dataset(dataset: Dataset) -> tuple[Dataset, slice]:
    """This rank's block of an evaluation dataset (a ``Subset``, or the dataset itself when the
    rank has all of it) and its slice of the dataset's indices. Samples keep their dataset
    ``index``. Streamed datasets (WebDataset shards) cannot be split into exact blocks: under a
    process group of several ranks every rank raises the same ``ValueError``."""
    from torch.utils.data import IterableDataset, Subset

    if isinstance(dataset, IterableDataset) and distributed.world_size() > 1:
        raise ValueError("evaluation under torchrun splits the items of an annotation file over "
                         "the ranks; streamed WebDataset shards cannot be split exactly: give "
                         "data.test as an annotation file, or evaluate the shards in one process")
    mine = shard(len(dataset))
    if mine.stop - mine.start == len(dataset):
        return dataset, mine
    return Subset(dataset, range(mine.start, mine.stop)), mine


def gather_rows(tensor: torch.Tensor, count: int, pad_dim1: bool = False,
                chunk_bytes: int = 256 * 2**20) -> torch.Tensor:
    """Every rank's ``tensor`` (its ``shard(count)`` rows) concatenated in rank order: all
    ``count`` rows, on every rank, on ``tensor``'s device. Dims after the first must agree
    across ranks, except dim 1 with ``pad_dim1`` (text padded to its longest caption), which is
    zero-padded to the longest. A no-op without sharding.

    Rows travel ``chunk_bytes`` per rank at a time, which bounds the extra memory; with NCCL,
    which moves CUDA tensors only, features kept on the CPU are never all on the GPU at once.
    """
    import torch.distributed as dist

    sizes = shard_sizes(count)
    if len(sizes) == 1:
        return tensor
    rank = distributed.rank()
    if tensor.shape[0] != sizes[rank]:
        raise ValueError(f"gather_rows: this rank holds {tensor.shape[0]} rows, its shard of "
                         f"{count} is {sizes[rank]}")
    if dist.get_backend() == "nccl":
        comm = tensor.device if tensor.is_cuda else distributed.select_device()
    else:
        comm = torch.device("cpu")
    # every rank learns every rank's trailing shape, so all of them raise (or pad) alike
    shape = torch.tensor([tensor.dim(), *tensor.shape[1:]] + [0] * (8 - tensor.dim()),
                         device=comm)
    shapes = [torch.empty_like(shape) for _ in sizes]
    dist.all_gather(shapes, shape)
    shapes = [tuple(s[1:int(s[0])].tolist()) for s in shapes]
    if pad_dim1 and tensor.dim() >= 2:
        length = max(s[0] for s in shapes)
        shapes = [(length, *s[1:]) for s in shapes]
        tensor = _pad_length(tensor, length)
    if len(set(shapes)) > 1:
        raise ValueError(f"gather_rows: the ranks' rows have different shapes {shapes}; a "
                         "model must return the same number of tokens for every clip")
    part = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    rows = max(sizes)
    if part.shape[0] < rows:
        part = torch.cat([part, part.new_zeros(rows - part.shape[0], *part.shape[1:])])
    row_bytes = max(1, part[:1].numel() * part.element_size())
    step = max(1, chunk_bytes // row_bytes)
    pieces: list[list[torch.Tensor]] = [[] for _ in sizes]
    for start in range(0, rows, step):
        block = part[start:start + step].to(comm).contiguous()
        received = [torch.empty_like(block) for _ in sizes]
        dist.all_gather(received, block)
        for mine, got, size in zip(pieces, received, sizes, strict=True):
            if start < size:
                mine.append(got[:size - start].to(tensor.device))
    return torch.cat([piece for rank_pieces in pieces for piece in rank_pieces]).to(tensor.dtype)


def gather_features(features: Features, count: int) -> Features:
    """``gather_rows`` over every tensor field of a feature dataclass (its ``padded_fields``
    padded in dim 1)."""
    padded = set(getattr(type(features), "padded_fields", ()))
    values = {name: gather_rows(value, count, pad_dim1=name in padded)
              if torch.is_tensor(value) else value
              for name, value in feature_fields(features).items()}
    return type(features)(**values)


def move_features(features: Features, device: torch.device | str | None,
                  dtype: torch.dtype | None = None) -> Features:
    """The features on ``device`` (no copy when already there); floating-point fields cast
    to ``dtype`` when given."""
    if device is None and dtype is None:
        return features
    # asynchronous copies only towards a GPU: a non-blocking copy to the CPU may still be in
    # flight when the CPU reads the result
    non_blocking = device is not None and torch.device(device).type == "cuda"

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.to(device, non_blocking=non_blocking) if device is not None else tensor

    return map_features(features, move)


def float32_similarity(model, video: VideoFeatures, text: TextFeatures,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """``model.similarity(video, text)`` on float32 copies of the features with autocast off
    (on ``device``, default where the text features are): under bf16 autocast, cosine /
    temperature values near 10 are rounded to steps of 1/16, and the pessimistic tie rule of
    every ranking metric would count the ties as misses."""
    device = text.embedding.device if device is None else device
    with torch.no_grad(), full_precision(torch.device(device)):
        return model.similarity(move_features(video, device, torch.float32),
                                move_features(text, device, torch.float32)).float()


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
