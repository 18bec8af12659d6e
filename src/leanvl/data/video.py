"""Video decoding (PyAV by default, decord optional) and segment-based frame sampling.

``read_frames(source, num_frames, sampling)`` is the one entry point the datasets use. A source
is a path, raw bytes (e.g. from a WebDataset shard) or a binary file object. Frames come back
as uint8 ``T x H x W x 3`` numpy arrays (``layout="TCHW"`` for ``T x 3 x H x W``).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

SAMPLINGS = ("rand", "middle", "uniform")
BACKENDS = ("pyav", "decord")
Source = str | os.PathLike | bytes | io.IOBase


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened or decoded; the message names the file.

    ``VideoDecodeError(message)`` with one argument (no reason) keeps the message whole: that
    is how a DataLoader re-raises an error of its worker, so it stays a ``VideoDecodeError``.
    """

    def __init__(self, source: Source, reason: str | None = None):
        if reason is None:
            self.source, self.reason = "", str(source)
            super().__init__(self.reason)
            return
        self.source = source_name(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


def source_name(source: Source) -> str:
    """A printable name for a video source."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return getattr(source, "name", None) or f"<{type(source).__name__}>"


def sample_frame_indices(num_frames: int, total_frames: int, sampling: str = "rand",
                         first: int = 0, last: int | None = None,
                         rng: np.random.Generator | None = None) -> list[int]:
    """Pick ``num_frames`` indices from frames ``first..last`` (inclusive).

    ``rand`` and ``middle`` split the range into ``num_frames`` equal segments and take a random
    frame or the middle frame of each (TSN / ClipBERT sparse sampling: ``rand`` for training,
    ``middle`` for evaluation); ``uniform`` spaces frames evenly from the first to the last.
    Clips shorter than ``num_frames`` repeat frames rather than fail.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown frame sampling {sampling!r}; expected one of {SAMPLINGS}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if total_frames < 1:
        raise ValueError("cannot sample frames from a video with no frames")
    last = total_frames - 1 if last is None else min(last, total_frames - 1)
    first = max(0, min(first, last))
    span = last - first + 1
    if sampling == "uniform":
        return [first + int(round(x)) for x in np.linspace(0, span - 1, num_frames)]
    edges = np.linspace(0, span, num_frames + 1)
    lows = np.floor(edges[:-1]).astype(int)
    highs = np.maximum(np.floor(edges[1:]).astype(int), lows + 1)  # exclusive; never empty
    if sampling == "middle":
        picks = (lows + highs - 1) // 2
    else:
        rng = rng if rng is not None else np.random.default_rng()
        picks = rng.integers(lows, highs)
    return [first + int(min(p, span - 1)) for p in picks]


def _as_input(source: Source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise VideoDecodeError(source, "file not found")
        if path.stat().st_size == 0:
            raise VideoDecodeError(source, "empty file (0 bytes)")
        return str(path)
    return source


class PyAVReader:
    """Frame-accurate reader over PyAV that seeks to keyframes instead of decoding everything."""

    # Jumps shorter than this many frames are decoded through rather than seeked.
    seek_gap = 48

    def __init__(self, source: Source):
        import av

        self.name = source_name(source)
        try:
            self.container = av.open(_as_input(source))
        except VideoDecodeError:
            raise
        except Exception as error:  # PyAV raises several FFmpeg error types
            raise VideoDecodeError(source, f"cannot open ({error})") from None
        if not self.container.streams.video:
            self.container.close()
            raise VideoDecodeError(source, "no video stream")
        self.stream = self.container.streams.video[0]
        self.stream.thread_type = "AUTO"
        rate = self.stream.average_rate or self.stream.guessed_rate
        self.fps = float(rate) if rate else 0.0
        self.time_base = self.stream.time_base or Fraction(1, 1)
        self.start_pts = self.stream.start_time or 0
        self._num_frames = int(self.stream.frames or 0)
        if self._num_frames <= 0 and self.stream.duration and self.fps:
            self._num_frames = int(round(float(self.stream.duration * self.time_base) * self.fps))
        if self._num_frames <= 0 and self.container.duration and self.fps:
            # Matroska / WebM store neither a frame count nor a stream duration: estimate from
            # the container's duration (microseconds) rather than decode the whole video; a
            # frame past the real end falls back to a full decode in get_frames
            self._num_frames = int(self.container.duration * self.fps / 1_000_000)
        self._all: list[np.ndarray] | None = None

    def close(self) -> None:
        """Release the container."""
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def num_frames(self) -> int:
        """Frame count from the container header, or from a full decode when it has none."""
        if self._num_frames <= 0:
            self._num_frames = len(self._decode_all())
        return self._num_frames

    def _decode_all(self) -> list[np.ndarray]:
        if self._all is None:
            self.container.seek(0)
            try:
                self._all = [f.to_ndarray(format="rgb24") for f in self.container.decode(self.stream)]
            except Exception as error:
                raise VideoDecodeError(self.name, f"decoding failed ({error})") from None
            if not self._all:
                raise VideoDecodeError(self.name, "zero decodable frames")
        return self._all

    def _frame_index(self, frame) -> float | None:
        if frame.pts is None or not self.fps:
            return None
        return float((frame.pts - self.start_pts) * self.time_base) * self.fps

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        """Decode the frames at ``indices`` (any order, repeats allowed) as ``T x H x W x 3``."""
        if self._all is not None or not self.fps:
            return self._from_all(indices)
        wanted = sorted(set(int(i) for i in indices))
        try:
            found = self._seek_and_decode(wanted)
        except _NotOnGrid:
            return self._from_all(indices)
        except VideoDecodeError:
            raise
        except Exception as error:
            raise VideoDecodeError(self.name, f"decoding failed ({error})") from None
        missing = [i for i in wanted if i not in found]
        if missing:
            if self._all is None and self.stream.frames == 0:
                return self._from_all(indices)  # header count was an estimate
            raise VideoDecodeError(
                self.name, f"frames {missing[:5]} not decodable (truncated file? "
                f"header says {self.num_frames} frames)")
        return np.stack([found[int(i)] for i in indices])

    def _from_all(self, indices: Sequence[int]) -> np.ndarray:
        frames = self._decode_all()
        bad = [i for i in indices if not 0 <= i < len(frames)]
        if bad:
            raise VideoDecodeError(self.name, f"frame index {bad[0]} out of range ({len(frames)} frames)")
        return np.stack([frames[i] for i in indices])

    def _seek_and_decode(self, wanted: list[int]) -> dict[int, np.ndarray]:
        """Decode sorted unique ``wanted`` frames, seeking when the next one is far ahead."""
        found: dict[int, np.ndarray] = {}
        frames = None  # the running decode iterator
        position = -1  # index of the last decoded frame
        k = 0
        while k < len(wanted):
            if frames is None or wanted[k] > position + self.seek_gap:
                pts = self.start_pts + int(math.floor(wanted[k] / self.fps / self.time_base))
                self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
                frames = self.container.decode(self.stream)
                position = -1
            exhausted = True
            for frame in frames:
                index_float = self._frame_index(frame)
                if index_float is None or abs(index_float - round(index_float)) > 0.25:
                    raise _NotOnGrid()
                position = int(round(index_float))
                if position > wanted[k]:
                    raise _NotOnGrid()  # the seek or the stream skipped a wanted frame
                if position == wanted[k]:
                    found[position] = frame.to_ndarray(format="rgb24")
                    k += 1
                    if k == len(wanted) or wanted[k] > position + self.seek_gap:
                        exhausted = False
                        break
            if exhausted:
                break  # end of stream: the remaining frames are not there
        return found


class _NotOnGrid(Exception):
    """Frame timestamps do not map onto a constant frame rate: fall back to a full decode."""


class DecordReader:
    """The same interface over decord (optional dependency: ``pip install leanvl[decord]``)."""

    def __init__(self, source: Source):
        try:
            import decord
        except ImportError:
            raise ImportError("the decord backend needs `pip install decord`") from None
        self.name = source_name(source)
        try:
            self.reader = decord.VideoReader(_as_input(source), num_threads=1)
        except VideoDecodeError:
            raise
        except Exception as error:
            raise VideoDecodeError(source, f"cannot open ({error})") from None
        self.fps = float(self.reader.get_avg_fps() or 0.0)
        self.num_frames = len(self.reader)

    def get_frames(self, indices: Sequence[int]) -> np.ndarray:
        """Decode the frames at ``indices`` as ``T x H x W x 3``."""
        try:
            return self.reader.get_batch(list(indices)).asnumpy()
        except Exception as error:
            raise VideoDecodeError(self.name, f"decoding failed ({error})") from None

    def close(self) -> None:
        """Release the reader."""
        del self.reader

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_video(source: Source, backend: str = "pyav"):
    """Open a reader of the named backend."""
    if backend == "pyav":
        return PyAVReader(source)
    if backend == "decord":
        return DecordReader(source)
    raise ValueError(f"unknown video backend {backend!r}; expected one of {BACKENDS}")


def read_frames(source: Source, num_frames: int, sampling: str = "rand",
                start: float | None = None, end: float | None = None, backend: str = "pyav",
                rng: np.random.Generator | None = None, layout: str = "THWC"
                ) -> tuple[np.ndarray, list[int]]:
    """Sample and decode ``num_frames`` frames; returns (uint8 frames, frame indices).

    ``start``/``end`` (seconds) restrict sampling to a segment of the video.
    """
    if layout not in ("THWC", "TCHW"):
        raise ValueError(f"layout must be 'THWC' or 'TCHW', got {layout!r}")
    with open_video(source, backend) as reader:
        total = reader.num_frames
        if total <= 0:
            raise VideoDecodeError(source, "zero frames")
        first, last = 0, total - 1
        if start is not None and reader.fps:
            first = min(int(math.ceil(start * reader.fps)), total - 1)
        if end is not None and reader.fps:
            last = max(first, min(int(math.floor(end * reader.fps)), total - 1))
        indices = sample_frame_indices(num_frames, total, sampling, first, last, rng)
        frames = reader.get_frames(indices)
    if frames.ndim != 4 or frames.shape[0] != num_frames or frames.shape[-1] != 3:
        raise VideoDecodeError(source, f"unexpected decoded shape {frames.shape}")
    if layout == "TCHW":
        frames = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))
    return frames, indices


def read_all_frames(source: Source) -> np.ndarray:
    """Decode every frame in order (reference for tests; the checker; small clips)."""
    with PyAVReader(source) as reader:
        return np.stack(reader._decode_all())


def read_image(source: Source) -> np.ndarray:
    """Read an image (path or encoded bytes; anything FFmpeg decodes) as ``1 x H x W x 3`` uint8."""
    with PyAVReader(source) as reader:
        return reader.get_frames([0]) if reader.fps else np.stack(reader._decode_all()[:1])


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float = 8.0,
                codec: str = "libx264", crf: int = 20, gop: int | None = None) -> Path:
    """Encode uint8 ``T x H x W x 3`` frames as an H.264 mp4, atomically (temp file + rename).

    Height and width must be even (yuv420p). ``gop`` sets the keyframe interval.
    """
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames T x H x W x 3, got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {frames.shape[2]}x{frames.shape[1]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with av.open(str(tmp), "w", format="mp4") as container:
            stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            options = {"crf": str(crf), "preset": "veryfast"}
            if codec == "libx264":
                # x264's macroblock-tree rate control encoded the same frames differently from
                # run to run (with its SIMD code), so a benchmark regenerated from one config
                # got other pixels; without it the file is a function of the frames.
                options["x264-params"] = "mbtree=0"
            if gop:
                options["g"] = str(gop)
            stream.options = options
            stream.thread_type = "AUTO"
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
