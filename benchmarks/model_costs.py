"""Cost of the paper-size models: parameters, inference GFLOPs and latency, training throughput,
training memory and (on a known GPU) model FLOPs utilisation, from ``leanvl.profile``.

    python benchmarks/model_costs.py [--train-batch 32] [--repeats 5]

Each row is ``leanvl profile MODEL ...`` (the same function) with the options shown. Training
steps run ``pretrain_losses`` + backward + AdamW under bf16 autocast on a GPU (fp32 on a CPU),
with randomly initialised weights (teachers too: the cost does not depend on the values). The
section of docs/benchmarks.md is per device kind, so CPU and GPU runs keep their own tables.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import table, update_section  # noqa: E402

from leanvl.profile import profile_model  # noqa: E402

#: (label, model, profile options, create_model overrides)
RUNS = [
    ("UMT-B/16 stage 1 (80% semantic masking, UTA from a CLIP-B/16 teacher)", "umt_b16",
     {"frames": 8, "size": 224, "part": "video"},
     ["stage=1", "teacher=b16", "uta_layers=6"]),
    ("UMT-B/16 stage 2 (4 frames, 80% masking, VTC+VTM+MLM+UTA)", "umt_b16",
     {"frames": 4, "size": 224, "part": "full"}, ["stage=2", "teacher=b16"]),
    ("Perceiver-VL B/32 mixed stream (N=128, VTM+MLM)", "perceiver_vl_b32",
     {"frames": 8, "size": 384, "part": "full"}, ["stream=mixed"]),
    ("Perceiver-VL B/32 single stream (N=128, VTM+MLM)", "perceiver_vl_b32",
     {"frames": 8, "size": 384, "part": "full"}, ["stream=single"]),
]
ITEMS = [("params: total", "params"), ("GFLOPs", "inference GFLOPs"), ("latency", "latency (ms)"),
         ("training throughput", "training clips/s"), ("training peak memory", "training memory (MiB)"),
         ("model FLOPs utilisation", "MFU")]


def pick(rows: list[dict[str, str]], prefix: str) -> str:
    """The value of the first row whose item starts with ``prefix`` ('-' if none)."""
    return next((r["value"] for r in rows if r["item"].startswith(prefix)), "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    rows = []
    for label, name, options, overrides in RUNS:
        report = profile_model(name, repeats=args.repeats, train_batch=args.train_batch,
                               overrides=overrides, **options)
        print("\n".join(f"{r['item']}: {r['value']}" for r in report), flush=True)
        command = (f"leanvl profile {name} --frames {options['frames']} --size {options['size']} "
                   f"--part {options['part']} --train-batch {args.train_batch} "
                   + " ".join(overrides))
        rows.append([label, f"`{command}`"] + [pick(report, key) for key, _ in ITEMS])
        if cuda:
            torch.cuda.empty_cache()
    body = (
        "Inference GFLOPs and latency: batch 1, what `--part` names (`video`: the video encoder, "
        "as the papers' tables count it; `full`: video and text encoders and one matching pass); "
        "GFLOPs count one multiply-add as one FLOP. Training: one optimizer step on "
        f"{args.train_batch} clips with 32-token captions, "
        + ("bf16 autocast" if cuda else "fp32") + ", parameters frozen where the method freezes "
        "them (teachers); memory is the peak above the model's own; MFU counts the step's "
        "forward + backward FLOPs at 2 FLOPs per multiply-add against the GPU's dense bf16 "
        "peak.\n\n"
        + table(["model", "command"] + [title for _, title in ITEMS], rows))
    kind = "gpu" if cuda else "cpu"
    update_section(f"model-costs-{kind}", f"Model costs ({'GPU' if cuda else 'CPU'})",
                   "python benchmarks/model_costs.py" + (
                       f" --train-batch {args.train_batch}" if args.train_batch != 32 else ""),
                   body)


if __name__ == "__main__":
    main()
