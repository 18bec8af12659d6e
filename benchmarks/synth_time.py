"""Time `leanvl.data.synthetic.generate` at the default sizes and record it in docs/benchmarks.md.

    python benchmarks/synth_time.py [--workers N] [--keep DIR] [--picture docs/img/synthetic_samples.png]

Runs generation twice into the same folder: a fresh run (every clip rendered and encoded) and
a resumed run (every clip already on disk). ``--picture`` also writes the sample-frame sheet
shown in docs/synthetic.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import table, update_section  # noqa: E402

from leanvl.config import SynthConfig  # noqa: E402
from leanvl.data.synthetic import format_summary, generate, sample_sheet  # noqa: E402

# Clips shown in the docs picture: temporal MC items (a motion, an order of events) and
# pre-training clips with several objects.
PICTURE_CLIPS = [("mc_test", 0), ("mc_test", 2), ("pretrain", 5), ("pretrain", 7), ("pretrain", 1)]


def write_picture(path: Path) -> None:
    """The sample sheet of PICTURE_CLIPS at default settings, as PNG.

    Rows are drawn without per-pixel noise (a noisy PNG would weigh ~600 KB), except a last
    row repeating the first clip with the default noise.
    """
    import numpy as np
    import torch
    from torchvision.io import write_png

    cfg = SynthConfig()
    clean = sample_sheet(cfg, PICTURE_CLIPS, frames=6, noise=0.0)
    noisy = sample_sheet(cfg, PICTURE_CLIPS[:1], frames=6)
    gap = np.full((2, clean.shape[1], 3), 255, np.uint8)
    sheet = np.concatenate([clean, gap, noisy])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(torch.from_numpy(sheet).permute(2, 0, 1).contiguous(), str(path), compression_level=9)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=0, help="0: one process per core")
    parser.add_argument("--keep", default="", help="write here instead of a temporary folder")
    parser.add_argument("--picture", default="", help="also write the docs sample sheet here")
    args = parser.parse_args()
    if args.picture:
        write_picture(Path(args.picture))
    runs = []
    with tempfile.TemporaryDirectory(prefix="leanvl-synth-") as tmp:
        cfg = SynthConfig(out=args.keep or tmp, workers=args.workers)
        for name, progress in (("fresh", True), ("resumed (all clips on disk)", False)):
            # CPU time (this process and its finished workers) does not depend on other load.
            cpu = sum(os.times()[:4])
            summary = generate(cfg, progress=progress)
            runs.append((name, summary, sum(os.times()[:4]) - cpu, os.getloadavg()[0]))
    print(format_summary(runs[0][1]))
    clips = sum(runs[0][1]["clips"].values())
    rows = [[name, clips, run["encoded"], f"{run['seconds']:.1f}", f"{run['clips_per_second']:.1f}",
             f"{cpu:.0f}", f"{load:.1f}"] for name, run, cpu, load in runs]
    workers = args.workers or "one per core"
    splits = ", ".join(f"{k} {v}" for k, v in runs[0][1]["clips"].items())
    body = (f"Default `SynthConfig`: {clips} clips ({splits}), {cfg.frames} frames at "
            f"{cfg.size}x{cfg.size}, {cfg.fps:g} fps, H.264 crf {cfg.crf}; workers: {workers}. "
            "CPU seconds add up all processes; the load average (1 min, at the end of the run) "
            "shows whether other jobs shared the cores.\n\n"
            + table(["run", "clips", "encoded", "seconds", "clips/s", "CPU seconds",
                     "load average"], rows))
    command = "python benchmarks/synth_time.py" + (f" --workers {args.workers}" if args.workers else "")
    update_section("synth", "Synthetic benchmark generation", command, body)


if __name__ == "__main__":
    main()
