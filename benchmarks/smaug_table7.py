"""SMAUG's Table 7 as measured ratios: training FLOPs and step time of SMAUG-B/16 at 4 frames.

    python benchmarks/smaug_table7.py [--batch 2] [--steps 2] [--precision fp32] [--device cpu]

Four rows, each a ``smaug_b16`` model (random weights, BERT-base sizes) trained on the same
random batch of 4-frame 224x224 clips and 32-token captions: ``pretrain_losses`` (VTC + VTM with
hard negatives + MLM 15%, + MVM where MAE is on) + backward + AdamW.

- dense: no masking, no MAE decoder, no token sparsification, all 4 frames to the cross-encoder;
- + MAE 50%: tube masking of half the patches, the encoder sees the rest, the decoder predicts
  the masked pixels;
- + token sparsification 0.8 (EViT after blocks 4, 7, 10);
- + frame selection 4 -> 2 (the selector picks 2 frames for every pair the cross-encoder sees).

FLOPs per step (forward + backward, 1 multiply-add = 1 FLOP) are counted by
``leanvl.profile.count_flops`` on one step, which is also the warm-up; the time is the mean of
the ``--steps`` steps that follow. Each row builds its model afresh (one row in memory at a time). The paper's column is its pre-training time ratio (144.5 / 93.5 / 82.5 / 77.8 GPU
hours on A6000s).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import table, update_section  # noqa: E402

from leanvl.engine.precision import autocast, resolve_precision  # noqa: E402
from leanvl.models.registry import create_model  # noqa: E402
from leanvl.profile import count_flops  # noqa: E402

#: (row, create_model overrides, the paper's PT hours)
ROWS = [
    ("dense", {"mask_ratio": 0.0, "mvm": False, "keep_rate": 1.0, "selected_frames": 0}, 144.5),
    ("+ MAE 50%", {"mask_ratio": 0.5, "mvm": True, "keep_rate": 1.0, "selected_frames": 0}, 93.5),
    ("+ token sparsification 0.8", {"mask_ratio": 0.5, "mvm": True, "keep_rate": 0.8,
                                    "selected_frames": 0}, 82.5),
    ("+ frame selection 4 -> 2", {"mask_ratio": 0.5, "mvm": True, "keep_rate": 0.8,
                                  "selected_frames": 2}, 77.8),
]


def measure(overrides: dict, batch: dict, steps: int, precision: str, device: torch.device
            ) -> tuple[float, float]:
    """(training GFLOPs per step, mean step seconds) of one row."""
    torch.manual_seed(0)
    model = create_model("smaug_b16", num_frames=4, **overrides).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def losses() -> torch.Tensor:
        with autocast(precision, device):
            return sum(model.pretrain_losses(batch).values())

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        losses().backward()
        optimizer.step()

    # the counted step (forward + backward) is also the warm-up of the timed ones
    gflops = count_flops(losses, backward=True)
    optimizer.step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return gflops, sum(times) / len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-doc", action="store_true", help="print only")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = resolve_precision(args.precision, device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, 32), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    batch = {"video": torch.randn(args.batch, 4, 3, 224, 224, generator=generator),
             "text_ids": ids, "text_mask": torch.ones_like(ids),
             "index": torch.arange(args.batch)}
    batch = {k: v.to(device) for k, v in batch.items()}
    results = []
    for label, overrides, hours in ROWS:
        gflops, seconds = measure(overrides, batch, args.steps, precision, device)
        results.append((label, gflops, seconds, hours))
        gc.collect()
        print(f"{label}: {gflops:.0f} GFLOPs/step, {seconds:.2f} s/step", flush=True)
    dense_flops, dense_time, dense_hours = results[0][1:]
    rows = [[label, f"{gflops:.0f}", f"{dense_flops / gflops:.2f}x", f"{seconds:.2f}",
             f"{dense_time / seconds:.2f}x", f"{hours}", f"{dense_hours / hours:.2f}x"]
            for label, gflops, seconds, hours in results]
    body = (f"SMAUG-B/16 (random weights), {args.batch} clips of 4 frames at 224x224 + 32-token "
            f"captions per step, {precision}, on {device.type}; step time = mean of "
            f"{args.steps} steps after a counted warm-up step (pretrain_losses + backward + AdamW). Speed-up "
            "columns are against the dense row; the paper's are its pre-training GPU hours. "
            "CPU timings come from a shared 2-core machine (run under the heavy-job lock).\n\n"
            + table(["row (Table 7)", "GFLOPs / step", "FLOPs speed-up", "s / step",
                     "time speed-up", "paper PT hours", "paper speed-up"], rows))
    if args.no_doc:
        print(body)
        return
    command = "python benchmarks/smaug_table7.py" + (
        f" --batch {args.batch}" if args.batch != 2 else "") + (
        f" --steps {args.steps}" if args.steps != 2 else "") + (
        f" --precision {args.precision}" if args.precision != "fp32" else "") + (
        f" --device {args.device}" if args.device != "cpu" else "")
    update_section(f"smaug-table7-{device.type}", f"SMAUG Table 7: training cost per component "
                   f"({device.type.upper()})", command, body)


if __name__ == "__main__":
    main()
