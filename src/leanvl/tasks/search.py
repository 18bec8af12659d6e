"""Text-to-video search over your own videos: ``leanvl index`` builds an index, ``leanvl search``
queries it.

Indexing. The videos of a folder (recursively) or of an annotation file are cut into windows
(``window`` seconds, every ``stride`` seconds; a video no longer than the window, and every
record of an annotation file unless a window is given, is one clip), decoded by DataLoader
workers with the evaluation transforms and the model's input settings as trained, and encoded
by ``model.encode_video``. A video that is one clip is read exactly as ``leanvl eval`` reads it
(no start/end), so its embedding is the one retrieval evaluation computes. The index is a folder:

- ``index.json``: the model (path, name, weights fingerprint), its input settings, the window,
  how videos are scored (``mode``), each file with its fingerprint (size, mtime and a hash of
  its first and last 64 KiB) and its rows, and the files skipped as corrupt with the reason;
- ``vectors-<id>.safetensors``: one row per window: ``embedding`` (float32 by default, not
  renormalised), ``start`` / ``end`` seconds, ``file`` (row of ``files``), ``whole``
  (1 = the whole video, read without start/end).

``index.json`` is written last (atomically) and names its data file, so an interrupted write
leaves the previous index whole. Re-running indexes only new or changed files (fingerprint or
segments differ), drops deleted ones, and does not retry a corrupt file until it changes; an
interrupted run (Ctrl-C) keeps the files it finished. A file that cannot be opened or decoded,
an empty file and a truncated one (its last frame does not decode) is skipped, counted and
named.

Scoring. A model whose ``similarity`` is a positive multiple of the dot product of the
``embedding``s (``similarity_is_dot_product``, the contract's default) is searched as a vector
index: an exact float32 matmul with torch (or, asked for, faiss's exact inner-product index
when faiss is installed). The score shown is the dot
product (the cosine for normalised embeddings); the ranking equals ``leanvl eval retrieval``'s
dual-encoder ranking. Any other model (Perceiver-VL's mixed stream scores every pair with its
decoder) keeps all its video features (``mode: features``) and every query is scored with
``model.similarity`` against all windows, in chunks, exactly as retrieval evaluation does:
exact, but the index is larger and each query costs a pass of the model's scoring over it.

Re-ranking (``rerank`` K): the top K windows by the dual score are decoded and encoded again
(so the index need not store video tokens) and re-scored by the model's matching head
(``match``); they come first, by VTM logit, the other hits follow in dual order. Models whose
``similarity`` already is their final score (``needs_rerank = False``) are not re-ranked.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from leanvl.data.check import Problem
from leanvl.data.video import VideoDecodeError

log = logging.getLogger(__name__)

INDEX_FORMAT = 1
INDEX_NAME = "index.json"
VIDEO_EXTENSIONS = frozenset((".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg",
                              ".flv", ".wmv", ".3gp", ".ts", ".mts"))
#: window length (seconds) for a folder of videos when none is given
DEFAULT_WINDOW = 10.0
#: vector search backends: ``auto`` is torch's exact matmul; faiss's exact IndexFlatIP is
#: opt-in (on a 2-core CPU it was slower in a quick check: docs/search.md)
BACKENDS = ("auto", "torch", "faiss")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_FINGERPRINT_BLOCK = 64 * 1024
#: settings that must match for a re-run to add to an index rather than rebuild it
_KEPT_SETTINGS = ("model", "input", "window", "stride", "mode", "dtype")


class IndexMismatchError(ValueError):
    """An index that cannot be used as asked (other settings, damaged files)."""


# ---------------------------------------------------------------- files, fingerprints, windows

def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Size, mtime (ns) and a BLAKE2 hash of the first and last 64 KiB of a file: a change
    that keeps size and mtime (a rewrite in place) still shows in the hash of its ends."""
    stat = os.stat(path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BLOCK))
        if stat.st_size > _FINGERPRINT_BLOCK:
            handle.seek(max(_FINGERPRINT_BLOCK, stat.st_size - _FINGERPRINT_BLOCK))
            digest.update(handle.read(_FINGERPRINT_BLOCK))
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "hash": digest.hexdigest()}


@dataclass
class MediaFile:
    """One file to index: its path, whether it is an image, and the segments an annotation
    file gives for it (``None``: the whole video, windowed)."""

    path: str
    image: bool = False
    segments: list[list[float | None]] | None = None


def list_media(source: str | os.PathLike, root: str | os.PathLike | None = None
               ) -> list[MediaFile]:
    """The files of a folder (videos, recursively, sorted) or of an annotation file (in order
    of first appearance, with each record's segment); paths are absolute."""
    source = Path(source)
    if source.is_dir():
        return [MediaFile(str(path.resolve())) for path in sorted(source.rglob("*"))
                if path.suffix.lower() in VIDEO_EXTENSIONS and path.is_file()]
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such folder or annotation file")
    from leanvl.data.annotations import media_path, read_records

    root = root if root is not None else source.parent
    files: dict[str, MediaFile] = {}
    for index, record in enumerate(read_records(source)):
        if not isinstance(record, dict) or not ("video" in record or "image" in record):
            raise ValueError(f"{source}: record {index} has no 'video' or 'image' field")
        path = str(Path(media_path(record, root)).resolve())
        entry = files.setdefault(path, MediaFile(path, image="image" in record, segments=[]))
        start, end = record.get("start"), record.get("end")
        segment = [None if start is None else float(start), None if end is None else float(end)]
        if segment not in entry.segments:
            entry.segments.append(segment)
    return list(files.values())


def window_bounds(duration: float, window: float | None, stride: float | None
                  ) -> list[tuple[float, float]]:
    """Windows ``[start, end]`` covering ``duration`` seconds: every ``stride`` seconds, the
    last one ending at the end of the video; one window when the video is no longer than
    ``window`` (or ``window`` is None)."""
    if window is None or duration <= window:
        return [(0.0, duration)]
    stride = window if stride is None else stride
    count = int(math.floor((duration - window) / stride + 1e-9)) + 1
    bounds = [(i * stride, i * stride + window) for i in range(count)]
    if bounds[-1][1] < duration - 1e-6:
        bounds.append((duration - window, duration))
    return bounds


def probe_media(path: str, image: bool = False) -> tuple[int, float]:
    """(frames, fps) of a video; raises ``VideoDecodeError`` for a file that cannot be opened,
    is empty, or whose last frame does not decode (a file cut short loses its end: decoding
    the last frame finds that without decoding the whole file). Images: (1, 0.0)."""
    from leanvl.data.video import PyAVReader, read_image

    if image:
        read_image(path)
        return 1, 0.0
    with PyAVReader(path) as reader:
        total = reader.num_frames
        if total <= 0:
            raise VideoDecodeError(path, "zero frames")
        reader.get_frames([total - 1])
        return total, reader.fps


def problem_of(path: str, reason: str) -> Problem:
    """A skipped file as ``leanvl data check`` names its problems."""
    file = Path(path)
    if not file.is_file():
        kind = "missing file"
    elif file.stat().st_size == 0:
        kind = "empty file"
    elif "(truncated file?" in reason:  # PyAVReader's word for frames missing at the end
        kind = "truncated"
    else:
        kind = "undecodable"
    return Problem(kind, path, reason)


class _Probes(Dataset):
    """Worker-side probing of files (header + last frame)."""

    def __init__(self, files: Sequence[MediaFile]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        file = self.files[index]
        try:
            frames, fps = probe_media(file.path, file.image)
        except VideoDecodeError as error:
            return {"index": index, "error": error.reason}
        except Exception as error:  # one odd file never stops the run
            return {"index": index, "error": f"{type(error).__name__}: {error}"}
        return {"index": index, "frames": frames, "fps": fps}


@dataclass
class _Window:
    file: int  # row of the new files table
    path: str
    image: bool
    start: float
    end: float
    whole: bool  # read without start/end (exactly as retrieval evaluation reads a clip)


class _WindowClips(Dataset):
    """Worker-side decoding of windows with the evaluation transforms."""

    def __init__(self, windows: Sequence[_Window], reader):
        self.windows, self.reader = windows, reader

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return {"index": index, "video": read_window(self.reader, self.windows[index])}
        except VideoDecodeError as error:
            return {"index": index, "error": error.reason}
        except Exception as error:
            return {"index": index, "error": f"{type(error).__name__}: {error}"}


def read_window(reader, window: _Window) -> torch.Tensor:
    """The transformed clip of a window (a whole video without start/end, as evaluation)."""
    if window.image:
        record: dict[str, Any] = {"image": window.path}
    elif window.whole:
        record = {"video": window.path}
    else:
        record = {"video": window.path, "start": window.start, "end": window.end}
    return reader(record, np.random.default_rng(0))


def _first(items: list) -> Any:
    return items[0]


def _collate_windows(samples: list[dict[str, Any]]) -> dict[str, Any]:
    good = [s for s in samples if "video" in s]
    return {"index": [s["index"] for s in good],
            "video": torch.stack([s["video"] for s in good]) if good else None,
            "errors": [(s["index"], s["error"]) for s in samples if "error" in s]}


# ---------------------------------------------------------------- model and settings

def load_search_model(model_path: str | os.PathLike, device: torch.device | str = "cpu"):
    """Released weights (folder or .safetensors) or a training checkpoint, in eval mode."""
    from leanvl.engine.checkpoint import load_pretrained

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such released weights or checkpoint")
    return load_pretrained(path, device=device)


def input_config(model_path: str | os.PathLike, overrides: Sequence[str] = ()):
    """The ``DataConfig`` to read videos with: the model's input settings as trained (as
    ``leanvl eval`` takes them), then ``key=value`` overrides."""
    from leanvl.config import load_config
    from leanvl.engine.checkpoint import trained_input_settings

    trained = trained_input_settings(model_path)
    return load_config(None, list(overrides), base={"data": trained} if trained else None).data


def _input_settings(data_cfg) -> dict[str, Any]:
    from leanvl.engine.checkpoint import input_settings, to_plain

    settings = input_settings(data_cfg)
    settings.update(test_sampling=to_plain(data_cfg.test_sampling), backend=data_cfg.backend)
    return settings


def _model_identity(model_path: str | os.PathLike, model) -> dict[str, Any]:
    from leanvl.engine.checkpoint import WEIGHTS_NAME

    path = Path(model_path).resolve()
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    return {"path": str(path), "name": getattr(model, "registry_name", type(model).__name__),
            "weights": fingerprint(weights)}


def similarity_is_dot_product(model) -> bool:
    """Whether a vector index of the embeddings ranks as ``model.similarity`` does."""
    return bool(getattr(model, "similarity_is_dot_product", False))


def _clip_reader(data_cfg):
    from leanvl.data.datasets import ClipReader
    from leanvl.data.transforms import ClipTransform, resolve_normalization

    mean, std = resolve_normalization(data_cfg.normalization, data_cfg.mean, data_cfg.std)
    transform = ClipTransform(data_cfg.size, False, mean, std)
    return ClipReader(None, data_cfg.num_frames, data_cfg.test_sampling, transform,
                      data_cfg.backend)


# ---------------------------------------------------------------- the index on disk

@dataclass
class IndexReport:
    """What one ``build_index`` run did."""

    out: str
    files: int
    encoded_files: int
    kept_files: int
    dropped_files: int
    windows: int
    encoded_windows: int
    skipped: list[Problem]
    seconds: float
    interrupted: bool = False

    def summary(self) -> str:
        """A few lines for the terminal."""
        rate = self.encoded_windows / self.seconds if self.seconds > 0 else 0.0
        lines = [f"{self.out}: {self.files} files, {self.windows} windows; this run encoded "
                 f"{self.encoded_windows} windows of {self.encoded_files} new or changed files "
                 f"in {self.seconds:.1f} s ({rate:.1f} windows/s), kept {self.kept_files} "
                 f"unchanged, dropped {self.dropped_files} deleted"]
        if self.interrupted:
            lines.append("interrupted: the files finished so far are saved; run again to go on")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} corrupt file"
                         f"{'s' if len(self.skipped) != 1 else ''}:")
            lines += [f"  {p.where}: {p.kind} ({p.detail})" for p in self.skipped]
        return "\n".join(lines)


def _read_meta(out: Path) -> dict[str, Any] | None:
    path = out / INDEX_NAME
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != INDEX_FORMAT:
        raise IndexMismatchError(f"{path}: index format {meta.get('format')}, this leanvl reads "
                          f"{INDEX_FORMAT}; rebuild it (--rebuild)")
    return meta


def _read_tensors(out: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    data = out / meta["data_file"]
    if not data.is_file():
        raise IndexMismatchError(f"{out / INDEX_NAME} names {data.name}, which is missing; "
                                 "rebuild the index (--rebuild)")
    tensors = load_file(str(data))
    if tensors["start"].shape[0] != meta["num_windows"]:
        raise IndexMismatchError(f"{data}: {tensors['start'].shape[0]} rows, {INDEX_NAME} says "
                          f"{meta['num_windows']}; rebuild the index (--rebuild)")
    return tensors


def _write_index(out: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The data file under a new name, then ``index.json`` (atomically), then the old data
    file is removed: a crash at any point leaves a consistent index."""
    from safetensors.torch import save_file

    from leanvl.data.annotations import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    old = _read_meta(out) if (out / INDEX_NAME).is_file() else None
    name = f"vectors-{uuid.uuid4().hex[:12]}.safetensors"
    tmp = out / f".{name}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, out / name)
    meta = {**meta, "data_file": name, "num_windows": int(tensors["start"].shape[0])}
    atomic_write_text(out / INDEX_NAME, json.dumps(meta, indent=1) + "\n")
    if old and old.get("data_file") and old["data_file"] != name:
        (out / old["data_file"]).unlink(missing_ok=True)


def _feature_tensors(features, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from leanvl.models.base import feature_fields

    return {name: value.to(dtype) if value.is_floating_point() else value
            for name, value in feature_fields(features).items() if torch.is_tensor(value)}


def build_index(source: str | os.PathLike, model_path: str | os.PathLike,
                out: str | os.PathLike, *, root: str | os.PathLike | None = None,
                window: float | None = None, stride: float | None = None,
                overrides: Sequence[str] = (), batch_size: int = 16,
                num_workers: int | None = None, dtype: str = "float32", rebuild: bool = False,
                device: torch.device | str | None = None, progress: bool = True,
                threads: int = 0, model=None) -> IndexReport:
    """Index the videos of ``source`` (a folder or an annotation file) into the folder ``out``
    with the released model at ``model_path``; see the module docstring. ``window`` /
    ``stride`` in seconds (a folder defaults to ``DEFAULT_WINDOW``, stride = window);
    ``overrides`` are ``data.*`` settings that replace the trained ones; ``threads``: torch's
    CPU threads (0: the cores left beside the decoding workers). ``model``: the
    weights at ``model_path`` already loaded (saves loading them again)."""
    from tqdm.auto import tqdm

    from leanvl.tasks.build import configure_threads
    from leanvl.tasks.common import progress as progress_bar

    begin = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if num_workers is None:
        num_workers = max(1, (os.cpu_count() or 2) - 1)
    if Path(source).is_dir() and window is None:
        window = DEFAULT_WINDOW
    for name, value in (("window", window), ("stride", stride)):
        if value is not None and value <= 0:
            raise ValueError(f"--{name} must be > 0 seconds, got {value}")
    stride = window if stride is None else stride
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configure_threads(num_workers, threads)
    out = Path(out)
    data_cfg = input_config(model_path, overrides)
    model = load_search_model(model_path, device) if model is None else model.to(device).eval()
    settings = {"model": _model_identity(model_path, model), "input": _input_settings(data_cfg),
                "window": window, "stride": stride,
                "mode": "embedding" if similarity_is_dot_product(model) else "features",
                "dtype": dtype}
    meta = None if rebuild else _read_meta(out)
    old_tensors: dict[str, torch.Tensor] = {}
    old_files: dict[str, dict[str, Any]] = {}
    old_skipped: dict[str, dict[str, Any]] = {}
    if meta is not None:
        changed = [key for key in _KEPT_SETTINGS if meta.get(key) != settings[key]]
        if changed:
            raise IndexMismatchError(
                f"{out} was built with other {', '.join(changed)} ("
                + "; ".join(f"{k}: {meta.get(k)} -> {settings[k]}" for k in changed)
                + "); give --rebuild to re-encode everything, or another --out")
        old_tensors = _read_tensors(out, meta)
        old_files = {f["path"]: f for f in meta["files"]}
        old_skipped = {s["path"]: s for s in meta.get("skipped", [])}

    media = list_media(source, root)
    files: list[dict[str, Any]] = []
    todo: list[int] = []  # rows of ``files`` to encode
    skipped: list[Problem] = []
    for file in media:
        try:
            mark = fingerprint(file.path)
        except OSError as error:
            skipped.append(problem_of(file.path, f"cannot read ({error.strerror})"))
            continue
        entry = {"path": file.path, **mark, "image": file.image, "segments": file.segments}
        before = old_files.get(file.path) or old_skipped.get(file.path)
        same = before is not None and all(before.get(k) == entry[k] for k in
                                          ("size", "mtime_ns", "hash", "segments"))
        if same and file.path in old_skipped:
            skipped.append(Problem(before["kind"], file.path, before["detail"]))
            continue
        if same:
            files.append({**before, "kept": True})
        else:
            files.append(entry)
            todo.append(len(files) - 1)
    listed = {f.path for f in media}
    dropped = len([p for p in old_files if p not in listed])

    # probe the new and changed files in parallel: frames, fps, truncation
    errors: dict[int, str] = {}
    probe_files = [MediaFile(files[i]["path"], files[i]["image"]) for i in todo]
    loader = DataLoader(_Probes(probe_files), batch_size=1, collate_fn=_first,
                        num_workers=num_workers if len(probe_files) > 1 else 0)
    for item in progress_bar(loader, "probe", total=len(probe_files),
                             enabled=progress and bool(probe_files)):
        row = todo[item["index"]]
        if "error" in item:
            errors[row] = item["error"]
        else:
            fps = item["fps"]
            files[row].update(frames=item["frames"], fps=fps,
                              duration=item["frames"] / fps if fps else 0.0)
    windows: list[_Window] = []
    for row in todo:
        if row in errors:
            continue
        entry = files[row]
        windows += _windows_of(row, entry, window, stride)

    # decode in workers, encode here
    encoded: dict[int, Any] = {}
    interrupted = False
    feature_class = (meta or {}).get("feature_class")
    reader = _clip_reader(data_cfg)
    loader = DataLoader(_WindowClips(windows, reader), batch_size=batch_size,
                        collate_fn=_collate_windows, num_workers=num_workers if windows else 0)
    mode, store = settings["mode"], DTYPES[dtype]
    bar = tqdm(total=len(windows), desc="index", unit="clip", leave=False,
               disable=not progress or not windows)
    try:
        with torch.no_grad():
            for batch in loader:
                for index, reason in batch["errors"]:
                    errors.setdefault(windows[index].file, reason)
                keep = [i for i in batch["index"] if windows[i].file not in errors]
                if keep:
                    rows = [batch["index"].index(i) for i in keep]
                    feats = model.encode_video(batch["video"][rows].to(device))
                    if mode == "embedding":
                        values = feats.embedding.float().cpu()
                        for i, value in zip(keep, values):
                            encoded[i] = value
                    else:
                        feature_class = f"{type(feats).__module__}:{type(feats).__qualname__}"
                        feats = _feature_tensors(feats, torch.float32)
                        for j, i in enumerate(keep):
                            encoded[i] = {k: v[j].cpu() for k, v in feats.items()}
                bar.update(len(batch["index"]) + len(batch["errors"]))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()

    for row, reason in errors.items():
        skipped.append(problem_of(files[row]["path"], reason))
    by_file: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_file.setdefault(w.file, []).append(i)
    done = {row for row, ids in by_file.items() if row not in errors and
            all(i in encoded for i in ids)}
    # the new table: kept files with their old rows, finished files with their new ones
    new_files, parts, encoded_files, first = [], [], 0, 0
    for row, entry in enumerate(files):
        if entry.pop("kept", False):
            rows = slice(entry["first"], entry["first"] + entry["count"])
            parts.append({k: v[rows] for k, v in old_tensors.items() if k != "file"})
        elif row in done:
            ids = by_file[row]
            parts.append(_rows_of([windows[i] for i in ids], [encoded[i] for i in ids], mode,
                                  store))
            encoded_files += 1
        else:
            continue
        count = int(parts[-1]["start"].shape[0])
        new_files.append({**entry, "first": first, "count": count})
        first += count
    tensors = _concat(parts, len(new_files))
    meta = {"format": INDEX_FORMAT, **settings,
            "feature_class": feature_class,
            "leanvl_version": _version(), "files": new_files,
            "skipped": [{"path": p.where, "kind": p.kind, "detail": p.detail,
                         **_safe_fingerprint(p.where), "segments": _segments_of(files, p.where)}
                        for p in skipped]}
    _write_index(out, meta, tensors)
    report = IndexReport(str(out), len(new_files), encoded_files,
                         len(new_files) - encoded_files, dropped, int(tensors["start"].shape[0]),
                         sum(len(by_file[r]) for r in done), skipped,
                         time.perf_counter() - begin, interrupted)
    if interrupted:
        raise KeyboardInterrupt(report.summary())
    return report


def _windows_of(row: int, entry: dict[str, Any], window: float | None, stride: float | None
                ) -> list[_Window]:
    """The windows of one probed file: its segments, or the whole video cut by ``window``."""
    duration = entry["duration"]
    path, image = entry["path"], entry["image"]
    if image:
        return [_Window(row, path, True, 0.0, 0.0, True)]
    segments = entry["segments"] or [[None, None]]
    out = []
    for start, end in segments:
        if start is None and end is None:
            bounds = window_bounds(duration, window, stride)
            whole = len(bounds) == 1
            out += [_Window(row, path, False, s, e, whole) for s, e in bounds]
        else:
            begin = 0.0 if start is None else start
            out.append(_Window(row, path, False, begin, duration if end is None else end, False))
    return out


def _rows_of(windows: list[_Window], values: list[Any], mode: str, store: torch.dtype
             ) -> dict[str, torch.Tensor]:
    rows = {"start": torch.tensor([w.start for w in windows], dtype=torch.float64),
            "end": torch.tensor([w.end for w in windows], dtype=torch.float64),
            "whole": torch.tensor([w.whole for w in windows], dtype=torch.uint8)}
    if mode == "embedding":
        rows["embedding"] = torch.stack(values).to(store)
    else:
        for name in values[0]:
            stacked = torch.stack([v[name] for v in values])
            rows[f"feature.{name}"] = stacked.to(store) if stacked.is_floating_point() \
                else stacked
    return rows


def _concat(parts: list[dict[str, torch.Tensor]], num_files: int) -> dict[str, torch.Tensor]:
    if not parts:
        return {"start": torch.zeros(0, dtype=torch.float64),
                "end": torch.zeros(0, dtype=torch.float64),
                "whole": torch.zeros(0, dtype=torch.uint8),
                "file": torch.zeros(0, dtype=torch.int32)}
    keys = set(parts[0])
    for part in parts[1:]:
        if set(part) != keys:
            raise IndexMismatchError("index rows of different kinds cannot be joined; rebuild the "
                              "index (--rebuild)")
    tensors = {k: torch.cat([p[k] for p in parts]) for k in keys}
    tensors["file"] = torch.cat([torch.full((int(p["start"].shape[0]),), i, dtype=torch.int32)
                                 for i, p in enumerate(parts)])
    return tensors


def _safe_fingerprint(path: str) -> dict[str, Any]:
    try:
        return fingerprint(path)
    except OSError:
        return {}


def _segments_of(files: list[dict[str, Any]], path: str):
    return next((f["segments"] for f in files if f["path"] == path), None)


def _version() -> str:
    from leanvl import __version__

    return __version__


# ---------------------------------------------------------------- search

@dataclass
class Hit:
    """One result: a window of a file, its final score, its dual score and (when re-ranked)
    its matching-head logit."""

    rank: int
    path: str
    start: float
    end: float
    score: float
    similarity: float
    match: float | None = None
    row: int = field(default=-1, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"rank": self.rank, "path": self.path, "start": round(self.start, 3),
                "end": round(self.end, 3), "score": self.score, "similarity": self.similarity,
                "match": self.match}


class VideoIndex:
    """An index folder loaded for searching (see the module docstring for its layout)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = _read_meta(self.folder)
        if meta is None:
            raise FileNotFoundError(f"{self.folder}: no {INDEX_NAME} (build one with "
                                    "`leanvl index PATH --model M --out INDEX`)")
        self.meta = meta
        self.tensors = _read_tensors(self.folder, meta)
        self.files = meta["files"]
        self.mode = meta["mode"]
        # float32 in memory: CPU matmuls in float16 are slow, and scores come out in float32
        self.embedding = self.tensors["embedding"].float() if self.mode == "embedding" else None
        self._faiss = None

    def __len__(self) -> int:
        return int(self.tensors["start"].shape[0])

    def window(self, row: int) -> _Window:
        """The window stored in ``row``."""
        entry = self.files[int(self.tensors["file"][row])]
        return _Window(int(self.tensors["file"][row]), entry["path"], entry.get("image", False),
                       float(self.tensors["start"][row]), float(self.tensors["end"][row]),
                       bool(self.tensors["whole"][row]))

    def video_features(self, rows=None, dtype: torch.dtype = torch.float32):
        """The stored video features of ``rows`` (``mode: features``) as the model's class."""
        module, _, name = self.meta["feature_class"].partition(":")
        cls = getattr(importlib.import_module(module), name)
        values = {key[len("feature."):]: value if rows is None else value[rows]
                  for key, value in self.tensors.items() if key.startswith("feature.")}
        values = {k: v.to(dtype) if v.is_floating_point() else v for k, v in values.items()}
        return cls(**values)

    def top_by_embedding(self, queries: torch.Tensor, k: int, backend: str = "auto"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, rows), each Q x k: exact inner-product search of ``queries`` (Q x E)."""
        k = min(k, len(self))
        queries = queries.float().cpu()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if backend == "faiss":
            return self._faiss_top(queries, k)
        scores, rows = [], []
        block = max(1, (256 * 2**20) // max(1, 4 * len(self)))  # bounded score memory
        for start in range(0, queries.shape[0], block):
            top = (queries[start:start + block] @ self.embedding.t()).topk(k, dim=1)
            scores.append(top.values)
            rows.append(top.indices)
        return torch.cat(scores), torch.cat(rows)

    def _faiss_top(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _faiss()
        if faiss is None:
            raise ImportError("--backend faiss needs `pip install faiss-cpu` (or faiss-gpu)")
        if self._faiss is None:
            self._faiss = faiss.IndexFlatIP(self.embedding.shape[1])
            self._faiss.add(np.ascontiguousarray(self.embedding.numpy()))
        scores, rows = self._faiss.search(np.ascontiguousarray(queries.numpy()), k)
        return torch.from_numpy(scores), torch.from_numpy(rows).long()


def _faiss():
    """faiss when installed (an optional dependency), else None."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class Searcher:
    """An index with its model and tokenizer, ready for queries."""

    def __init__(self, index: VideoIndex | str | os.PathLike, model=None,
                 device: torch.device | str | None = None):
        from leanvl.config import load_config
        from leanvl.tasks.build import build_text_encoder

        self.index = index if isinstance(index, VideoIndex) else VideoIndex(index)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        meta = self.index.meta
        if model is None:
            model = load_search_model(meta["model"]["path"], self.device)
            if fingerprint(_weights_file(meta["model"]["path"])) != meta["model"]["weights"]:
                log.warning("the weights at %s changed since the index was built; rebuild it "
                            "(leanvl index ... --rebuild) for scores that match them",
                            meta["model"]["path"])
        self.model = model.eval()
        self.data_cfg = load_config(None, [], base={"data": meta["input"]}).data
        self.text = build_text_encoder(self.data_cfg, self.model)
        self._reader = None

    def encode_queries(self, queries: Sequence[str]):
        """The text features of ``queries``."""
        from leanvl.tasks.retrieval import encode_texts

        return encode_texts(self.model, list(queries), self.text, self.device,
                            progress_bar=False, feature_device="cpu")

    def search(self, queries: Sequence[str], k: int = 10, rerank: int = 0,
               backend: str = "auto", chunk_size: int = 1024) -> list[list[Hit]]:
        """The top ``k`` windows for each query, re-ranked by ``match`` when ``rerank`` > 0."""
        from leanvl.tasks.retrieval import similarity_matrix

        if k < 1:
            raise ValueError(f"-k must be >= 1, got {k}")
        if len(self.index) == 0:
            return [[] for _ in queries]
        text = self.encode_queries(queries)
        depth = min(len(self.index), max(k, rerank))
        if self.index.mode == "embedding":
            scores, rows = self.index.top_by_embedding(text.embedding, depth, backend)
        else:  # exact: the model's own scoring of every window, as retrieval evaluation
            video = self.index.video_features()
            sim = similarity_matrix(self.model, video, text, chunk_size, self.device)
            scores, rows = sim.topk(depth, dim=1)
        rerank = self._rerank_depth(rerank)
        results = []
        for q in range(len(queries)):
            logits = self._rerank(text.index([q]), rows[q, :rerank]) if rerank else None
            order = list(range(depth))
            if logits is not None:  # re-scored first (by logit, ties in dual order), then the rest
                head = sorted(range(rerank), key=lambda j: (-float(logits[j]), j))
                order = head + list(range(rerank, depth))
            hits = []
            for rank, j in enumerate(order[:k], start=1):
                row = int(rows[q, j])
                window = self.index.window(row)
                match = float(logits[j]) if logits is not None and j < rerank else None
                similarity = float(scores[q, j])
                hits.append(Hit(rank, window.path, window.start, window.end,
                                match if match is not None else similarity, similarity, match,
                                row))
            results.append(hits)
        return results

    def _rerank_depth(self, rerank: int) -> int:
        if rerank <= 0:
            return 0
        from leanvl.tasks.common import has_method

        if not getattr(self.model, "needs_rerank", True):
            log.warning("the model's similarity already is its final score: --rerank ignored")
            return 0
        if not has_method(self.model, "match"):
            raise ValueError(f"--rerank needs a model with a matching head (match); "
                             f"{self.index.meta['model']['name']} has none")
        return min(rerank, len(self.index))

    def _rerank(self, text, rows: torch.Tensor) -> torch.Tensor:
        """VTM logits of one query against the windows ``rows``: their features from the
        index (``mode: features``) or decoded and encoded again."""
        rows = [int(r) for r in rows]
        with torch.no_grad():
            if self.index.mode == "features":
                video = self.index.video_features(torch.tensor(rows))
            else:
                if self._reader is None:
                    self._reader = _clip_reader(self.data_cfg)
                clips = torch.stack([read_window(self._reader, self.index.window(r))
                                     for r in rows])
                video = self.model.encode_video(clips.to(self.device))
            from leanvl.tasks.common import move_features

            video = move_features(video, self.device)
            text = move_features(text.index([0] * len(rows)), self.device)
            return self.model.match(video, text).float().cpu()


def _weights_file(model_path: str) -> Path:
    from leanvl.engine.checkpoint import WEIGHTS_NAME

    path = Path(model_path)
    return path / WEIGHTS_NAME if path.is_dir() else path


def contact_sheet(hits: Sequence[Hit], out: str | os.PathLike, title: str = "",
                  columns: int = 5) -> Path:
    """A PNG of each hit's middle frame with its rank, file, times and score."""
    from leanvl.data.video import read_frames, read_image
    from leanvl.report import _pyplot, save_figure

    plt = _pyplot()

    if not hits:
        raise ValueError("no hits to draw")
    columns = min(columns, len(hits))
    lines = math.ceil(len(hits) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 3.0 * lines),
                                squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, hit in zip(axes.flat, hits):
        middle = (hit.start + hit.end) / 2
        try:
            if Path(hit.path).suffix.lower() in VIDEO_EXTENSIONS:
                frame = read_frames(hit.path, 1, "middle", middle, middle)[0][0]
            else:
                frame = read_image(hit.path)[0]
            ax.imshow(frame)
        except VideoDecodeError as error:
            ax.text(0.5, 0.5, f"cannot read\n{error.reason}", ha="center", va="center",
                    fontsize=7, wrap=True)
        ax.set_title(f"{hit.rank}. {Path(hit.path).name}\n{hit.start:.1f}-{hit.end:.1f} s  "
                     f"score {hit.score:.3f}", fontsize=8)
    return save_figure(figure, out, title)


def format_hits(query: str, hits: Sequence[Hit]) -> str:
    """The hits of one query as an aligned table."""
    lines = [f"query: {query}"]
    if not hits:
        return lines[0] + "\n  (the index is empty)"
    lines.append(f"{'rank':>4}  {'score':>9}  {'start':>8}  {'end':>8}  file")
    lines += [f"{h.rank:>4}  {h.score:>9.4f}  {h.start:>8.2f}  {h.end:>8.2f}  {h.path}"
              for h in hits]
    return "\n".join(lines)
