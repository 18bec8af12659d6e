"""WebDataset tar shards: ``key.mp4`` (the video's bytes) + ``key.json`` (its record).

``write_shards`` packs an annotation file's records into shards and writes ``shards.json``
(shard names and sample counts). ``ShardDataset`` streams them back through the same
``SampleBuilder`` as the file datasets, split by node and by DataLoader worker, or resampled
with replacement (each worker draws shards at random: pre-training on a large corpus).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from leanvl.data.annotations import atomic_write_text, load_annotations, media_path
from leanvl.data.datasets import ClipReader, SampleBuilder, TooManyBadSamples
from leanvl.data.transforms import ClipTransform, resolve_normalization
from leanvl.data.video import VideoDecodeError

log = logging.getLogger(__name__)
MEDIA_KEYS = ("mp4", "webm", "mkv", "avi", "mov", "jpg", "jpeg", "png")


def write_shards(annotations: str | os.PathLike, root: str | os.PathLike | None,
                 out_dir: str | os.PathLike, max_count: int = 1000,
                 max_size: int = 1 << 30, prefix: str = "shard", progress: bool = True
                 ) -> dict[str, Any]:
    """Pack records and their media into tar shards; returns the index written to shards.json.

    Missing media are skipped and counted (listed in the index), never packed.
    """
    import webdataset as wds
    from tqdm import tqdm

    records = load_annotations(annotations)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing: list[str] = []
    counts: dict[str, int] = {}
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0) as writer:
        for index, record in enumerate(tqdm(records, desc="shards", disable=not progress)):
            path = media_path(record, root)
            if not path.is_file() or path.stat().st_size == 0:
                missing.append(str(path))
                continue
            extension = path.suffix.lstrip(".").lower() or "mp4"
            if extension not in MEDIA_KEYS:
                raise ValueError(f"{annotations}: record {index}: unsupported media type "
                                 f"'.{extension}' ({path})")
            writer.write({"__key__": f"{index:09d}", extension: path.read_bytes(),
                          "json": json.dumps(record).encode()})
            shard = Path(writer.fname).name
            counts[shard] = counts.get(shard, 0) + 1
    index = {"annotations": str(annotations), "samples": sum(counts.values()),
             "shards": [{"name": name, "samples": n} for name, n in sorted(counts.items())],
             "missing": missing}
    atomic_write_text(out_dir / "shards.json", json.dumps(index, indent=1) + "\n")
    return index


def shard_urls(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Expand a shard folder (via its shards.json), a brace pattern, or a list to tar paths."""
    if not isinstance(spec, (str, os.PathLike)):
        return [str(s) for s in spec]
    spec = str(spec)
    folder = Path(spec)
    if folder.is_dir():
        index = folder / "shards.json"
        if index.is_file():
            names = [s["name"] for s in json.loads(index.read_text())["shards"]]
        else:
            names = sorted(p.name for p in folder.glob("*.tar"))
        urls = [str(folder / name) for name in names]
    else:
        import braceexpand

        urls = list(braceexpand.braceexpand(spec))
    if not urls:
        raise FileNotFoundError(f"no shards found for {spec!r}")
    return urls


class ShardDataset(IterableDataset):
    """Stream samples from shards; bad media are skipped and reported in ``sample["skipped"]``."""

    def __init__(self, shards: str | Sequence[str], kind: str = "retrieval",
                 num_frames: int = 4, sampling: str = "rand", size: int = 224, train: bool = True,
                 normalization: str = "clip", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, crop_scale: Sequence[float] = (0.5, 1.0),
                 flip: bool = False, backend: str = "pyav", seed: int = 0,
                 resampled: bool | None = None, shuffle: int = 1000,
                 answers: Sequence[str] | None = None, classes: Sequence | None = None,
                 samples_per_epoch: int | None = None):
        self.urls = shard_urls(shards)
        mean, std = resolve_normalization(normalization, mean, std)
        reader = ClipReader(None, num_frames, sampling,
                            ClipTransform(size, train, mean, std, crop_scale, flip), backend)
        self.builder = SampleBuilder(kind, reader, train, answers, classes)
        self.train, self.seed, self.epoch = train, seed, 0
        self.resampled = train if resampled is None else resampled
        self.shuffle = shuffle if train else 0
        self.samples_per_epoch = samples_per_epoch
        if samples_per_epoch is None:
            self.samples_per_epoch = _count_samples(self.urls)

    def set_epoch(self, epoch: int) -> None:
        """Change shard order and random draws for a new epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Samples per epoch over all ranks and workers (from shards.json when present)."""
        if self.samples_per_epoch is None:
            raise TypeError("shard count unknown: no shards.json; pass samples_per_epoch")
        return self.samples_per_epoch

    def _pipeline(self):
        import webdataset as wds

        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker else 0
        rank = torch.distributed.get_rank() if torch.distributed.is_available() \
            and torch.distributed.is_initialized() else 0
        seed = [self.seed, self.epoch, rank, worker_id]
        if self.resampled:
            source = wds.ResampledShards(self.urls, seed=int(np.random.default_rng(seed).integers(2**31)),
                                         deterministic=True)
            stages = [source]
        else:
            stages = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker]
        stages += [wds.tarfile_to_samples()]
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle, rng=random.Random(str(seed))))
        return wds.DataPipeline(*stages), np.random.default_rng(seed)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pipeline, rng = self._pipeline()
        per_worker = None
        if self.resampled and self.samples_per_epoch:
            worker = torch.utils.data.get_worker_info()
            world = torch.distributed.get_world_size() if torch.distributed.is_available() \
                and torch.distributed.is_initialized() else 1
            per_worker = -(-self.samples_per_epoch // (world * (worker.num_workers if worker else 1)))
        # One good sample is held back so that skips after it (even at the very end of the
        # stream) ride along with it instead of being lost.
        held: dict[str, Any] | None = None
        pending: list[str] = []
        produced = 0
        for raw in pipeline:
            key = raw.get("__key__", "?")
            url = raw.get("__url__", "?")
            media = next((raw[k] for k in MEDIA_KEYS if k in raw), None)
            try:
                if media is None or "json" not in raw:
                    raise VideoDecodeError(f"{url}:{key}", "sample lacks media or json")
                record = json.loads(raw["json"])
                sample = self.builder(record, int(key) if key.isdigit() else -1, rng,
                                      source=media)
            except VideoDecodeError as error:
                log.warning("skipping corrupt sample %s:%s: %s", url, key, error.reason)
                (held["skipped"] if held is not None else pending).append(
                    f"{url}:{key}: {error.reason}")
                continue
            sample["skipped"], pending = pending, []
            if held is not None:
                yield held
                produced += 1
                if per_worker is not None and produced >= per_worker:
                    return
            held = sample
        if held is not None:
            yield held
        elif pending:
            raise TooManyBadSamples(f"every sample read from {len(self.urls)} shards was corrupt, "
                                    f"e.g. {pending[0]}")


def _count_samples(urls: Sequence[str]) -> int | None:
    """Total samples from the shards.json beside the shards, if there is one."""
    folders = {Path(u).parent for u in urls}
    total = 0
    for folder in folders:
        index = folder / "shards.json"
        if not index.is_file():
            return None
        counts = {s["name"]: s["samples"] for s in json.loads(index.read_text())["shards"]}
        total += sum(counts.get(Path(u).name, 0) for u in urls if Path(u).parent == folder)
    return total
