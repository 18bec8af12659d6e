"""Run ``leanvl demo`` from scratch and record its results and timings in docs/benchmarks.md.

    python benchmarks/demo_results.py [--method umt|perceiver_vl|smaug|evilm] [--quick] [--ablation] [--out DIR]
                                      [--budget MINUTES] [--precision auto|bf16|fp32]

Each run starts from an empty folder (the synthetic benchmark is generated again), so the time
is what ``make demo`` takes on this machine (without the install). ``--ablation`` (UMT) also runs
stage 2 alone, with as many steps as the full pipeline's stage 2, without stage 1 and without
UTA, into the same folder (the teacher and the benchmark are reused, so its time is the
ablation's training and evaluation only). ``--budget`` and ``--precision`` are the demo's.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import table, update_section  # noqa: E402

from leanvl.demo import METHODS, run_demo  # noqa: E402

ROWS = [("text-to-video R@1 (dual encoder / model score)", "retrieval", "dual/t2v/R@1"),
        ("text-to-video R@1 (re-ranked)", "retrieval", "rerank/t2v/R@1"),
        ("text-to-video R@1 (separate encoders' embeddings, where the score is joint)",
         "retrieval", "embed/t2v/R@1"),
        ("text-to-video R@5 / R@10 (dual)", "retrieval", ("dual/t2v/R@5", "dual/t2v/R@10")),
        ("video-to-text R@1 (dual)", "retrieval", "dual/v2t/R@1"),
        ("multiple choice: all", "mc", "accuracy"),
        ("multiple choice: temporal items (chance 20)", "mc", "accuracy/temporal"),
        ("multiple choice: static items (chance 20)", "mc", "accuracy/static"),
        ("QA accuracy, answer ranking", "qa", "accuracy")]


def _value(results: dict, task: str, key) -> str:
    part = results[task]
    if isinstance(key, tuple):
        return " / ".join(f"{part[k]:.1f}" for k in key)
    return f"{part[key]:.1f}" if key in part else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="umt", choices=list(METHODS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ablation", action="store_true", help="UMT: also stage 2 alone")
    parser.add_argument("--out", default="", help="keep the demo folder here")
    parser.add_argument("--budget", type=float, default=15.0, help="the demo's budget, minutes")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="leanvl-demo-"))
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: the timing needs a fresh folder")
    options = dict(quick=args.quick, progress=False, budget_minutes=args.budget,
                   precision=args.precision)
    runs = [("full pipeline", run_demo(out, method=args.method, **options))]
    if args.ablation:
        runs.append(("stage 2 only (no stage 1, no UTA)",
                     run_demo(out, ablation=True, **options)))
    first = runs[0][1]["results"]
    rows = [[name] + [_value(run["results"], task, key) for run_name, run in runs]
            for name, task, key in ROWS]
    timing_names = list(runs[0][1]["timings"])
    for name in timing_names:
        rows.append([f"time: {name} (s)"] + [
            f"{run['timings'][name]:.0f}" if name in run["timings"] else "-" for _, run in runs])
    for name in runs[-1][1]["timings"]:
        if name not in timing_names:
            rows.append([f"time: {name} (s)"] + [
                f"{run['timings'][name]:.0f}" if name in run["timings"] else "-"
                for _, run in runs])
    retrieval = first["retrieval"]
    body = (
        f"`leanvl demo --method {args.method}{' --quick' if args.quick else ''}` from an empty "
        f"folder on this machine: {retrieval['num_videos']} retrieval test clips "
        f"({100 * retrieval['unique_caption_fraction']:.1f}% of the captions unique), "
        f"{first['mc']['num_items']} multiple-choice items, {first['qa']['num_items']} QA "
        "questions, all zero-shot. R@k and accuracies in %. "
        + ("The ablation column reuses the benchmark and the teacher; its times are its own "
           "stages. " if args.ablation else "")
        + "\n\n" + table(["", *[name for name, _ in runs]], rows))
    suffix = f"{args.method}{'-quick' if args.quick else ''}"
    command = (f"python benchmarks/demo_results.py --method {args.method}"
               + (" --quick" if args.quick else "") + (" --ablation" if args.ablation else "")
               + f" --budget {args.budget:g}"
               + (f" --precision {args.precision}" if args.precision else ""))
    update_section(f"demo-{suffix}", f"Demo: {args.method}{' (quick)' if args.quick else ''}",
                   command, body)
    if not args.out:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
