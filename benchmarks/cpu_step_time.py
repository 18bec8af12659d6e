"""CPU training-step time of the demo's models: fp32 against bf16 autocast, one and two threads.

    python benchmarks/cpu_step_time.py [--repeats 4]

Each row is ``leanvl profile MODEL --frames F --size 96 --train-batch 64 --precision P`` (the same
function) with torch limited to the given number of threads: ``pretrain_losses`` + backward +
AdamW on random 96x96 clips and 40-token captions, teachers frozen. The demo trains with one
torch thread beside one loader worker on this 2-core machine; bf16 pays off only on CPUs with
native bf16 matrix units (AMX or AVX512-BF16); the section lists the CPU flags found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import table, update_section  # noqa: E402

from leanvl.engine.precision import native_bf16_flags  # noqa: E402
from leanvl.profile import profile_model  # noqa: E402

TEACHER = ["teacher=tiny", "teacher_kwargs.image_size=96", "uta_layers=2"]
MINILM = ["text_pretrained=minilm", "text.text_layers=2", "text.fusion_layers=1"]
#: (label, model, frames, create_model overrides)
RUNS = [
    ("demo teacher: CLIP-tiny, VTC on single frames", "clip_tiny", 1, ["vision.image_size=96"]),
    ("demo teacher with MiniLM (3 layers) as text tower", "clip_tiny", 1,
     ["vision.image_size=96", "text_pretrained=minilm", "text.text_layers=3"]),
    ("UMT-tiny stage 1 (80% semantic masking, UTA)", "umt_tiny", 4,
     ["stage=1", "video_mask_ratio=0.8", *TEACHER]),
    ("UMT-tiny stage 2 (demo: scratch BERT, 50% masking, UTA)", "umt_tiny", 4,
     ["stage=2", "video_mask_ratio=0.5", *TEACHER]),
    ("UMT-tiny stage 2 with MiniLM (2 text + 1 fusion layers)", "umt_tiny", 4,
     ["stage=2", "video_mask_ratio=0.5", "mlm_ratio=0.15", *TEACHER, *MINILM]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for label, name, frames, overrides in RUNS:
        row = [label]
        for precision in ("fp32", "bf16"):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                torch.manual_seed(0)
                report = profile_model(name, frames=frames, size=96, text_len=40,
                                       part="video" if "stage=1" in overrides else "full",
                                       latency=False, repeats=args.repeats,
                                       train_batch=args.batch, overrides=overrides,
                                       device="cpu", precision=precision)
                clips = float(next(r["value"] for r in report
                                   if r["item"].startswith("training throughput")).split()[0])
                row.append(f"{args.batch / clips:.2f}")
                print(label, precision, threads, f"{args.batch / clips:.2f} s/step", flush=True)
        row.append(f"{float(row[1]) / float(row[3]):.2f}x")
        rows.append(row)
    body = (f"Seconds per training step of {args.batch} clips (96x96, 40-token captions), "
            f"random weights; native bf16 flags of this CPU: {', '.join(native_bf16_flags()) or 'none'}. The last column "
            "is the one-thread speed-up of bf16 autocast over fp32.\n\n"
            + table(["model", "fp32, 1 thread", "fp32, 2 threads", "bf16, 1 thread",
                     "bf16, 2 threads", "bf16 speed-up"], rows))
    update_section("cpu-step-time", "Demo models: CPU step time, fp32 and bf16",
                   "python benchmarks/cpu_step_time.py", body)


if __name__ == "__main__":
    main()
