"""Learning curves of Perceiver-VL demo recipes (and UMT's stage 2 alone, for comparison) on the
synthetic benchmark, through the real training loop with the demo's CPU settings.

    python benchmarks/perceiver_curves.py run SYNTH_DIR NAME PRESET [key=value ...]
    python benchmarks/perceiver_curves.py doc [--name SECTION]

``run`` pre-trains PRESET with the overrides (plus the demo's CPU settings: bf16 autocast where
the CPU has native bf16, torch on every core), evaluates zero-shot text-to-video retrieval on the
benchmark's 1,000-clip test split after every ``train.eval_every`` epochs (default 1), and appends
one row per evaluation to ``--results`` (default ``work/perceiver_curves.jsonl``; the runs go
to ``perceiver_curves/NAME`` beside it). Each evaluation reports R@1 / R@10 by the model's own score (the mixed-stream
decoder's VTM logit for a mixed Perceiver-VL, the dual encoder for UMT) and by the dual encoder
(the pooled VTC embeddings), and R@1 when the dual encoder's top 16 are re-scored by the model.
``doc`` writes the collected rows as a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import table, update_section  # noqa: E402

from leanvl.config import load_config  # noqa: E402
from leanvl.data.datasets import build_dataset  # noqa: E402
from leanvl.demo import cpu_settings  # noqa: E402
from leanvl.engine.precision import autocast  # noqa: E402
from leanvl.metrics import rank_summary, text_to_video_ranks  # noqa: E402
from leanvl.tasks.build import build_text_encoder  # noqa: E402
from leanvl.tasks.pretrain import run_pretrain  # noqa: E402
from leanvl.tasks.retrieval import encode_texts, encode_videos, similarity_matrix  # noqa: E402

RESULTS = Path("work/perceiver_curves.jsonl")


def retrieval_rows(model, dataset, text, precision: str, rerank_k: int = 16) -> dict:
    """t2v R@1/R@10 by the model's score and by the dual encoder, and dual top-k re-scored."""
    texts, owners = dataset.texts()
    with autocast(precision, "cpu"):
        videos = encode_videos(model, dataset, "cpu", 64, 1, progress_bar=False)
        captions = encode_texts(model, texts, text, "cpu", 64, progress_bar=False)
        model_score = similarity_matrix(model, videos, captions, 1024, "cpu")
    model_score = model_score.float()
    dual = (captions.embedding.float() @ videos.embedding.float().t()).float()
    row = {}
    for name, scores in (("model", model_score), ("dual", dual)):
        ranks = rank_summary(text_to_video_ranks(scores, owners), ks=(1, 10))
        row[f"{name} R@1"], row[f"{name} R@10"] = ranks["R@1"], ranks["R@10"]
    # the dual encoder's top k re-scored by the model (ranked above the rest)
    top = dual.topk(rerank_k, dim=1).indices
    offset = (model_score.max() - model_score.min() + dual.max() - dual.min() + 1).item()
    rescored = (dual - offset).scatter(1, top, model_score.gather(1, top) + offset)
    row[f"dual->model@{rerank_k} R@1"] = rank_summary(
        text_to_video_ranks(rescored, owners), ks=(1,))["R@1"]
    return row


def run(args: argparse.Namespace) -> None:
    """Train one recipe and append its curve to the results file."""
    root = Path(args.synth)
    out = Path(args.results).parent / "perceiver_curves" / args.name
    cfg = load_config(args.preset, [f"out={out}",
                                    f"data.root={root}", f"data.train={root}/pretrain.jsonl",
                                    "train.eval_every=1"] + cpu_settings() + args.overrides)
    test = build_dataset(root / "retrieval_test.jsonl", str(root), cfg.data, train=False)
    steps_per_epoch = len(build_dataset(root / "pretrain.jsonl", str(root), cfg.data, True)) \
        // int(cfg.data.batch_size)
    start, rows = time.time(), []

    def evaluate(model) -> dict:
        text = build_text_encoder(cfg.data, model)  # the model's (maybe truncated) vocabulary
        row = {"name": args.name, "preset": args.preset, "overrides": args.overrides,
               "step": steps_per_epoch * int(cfg.train.eval_every) * (len(rows) + 1),
               **retrieval_rows(model, test, text, str(cfg.train.precision)),
               "seconds": time.time() - start}
        rows.append(row)
        print(json.dumps(row), flush=True)
        return {}

    run_pretrain(cfg, evaluate=evaluate, progress=False)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def doc(args: argparse.Namespace) -> None:
    """The collected curves as a docs/benchmarks.md section."""
    rows = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line]
    keys = ["model R@1", "model R@10", "dual R@1", "dual R@10", "dual->model@16 R@1"]
    body = table(["recipe", "step", *keys, "seconds"],
                 [[r["name"], r["step"], *(f"{r[k]:.1f}" for k in keys), f"{r['seconds']:.0f}"]
                  for r in rows])
    update_section(f"curves-{args.name}", f"Learning curves: {args.name}",
                   "python benchmarks/perceiver_curves.py run SYNTH NAME PRESET [key=value ...]",
                   body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS))
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("run")
    train.add_argument("synth")
    train.add_argument("name")
    train.add_argument("preset")
    train.add_argument("overrides", nargs="*")
    write = commands.add_parser("doc")
    write.add_argument("--name", default="perceiver-vl-cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    (run if args.command == "run" else doc)(args)


if __name__ == "__main__":
    main()
