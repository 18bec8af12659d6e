"""Epoch iteration over the training loader that can start in the middle of an epoch, exactly.

Resumption needs the same batches, in the same order, as the run that was interrupted. Two
things make that so:

1. Every epoch's order is a pure function of (seed, epoch): ``set_epoch`` goes to the loader,
   its sampler and its dataset (``DistributedSampler`` and the datasets' per-sample draws are
   already keyed on the epoch), and a shuffling DataLoader's generator is re-seeded with
   ``initial seed + epoch`` at the start of each epoch (a ``RandomSampler`` without a
   generator gets one, so it no longer draws from the global torch RNG).
2. Batches already consumed are skipped at the *index* level: each DataLoader is rebuilt once
   around a batch sampler that drops the first ``skip`` index lists, so skipped clips are
   never decoded. ``MixedLoader`` schedules are replayed the same way per child loader.
   Loaders this module does not know (iterable datasets, custom iterables) get ``set_epoch``
   and have their first ``skip`` batches read and discarded.

The trainer iterates through this wrapper in fresh and resumed runs alike, so both draw from
the generators identically.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, Sampler

log = logging.getLogger(__name__)
_END = object()


class SkippingSampler(Sampler):
    """Wraps a (batch) sampler; iterations drop its first ``skip`` items.

    ``skip`` stays set until changed (DataLoader iterators may call ``iter`` on their sampler
    more than once while starting), so whoever opens an epoch sets it every time.
    """

    def __init__(self, inner: Iterable):
        self.inner = inner
        self.skip = 0

    def __iter__(self) -> Iterator:
        return self._iterate(self.skip)

    def _iterate(self, skip: int) -> Iterator:
        iterator = iter(self.inner)
        for _ in range(skip):
            if next(iterator, _END) is _END:
                return
        yield from iterator

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]


def _is_mixed(loader: Any) -> bool:
    return isinstance(getattr(loader, "loaders", None), dict) and callable(
        getattr(loader, "schedule", None))


def _set_epoch(targets: Iterable[Any], epoch: int) -> None:
    done: set[int] = set()
    for target in targets:
        if target is not None and id(target) not in done and hasattr(target, "set_epoch"):
            target.set_epoch(epoch)
            done.add(id(target))


class _Child:
    """One DataLoader, rebuilt around a SkippingSampler (or read-and-discard for streams)."""

    def __init__(self, loader: Any, seed: int):
        self.loader = loader
        self.generator: torch.Generator | None = None
        self.base_seed = seed
        self.clone: DataLoader | None = None
        self.skipper: SkippingSampler | None = None
        if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
            return
        self.generator = loader.generator
        if self.generator is None:
            self.generator = torch.Generator()
        else:
            self.base_seed = self.generator.initial_seed()
        sampler = loader.sampler
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            sampler.generator = self.generator  # else it would draw from the global torch RNG
        batched = loader.batch_sampler is not None
        self.skipper = SkippingSampler(loader.batch_sampler if batched else sampler)
        options = dict(num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                       pin_memory=loader.pin_memory, timeout=loader.timeout,
                       worker_init_fn=loader.worker_init_fn,
                       multiprocessing_context=loader.multiprocessing_context,
                       generator=self.generator, prefetch_factor=loader.prefetch_factor,
                       persistent_workers=loader.persistent_workers,
                       pin_memory_device=loader.pin_memory_device)
        if hasattr(loader, "in_order"):
            options["in_order"] = loader.in_order
        if batched:
            self.clone = DataLoader(loader.dataset, batch_sampler=self.skipper, **options)
        else:
            self.clone = DataLoader(loader.dataset, batch_size=None, sampler=self.skipper,
                                    **options)

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        """Epoch-keyed order: set_epoch on sampler/dataset, generator re-seeded."""
        sampler = getattr(self.loader, "sampler", None)
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        _set_epoch([self.loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None),
                    getattr(self.loader, "dataset", None)], epoch)
        if self.generator is not None:
            self.generator.manual_seed(self.base_seed + epoch)

    def open(self, skip: int = 0) -> Iterator:
        """A fresh pass over the loader without its first ``skip`` batches."""
        if self.clone is not None:
            self.skipper.skip = skip
            return iter(self.clone)
        iterator = iter(self.loader)
        for _ in range(skip):
            if next(iterator, _END) is _END:
                break
        return iterator


class ResumableBatches:
    """The training loader, iterated one epoch at a time from any batch offset."""

    def __init__(self, loader: Any, seed: int = 0):
        self.loader = loader
        self.mixed = _is_mixed(loader)
        if self.mixed:
            self.children = {name: _Child(child, seed) for name, child in loader.loaders.items()}
        else:
            self.children = {"": _Child(loader, seed)}

    def __len__(self) -> int:
        """Batches per epoch on this process (TypeError when the loader has no length)."""
        return len(self.loader)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[Any]:
        """Iterate epoch ``epoch``, starting after its first ``skip`` batches."""
        if self.mixed:
            _set_epoch([self.loader], epoch)
        for child in self.children.values():
            child.set_epoch(epoch)
        if not self.mixed:
            return self.children[""].open(skip)
        return self._mixed(skip)

    def _mixed(self, skip: int) -> Iterator[Any]:
        schedule = self.loader.schedule()
        iterators: dict[str, Iterator] = {name: self._positioned(name, count)
                                          for name, count in Counter(schedule[:skip]).items()}
        for name in schedule[skip:]:
            if name not in iterators:
                iterators[name] = self.children[name].open()
            batch = next(iterators[name], _END)
            if batch is _END:  # the schedule asks for more batches than one pass holds
                iterators[name] = self.children[name].open()
                batch = next(iterators[name])
            batch["source"] = name
            yield batch

    def _positioned(self, name: str, count: int) -> Iterator:
        """An iterator over child ``name`` as it stands after ``count`` of its batches,
        re-opening it after each full pass as an uninterrupted epoch would."""
        child = self.children[name]
        per_pass = max(1, len(child))
        iterator: Iterator = iter(())
        while count > 0:
            take = min(count, per_pass)
            count -= take
            iterator = child.open(take)
            if count > 0:
                for _ in iterator:  # drives the sampler through the pass the run finished
                    pass
        return iterator
