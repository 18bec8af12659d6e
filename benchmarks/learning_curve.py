"""Learning curve of a pre-training recipe on the synthetic benchmark: zero-shot retrieval
(and, for models with a cross-encoder, multiple choice) after every ``train.eval_every`` epochs.

    python benchmarks/learning_curve.py PRESET SYNTH_DIR OUT_DIR [key=value ...] [--name NAME]

For tuning the CPU demo's recipes: how many steps a recipe needs to reach a retrieval level.
Prints one line per evaluation and, with ``--name``, writes them as a section of
docs/benchmarks.md. Evaluation: dual-encoder t2v R@1/R@10 (and re-ranked with
``eval.rerank_k``), MC accuracy overall / temporal / static.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import table, update_section  # noqa: E402

from leanvl.config import load_config  # noqa: E402
from leanvl.data.datasets import build_dataset  # noqa: E402
from leanvl.tasks.build import build_text_encoder  # noqa: E402
from leanvl.tasks.mc import evaluate_mc  # noqa: E402
from leanvl.tasks.pretrain import run_pretrain  # noqa: E402
from leanvl.tasks.retrieval import evaluate_retrieval  # noqa: E402

KEYS = ("dual/t2v/R@1", "dual/t2v/R@10", "rerank/t2v/R@1", "accuracy", "accuracy/temporal",
        "accuracy/static")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset")
    parser.add_argument("synth")
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--name", default="", help="write a docs/benchmarks.md section")
    args = parser.parse_args()
    root = Path(args.synth)
    cfg = load_config(args.preset, [f"out={args.out}", f"data.root={root}",
                                    f"data.train={root}/pretrain.jsonl"] + args.overrides)
    retrieval = build_dataset(root / "retrieval_test.jsonl", str(root), cfg.data, train=False)
    mc = build_dataset(root / "mc_test.jsonl", str(root), cfg.data, train=False, kind="mc")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start, rows = time.time(), []

    def evaluate(model) -> dict:
        text = build_text_encoder(cfg.data, model)  # the model's (maybe truncated) vocabulary
        result = evaluate_retrieval(model, retrieval, text, cfg.eval, device, batch_size=128,
                                    num_workers=4, progress_bar=False)
        out = {k: result[k] for k in KEYS if k in result}
        if getattr(model, "needs_rerank", True) and type(model).__name__ != "ImageTextCLIP":
            choice = evaluate_mc(model, mc, text, cfg.eval, device, batch_size=64,
                                 num_workers=4, progress_bar=False)
            out.update({k: choice[k] for k in KEYS if k in choice})
        out["wall"] = time.time() - start
        rows.append(out)
        print(out, flush=True)
        return out

    run_pretrain(cfg, evaluate=evaluate, progress=False)
    if args.name:
        every = max(1, int(cfg.train.eval_every))
        body = ("`" + " ".join(["python benchmarks/learning_curve.py", args.preset, "SYNTH",
                                "OUT", *args.overrides]) + "`\n\n"
                + table(["epoch", *KEYS, "seconds"],
                        [[every * (i + 1), *(f"{r[k]:.1f}" if k in r else "-" for k in KEYS),
                          f"{r['wall']:.0f}"] for i, r in enumerate(rows)]))
        update_section(f"curve-{args.name}", f"Learning curve: {args.name}", "see below", body)


if __name__ == "__main__":
    main()
