"""Datasets over annotation records, the text-padding collate, bad-sample accounting and the
loader that mixes image and video batches.

A sample is a dict: ``video`` (float ``T x 3 x H x W``), ``index`` and task fields
(``caption`` / ``question``+``answer`` / ``options``+``answer`` / ``label``), plus ``skipped``:
the corrupt media that were replaced to produce it. The skip list travels with the batch to the
main process, where ``BadSampleTracker`` counts it (DataLoader workers cannot share counters).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from leanvl.data.annotations import captions_of, load_annotations, media_path
from leanvl.data.text import TextEncoder
from leanvl.data.transforms import ClipTransform, resolve_normalization, to_tensor_clip
from leanvl.data.video import Source, VideoDecodeError, read_frames, read_image

log = logging.getLogger(__name__)


class TooManyBadSamples(RuntimeError):
    """More corrupt samples than ``max_bad_fraction`` allows."""


class ClipReader:
    """Turns a record (+ optional in-memory media) into a transformed clip tensor."""

    def __init__(self, root: str | os.PathLike | None, num_frames: int, sampling: str,
                 transform: ClipTransform, backend: str = "pyav"):
        self.root, self.num_frames, self.sampling = root, num_frames, sampling
        self.transform, self.backend = transform, backend

    def __call__(self, record: dict[str, Any], rng: np.random.Generator,
                 source: Source | None = None) -> torch.Tensor:
        """Decode, sample and transform; raises VideoDecodeError for bad media."""
        if "image" in record:
            frames = read_image(source or media_path(record, self.root))
        else:
            frames, _ = read_frames(source if source is not None else media_path(record, self.root),
                                    self.num_frames, self.sampling, record.get("start"),
                                    record.get("end"), self.backend, rng)
        return self.transform(to_tensor_clip(frames), rng)


class SampleBuilder:
    """Record -> sample dict for one task kind; shared by file and shard datasets."""

    def __init__(self, kind: str, reader: ClipReader, train: bool,
                 answers: Sequence[str] | None = None, classes: Sequence[str | int] | None = None):
        self.kind, self.reader, self.train = kind, reader, train
        self.answer_index = {a: i for i, a in enumerate(answers)} if answers else None
        self.class_index = {c: i for i, c in enumerate(classes)} if classes else None

    def __call__(self, record: dict[str, Any], index: int, rng: np.random.Generator,
                 source: Source | None = None) -> dict[str, Any]:
        """Build one sample (raises VideoDecodeError for bad media)."""
        sample: dict[str, Any] = {"video": self.reader(record, rng, source), "index": index}
        if self.kind in ("retrieval", "image"):
            captions = captions_of(record)
            sample["caption"] = captions[int(rng.integers(len(captions)))] if self.train \
                else captions[0]
            if self.train:  # a hard-negative caption when the record has some, else None
                negatives = captions_of(record, "negative_caption")
                sample["negative_caption"] = \
                    negatives[int(rng.integers(len(negatives)))] if negatives else None
                # the clip played backwards contradicts its captions (only videos can be)
                sample["reversal_negative"] = bool(record.get("reversal_negative", False)) \
                    and "image" not in record
        elif self.kind == "qa":
            sample["question"], sample["answer"] = record["question"], record["answer"]
            if self.answer_index is not None:
                sample["answer_index"] = self.answer_index.get(record["answer"], -1)
        elif self.kind == "mc":
            sample["options"], sample["answer"] = list(record["caption"]), record["answer"]
        elif self.kind == "classification":
            label = record["label"]
            if self.class_index is not None:
                if label not in self.class_index:
                    raise ValueError(f"record {index}: label {label!r} is not among the "
                                     f"{len(self.class_index)} classes")
                label = self.class_index[label]
            sample["label"] = int(label)
        return sample


class ClipDataset(Dataset):
    """Map-style dataset over annotation records.

    In training a corrupt clip is logged and replaced by another random record (the names of
    the skipped files ride along in ``sample["skipped"]``); in evaluation a corrupt clip is an
    error, because silently substituting test items would change the benchmark.
    """

    kind = "retrieval"

    def __init__(self, annotations: str | os.PathLike | list[dict], root: str | os.PathLike | None,
                 num_frames: int = 4, sampling: str = "rand", size: int = 224, train: bool = True,
                 normalization: str = "clip", mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, crop_scale: Sequence[float] = (0.5, 1.0),
                 flip: bool = False, backend: str = "pyav", seed: int = 0, max_retries: int = 20,
                 answers: Sequence[str] | None = None, classes: Sequence | None = None):
        if isinstance(annotations, (str, os.PathLike)):
            self.source = str(annotations)
            self.records = load_annotations(annotations, kind=self.kind)
        else:
            self.source = "<records>"
            self.records = list(annotations)
        if not self.records:
            raise ValueError(f"{self.source}: no records")
        mean, std = resolve_normalization(normalization, mean, std)
        transform = ClipTransform(size, train, mean, std, crop_scale, flip)
        self.reader = ClipReader(root, num_frames, sampling, transform, backend)
        self.builder = SampleBuilder(self.kind, self.reader, train, answers, classes)
        self.train, self.seed, self.max_retries, self.epoch = train, seed, max_retries, 0

    def set_epoch(self, epoch: int) -> None:
        """Change the random draws (frames, crops, captions) for a new epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def text_lengths(self) -> list[float]:
        """Words of text per record (the mean over a record's captions; a QA record's
        question; a multiple-choice record's longest option), for length-grouped batches."""
        def words(text: str) -> int:
            return len(str(text).split())

        if self.kind in ("retrieval", "image"):
            return [float(np.mean([words(c) for c in captions_of(r)])) for r in self.records]
        if self.kind == "qa":
            return [float(words(r["question"])) for r in self.records]
        if self.kind == "mc":
            return [float(max(words(c) for c in r["caption"])) for r in self.records]
        raise ValueError(f"{self.source}: {self.kind} records have no text to group batches by; "
                         "set data.group_by_length=false")

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        skipped: list[str] = []
        current = index
        for _ in range(self.max_retries):
            try:
                sample = self.builder(self.records[current], current, rng)
                sample["skipped"] = skipped
                return sample
            except VideoDecodeError as error:
                if not self.train:
                    raise VideoDecodeError(error.source, f"{error.reason} (record {current} of "
                                           f"{self.source}; run `leanvl data check` and drop "
                                           "it with --clean-out)") from None
                log.warning("skipping corrupt sample: %s", error)
                skipped.append(str(error))
                current = int(rng.integers(len(self.records)))
        raise TooManyBadSamples(f"{self.source}: {self.max_retries} corrupt samples in a row, "
                                f"last: {skipped[-1]}; run `leanvl data check` on it")


class VideoTextDataset(ClipDataset):
    """Video-text pairs for pre-training and retrieval (a random caption per clip in training)."""

    kind = "retrieval"

    def texts(self) -> tuple[list[str], list[int]]:
        """All captions flattened, with the index of each caption's video (for retrieval eval)."""
        texts, owners = [], []
        for video_index, record in enumerate(self.records):
            for caption in captions_of(record):
                texts.append(caption)
                owners.append(video_index)
        return texts, owners


class ImageTextDataset(VideoTextDataset):
    """Image-text pairs, read as one-frame videos."""

    kind = "image"


class VideoQADataset(ClipDataset):
    """Video question answering; ``answers`` fixes the answer vocabulary (index -1 if absent)."""

    kind = "qa"


class MultipleChoiceDataset(ClipDataset):
    """Video multiple choice: several caption options, one correct."""

    kind = "mc"


class ClassificationDataset(ClipDataset):
    """Video classification; labels are mapped through ``classes`` (sorted labels by default)."""

    kind = "classification"

    def __init__(self, annotations, root, classes: Sequence | None = None, **kwargs):
        super().__init__(annotations, root, classes=classes, **kwargs)
        if classes is None:
            labels = sorted({r["label"] for r in self.records}, key=str)
            self.builder.class_index = {c: i for i, c in enumerate(labels)}
        self.classes = list(self.builder.class_index)


DATASETS = {cls.kind: cls for cls in (VideoTextDataset, ImageTextDataset, VideoQADataset,
                                      MultipleChoiceDataset, ClassificationDataset)}


class Collator:
    """Stack clips and tokenise text (padded to the encoder's ``max_len``)."""

    def __init__(self, text: TextEncoder | None):
        self.text = text

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch dicts: ``video`` B x T x 3 x H x W, ``text_ids``/``text_mask`` B x L, etc."""
        first = samples[0]
        batch: dict[str, Any] = {
            "video": torch.stack([s["video"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples]),
            "skipped": [name for s in samples for name in s.get("skipped", [])],
        }
        if "caption" in first:
            batch["caption"] = [s["caption"] for s in samples]
            batch.update(self._encode(batch["caption"]))
            owners = [i for i, s in enumerate(samples) if s.get("negative_caption")]
            if owners and self.text is not None:
                batch["negative_caption"] = [samples[i]["negative_caption"] for i in owners]
                batch["negative_owner"] = torch.tensor(owners)
                encoded = self._encode(batch["negative_caption"])
                batch["negative_text_ids"] = encoded["text_ids"]
                batch["negative_text_mask"] = encoded["text_mask"]
            if any(s.get("reversal_negative") for s in samples):
                batch["reversal_negative"] = torch.tensor([bool(s.get("reversal_negative"))
                                                           for s in samples])
        if "question" in first:
            batch["question"] = [s["question"] for s in samples]
            batch["answer"] = [s["answer"] for s in samples]
            batch.update(self._encode(batch["question"]))
            if "answer_index" in first:
                batch["answer_index"] = torch.tensor([s["answer_index"] for s in samples])
        if "options" in first:
            # items with fewer options are padded with empty ones up to the batch's most;
            # option_count says how many of each item's are real
            counts = [len(s["options"]) for s in samples]
            width = max(counts)
            batch["options"] = [s["options"] for s in samples]
            batch["option_count"] = torch.tensor(counts)
            encoded = self._encode([o for s in samples
                                    for o in s["options"] + [""] * (width - len(s["options"]))])
            batch["option_ids"] = encoded["text_ids"].view(len(samples), -1, encoded["text_ids"].shape[-1])
            batch["option_mask"] = encoded["text_mask"].view_as(batch["option_ids"])
            batch["answer"] = torch.tensor([s["answer"] for s in samples])
        if "label" in first:
            batch["label"] = torch.tensor([s["label"] for s in samples])
        return batch

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.text is None:
            return {}
        return self.text(texts)


class BadSampleTracker:
    """Counts skipped corrupt media across batches and stops a run above ``max_fraction``.

    With a known dataset size the limit is ``max_fraction`` of the dataset's distinct files;
    for a stream, of the samples seen so far (but at least of ``min_seen``, so one early bad
    file does not end a run).
    """

    def __init__(self, max_fraction: float = 0.01, dataset_size: int | None = None,
                 min_seen: int = 1000):
        self.max_fraction, self.dataset_size, self.min_seen = max_fraction, dataset_size, min_seen
        self.seen = 0
        self.bad: dict[str, int] = {}

    @property
    def num_bad(self) -> int:
        """Distinct corrupt media seen."""
        return len(self.bad)

    def count(self, batch: dict[str, Any]) -> None:
        """Account for one batch without checking the limit."""
        skipped = batch.get("skipped", [])
        self.seen += len(batch["index"]) + len(skipped)
        for name in skipped:
            self.bad[name] = self.bad.get(name, 0) + 1

    def over_limit(self) -> bool:
        """True when the distinct corrupt media exceed ``max_fraction``."""
        return self.num_bad > self.max_fraction * self._base()

    def _base(self) -> int:
        return self.dataset_size or max(self.seen, self.min_seen)

    def update(self, batch: dict[str, Any]) -> None:
        """Account for one batch; raise TooManyBadSamples when over the limit."""
        self.count(batch)
        if self.over_limit():
            raise self.error()

    def error(self, bad: dict[str, int] | None = None, note: str = "") -> TooManyBadSamples:
        """The error naming how many corrupt media ``bad`` (default: this tracker's) holds."""
        bad = self.bad if bad is None else bad
        shown = "; ".join(list(bad)[:5])
        return TooManyBadSamples(
            f"{len(bad)} corrupt samples out of {self._base()}{note} exceed max_bad_fraction="
            f"{self.max_fraction} (e.g. {shown}). Run `leanvl data check` on the annotations "
            "and train on its --clean-out file, or raise data.max_bad_fraction.")

    def state(self) -> dict[str, Any]:
        """Counts for logs and checkpoints."""
        return {"seen": self.seen, "bad": self.num_bad}


class MixedLoader:
    """Iterate several loaders (e.g. image and video batches) in one shuffled schedule.

    Each epoch draws every loader's batches once (or ``ratios`` of the total), in an order
    shuffled by ``seed`` and the epoch; each batch gets ``batch["source"] = name``. Every DDP
    rank gets the same schedule, so ranks always run the same kind of batch together.
    """

    def __init__(self, loaders: dict[str, DataLoader], ratios: dict[str, float] | None = None,
                 seed: int = 0):
        if not loaders:
            raise ValueError("MixedLoader needs at least one loader")
        self.loaders, self.seed, self.epoch = loaders, seed, 0
        sizes = {name: len(loader) for name, loader in loaders.items()}
        if ratios:
            total = sum(sizes.values())
            norm = sum(ratios.values())
            sizes = {n: max(1, round(total * ratios.get(n, 0) / norm)) for n in loaders
                     if ratios.get(n, 0) > 0}
        self.sizes = sizes

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the schedule (and the loaders' samplers/datasets) for a new epoch."""
        self.epoch = epoch
        for loader in self.loaders.values():
            for target in (getattr(loader, "sampler", None), getattr(loader, "dataset", None)):
                if hasattr(target, "set_epoch"):
                    target.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(self.sizes.values())

    def schedule(self) -> list[str]:
        """The order of loader names for this epoch."""
        names = [name for name, count in self.sizes.items() for _ in range(count)]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(names))
        return [names[i] for i in order]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterators: dict[str, Iterator] = {}
        for name in self.schedule():
            if name not in iterators:
                iterators[name] = iter(self.loaders[name])
            try:
                batch = next(iterators[name])
            except StopIteration:  # a ratio asked for more batches than one pass holds
                iterators[name] = iter(self.loaders[name])
                batch = next(iterators[name])
            batch["source"] = name
            yield batch


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Training batches of records with similar text length, so the text encoder pads less.

    Each epoch, a permutation keyed on (seed, epoch) is cut into groups of ``group`` global
    batches; each group is sorted by length and split into batches, and the batches are
    shuffled. The order is random but a batch's texts are alike in length: on the synthetic
    benchmark the longest caption of a batch of 64 falls from ~52 to ~37 tokens (mean 31), and
    the text side's cost with it. A global batch is ``batch_size * world_size`` records and rank
    ``r`` takes its ``r``-th slice, so DDP ranks stay length-matched; incomplete batches are
    dropped. Batches also gather captions of similar scenes (length follows the number of
    objects), which makes in-batch negatives harder than random ones.
    """

    def __init__(self, lengths: Sequence[float], batch_size: int, seed: int = 0,
                 group: int = 16, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or group < 1:
            raise ValueError(f"batch_size and group must be >= 1, got {batch_size}, {group}")
        self.lengths = np.asarray(lengths, dtype=np.float64)
        self.batch_size, self.seed, self.group = batch_size, seed, group
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        if len(self.lengths) < batch_size * world_size:
            raise ValueError(f"{len(self.lengths)} records cannot fill one global batch of "
                             f"{batch_size} x {world_size} ranks")

    def set_epoch(self, epoch: int) -> None:
        """Draw a new order for ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 4409])
        order = rng.permutation(len(self.lengths))
        size = self.batch_size * self.world_size
        batches = []
        for start in range(0, len(self) * size, self.group * size):
            chunk = order[start:start + self.group * size]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + size] for i in range(0, len(chunk) - size + 1, size)]
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for b in rng.permutation(len(batches)):
            yield [int(i) for i in batches[b][mine]]


def make_loader(dataset: Dataset, batch_size: int, collate: Collator, train: bool,
                num_workers: int = 0, seed: int = 0, drop_last: bool | None = None,
                group_by_length: bool = False) -> DataLoader:
    """A DataLoader with a DistributedSampler when torch.distributed is initialised, or with a
    :class:`LengthGroupedBatchSampler` (training, ``group_by_length``)."""
    import torch.distributed as dist

    sampler = None
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    if group_by_length:
        if not train:
            raise ValueError("group_by_length is for training loaders")
        if iterable or not hasattr(dataset, "text_lengths"):
            raise ValueError("data.group_by_length needs an annotation file (map-style "
                             "dataset), not WebDataset shards; set data.group_by_length=false")
        rank, world = (dist.get_rank(), dist.get_world_size()) \
            if dist.is_available() and dist.is_initialized() else (0, 1)
        batches = LengthGroupedBatchSampler(dataset.text_lengths(), batch_size, seed,
                                            rank=rank, world_size=world)
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                          num_workers=num_workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available())
    if not iterable and dist.is_available() and dist.is_initialized():
        sampler = torch.utils.data.DistributedSampler(dataset, shuffle=train, seed=seed,
                                                      drop_last=train)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate,
                      shuffle=(train and sampler is None and not iterable), sampler=sampler,
                      num_workers=num_workers, drop_last=train if drop_last is None else drop_last,
                      generator=generator, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())


def is_shards(annotations: str | Path) -> bool:
    """Whether a data path names WebDataset shards (``.tar`` files, brace patterns included)
    rather than an annotation file."""
    return ".tar" in str(annotations)


def build_dataset(annotations: str | Path, root: str | None, data_cfg: Any, train: bool,
                  kind: str | None = None, **kwargs) -> Dataset:
    """A dataset for ``annotations`` from a ``DataConfig``: records or WebDataset shards."""
    common = dict(num_frames=data_cfg.num_frames,
                  sampling=data_cfg.sampling if train else data_cfg.test_sampling,
                  size=data_cfg.size, train=train, normalization=data_cfg.normalization,
                  mean=data_cfg.mean, std=data_cfg.std, crop_scale=data_cfg.crop_scale,
                  flip=data_cfg.flip, backend=data_cfg.backend, **kwargs)
    if is_shards(annotations):
        from leanvl.data.shards import ShardDataset

        return ShardDataset(str(annotations), kind=kind or "retrieval",
                            shuffle=data_cfg.shard_shuffle if train else 0, **common)
    if kind is None:
        from leanvl.data.annotations import infer_kind, read_records

        records = read_records(annotations)
        if not records:
            raise ValueError(f"{annotations}: no records")
        kind = infer_kind(records[0])
    return DATASETS[kind](annotations, root, **common)
