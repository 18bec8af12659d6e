"""``leanvl data check``: validate every record and decode every video, in parallel.

Problems found: malformed record, missing file, empty file, undecodable, truncated (fewer
frames decode than the header promises), zero frames, too short (fewer than ``min_frames``),
segment out of range (``start`` past the end of the video).
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leanvl.data.annotations import check_records, media_path, write_annotations
from leanvl.data.video import PyAVReader, VideoDecodeError, read_image


@dataclass
class Problem:
    """One bad record or media file."""

    kind: str
    where: str  # file path, or annotation file + record index
    detail: str
    records: list[int] = field(default_factory=list)


@dataclass
class CheckReport:
    """What ``check_annotations`` found."""

    annotations: str
    records: int
    media: int
    problems: list[Problem]
    good_records: list[dict[str, Any]]

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems

    def table(self) -> str:
        """The problems as an aligned text table."""
        if not self.problems:
            return f"{self.annotations}: {self.records} records, {self.media} media files, no problems"
        rows = [("problem", "file / record", "records", "detail")]
        for p in self.problems:
            ids = ",".join(str(i) for i in p.records[:5]) + ("..." if len(p.records) > 5 else "")
            rows.append((p.kind, p.where, ids or "-", p.detail))
        widths = [min(60, max(len(r[i]) for r in rows)) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3] for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
        counts: dict[str, int] = {}
        for p in self.problems:
            counts[p.kind] = counts.get(p.kind, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        plural = "s" if len(self.problems) != 1 else ""
        return "\n".join(lines) + (f"\n\n{self.annotations}: {self.records} records, {self.media} "
                                   f"media files, {len(self.problems)} problem{plural} ({summary})")


def inspect_media(path: str, min_frames: int = 1, latest_start: float | None = None
                  ) -> tuple[str, str] | None:
    """Fully decode one file; None when fine, else (problem kind, detail)."""
    file = Path(path)
    if not file.is_file():
        return "missing file", "no such file"
    if file.stat().st_size == 0:
        return "empty file", "0 bytes"
    if file.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"):
        try:
            read_image(file)
        except VideoDecodeError as error:
            return "undecodable", error.reason
        return None
    try:
        with PyAVReader(file) as reader:
            declared = int(reader.stream.frames or 0)
            decoded = 0
            try:
                reader.container.seek(0)
                for _ in reader.container.decode(reader.stream):
                    decoded += 1
            except Exception as error:
                if decoded == 0:
                    return "undecodable", f"decoding failed ({error})"
                return "truncated", f"decoding stopped after {decoded} frames ({error})"
            fps = reader.fps
    except VideoDecodeError as error:
        return "undecodable", error.reason
    if decoded == 0:
        return "zero frames", "no decodable frames"
    if declared and decoded < declared:
        return "truncated", f"{decoded} of {declared} frames decode"
    if decoded < min_frames:
        return "too short", f"{decoded} frames < min_frames={min_frames}"
    if latest_start is not None and fps and latest_start * fps >= decoded:
        return "segment out of range", f"start {latest_start}s is past the end ({decoded / fps:.2f}s)"
    return None


def _inspect(args: tuple[str, int, float | None]) -> tuple[str, tuple[str, str] | None]:
    path, min_frames, latest_start = args
    try:
        return path, inspect_media(path, min_frames, latest_start)
    except Exception as error:  # never let one odd file stop the whole check
        return path, ("undecodable", f"{type(error).__name__}: {error}")


def check_annotations(annotations: str | os.PathLike, root: str | os.PathLike | None = None,
                      workers: int = 0, min_frames: int = 1, kind: str | None = None,
                      progress: bool = True) -> CheckReport:
    """Validate all records and decode each distinct media file once (``workers`` processes)."""
    from tqdm import tqdm

    good, errors = check_records(annotations, kind=kind)
    problems = [Problem("malformed record", f"{e.path}: record {e.index}",
                        (f"field '{e.field}': " if e.field else "") + e.message, [e.index])
                for e in errors]
    by_path: dict[str, list[int]] = {}
    latest_start: dict[str, float] = {}
    for index, record in good:
        path = str(media_path(record, root))
        by_path.setdefault(path, []).append(index)
        if record.get("start") is not None:
            latest_start[path] = max(latest_start.get(path, 0.0), float(record["start"]))
    jobs = [(path, min_frames, latest_start.get(path)) for path in by_path]
    workers = workers or os.cpu_count() or 1
    bad_paths: set[str] = set()
    results = []
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            iterator = pool.map(_inspect, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
            results = list(tqdm(iterator, total=len(jobs), desc="check", disable=not progress))
    else:
        results = [_inspect(job) for job in tqdm(jobs, desc="check", disable=not progress)]
    for path, found in results:
        if found is not None:
            problems.append(Problem(found[0], path, found[1], by_path[path]))
            bad_paths.add(path)
    clean = [record for _, record in good if str(media_path(record, root)) not in bad_paths]
    return CheckReport(str(annotations), len(good) + len(errors), len(by_path), problems, clean)


def write_clean(report: CheckReport, out: str | os.PathLike) -> Path:
    """Write the records that passed every check."""
    return write_annotations(report.good_records, out)
