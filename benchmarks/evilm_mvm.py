"""E-ViLM on the synthetic benchmark: the tokenizer's codebook over training (with and without
dead-code restarts) and MVM's effect (Table 5's question): pre-training with and without MVM,
same budget, zero-shot retrieval and multiple choice side by side.

    python benchmarks/evilm_mvm.py --demo DIR

``DIR`` is a finished ``leanvl demo --method evilm`` folder (e.g. from
``benchmarks/demo_results.py --method evilm --out DIR``): its tokenizer and its pre-training
(MLM + VTM + MVM + VTC) are the "with" runs. This script trains, on the same benchmark, the
tokenizer without dead-code restarts and E-ViLM without MVM (same recipe, steps and seed),
evaluates both pre-trained models zero-shot and writes the section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import table, update_section  # noqa: E402

from leanvl.demo import _stage_config, _train_stage, evaluate_all  # noqa: E402
from leanvl.report import read_metrics  # noqa: E402


def codebook_curve(stage: Path, every: int) -> list[dict]:
    """The logged codebook utilisation / perplexity of a tokenizer run, every ``every`` steps
    (and the last record)."""
    records = [r for r in read_metrics(stage) if "metric/codebook_utilisation" in r]
    picked = [r for r in records if r["step"] % every == 0]
    if records and (not picked or picked[-1]["step"] != records[-1]["step"]):
        picked.append(records[-1])
    return picked


def steps_taken(stage: Path) -> int:
    """The steps a demo stage really trained (its budget may have cut the preset short)."""
    return max(int(r["step"]) for r in read_metrics(stage) if "step" in r)


def usage_on_test(tokenizer: Path, root: Path, cfg) -> dict:
    """Codebook statistics of the released tokenizer over the retrieval test clips."""
    from leanvl.engine.checkpoint import load_pretrained
    from leanvl.tasks.codes import dataset_codebook_statistics

    return dataset_codebook_statistics(load_pretrained(tokenizer), root / "retrieval_test.jsonl",
                                       str(root), cfg.data, batch_size=64, progress_bar=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", required=True, help="a finished `leanvl demo --method evilm` "
                        "folder")
    parser.add_argument("--every", type=int, default=20, help="curve: a row every N steps")
    args = parser.parse_args()
    demo = Path(args.demo)
    root = demo / "synth"
    for needed in (demo / "evilm_tokenizer" / "model", demo / "evilm" / "model",
                   demo / "evilm_tokenizer" / "metrics.jsonl", demo / "evilm" / "metrics.jsonl"):
        if not needed.exists():
            raise SystemExit(f"{needed} is missing: run the E-ViLM demo into {demo} first")
    timings: dict[str, float] = {}

    # tokenizer without dead-code restarts, same recipe and steps otherwise
    cfg = _stage_config("demo_evilm_tokenizer", demo / "evilm_tokenizer_no_restart", root,
                        ["model.kwargs.restart_every=0",
                         f"train.max_steps={steps_taken(demo / 'evilm_tokenizer')}"])
    no_restart = _train_stage("tokenizer without restarts", cfg, timings, progress=False)
    curves = {"restarts (demo)": codebook_curve(demo / "evilm_tokenizer", args.every),
              "no restarts": codebook_curve(demo / "evilm_tokenizer_no_restart", args.every)}
    usage = {"restarts (demo)": usage_on_test(demo / "evilm_tokenizer" / "model", root, cfg),
             "no restarts": usage_on_test(no_restart, root, cfg)}

    # E-ViLM without MVM, the demo's recipe and steps otherwise
    cfg = _stage_config("demo_evilm", demo / "evilm_no_mvm", root,
                        ["model.kwargs.losses=[vtc,vtm,mlm]",
                         f"train.max_steps={steps_taken(demo / 'evilm')}"])
    without = _train_stage("E-ViLM without MVM", cfg, timings, progress=False)
    results = {"with MVM (demo)": evaluate_all(demo / "evilm" / "model", root, cfg, False),
               "without MVM": evaluate_all(without, root, cfg, False)}

    steps = sorted({r["step"] for curve in curves.values() for r in curve})
    curve_rows = []
    for step in steps:
        row = [str(step)]
        for curve in curves.values():
            found = next((r for r in curve if r["step"] == step), None)
            row.append("-" if found is None else
                       f"{100 * found['metric/codebook_utilisation']:.1f} / "
                       f"{found['metric/codebook_perplexity']:.1f}")
        curve_rows.append(row)
    usage_rows = [[name, f"{u['codes_used']} of {u['num_codes']}",
                   f"{100 * u['utilisation']:.1f}", f"{u['perplexity']:.1f}"]
                  for name, u in usage.items()]
    keys = [("text-to-video R@1 / R@5 / R@10 (dual)", "retrieval",
             ("dual/t2v/R@1", "dual/t2v/R@5", "dual/t2v/R@10")),
            ("text-to-video R@1 / R@5 / R@10 (re-ranked by VTM)", "retrieval",
             ("rerank/t2v/R@1", "rerank/t2v/R@5", "rerank/t2v/R@10")),
            ("video-to-text R@1 (dual / re-ranked)", "retrieval",
             ("dual/v2t/R@1", "rerank/v2t/R@1")),
            ("multiple choice: all / temporal / static", "mc",
             ("accuracy", "accuracy/temporal", "accuracy/static")),
            ("QA accuracy, answer ranking", "qa", ("accuracy",))]
    effect_rows = [[label] + [" / ".join(f"{run[task].get(k, float('nan')):.1f}" for k in ks)
                              for run in results.values()] for label, task, ks in keys]
    seconds = json.loads((demo / "evilm" / "stage_time.json").read_text())["seconds"]
    effect_rows.append(["pre-training time (s)", f"{seconds:.0f}",
                        f"{timings['E-ViLM without MVM']:.0f}"])
    body = (
        "E-ViLM-tiny on the synthetic benchmark (the demo's recipe: 96-pixel frames, 4 frames, "
        "3 x 3 EdgeNeXt cells per frame and one tokenizer code per cell), each comparison run "
        "as many steps as the demo's stage took within its 15-minute budget. 2-core AMD EPYC "
        "(avx512_bf16), bf16 autocast.\n\n"
        "**Tokenizer codebook over training** (512 codes; utilisation % / perplexity of the "
        "batch's codes as logged: utilisation counts the codes chosen in the last "
        "`dead_after`=20 steps):\n\n"
        + table(["step", *curves], curve_rows)
        + "\n\n**Codebook on the 1,000 retrieval test clips** after training:\n\n"
        + table(["tokenizer", "codes used", "utilisation %", "perplexity"], usage_rows)
        + "\n\n**MVM's effect** (same recipe, steps and seed; zero-shot; R@k and accuracies "
        "in %; MC chance 20):\n\n"
        + table(["", *results], effect_rows))
    update_section("evilm-mvm", "E-ViLM: codebook utilisation and MVM's effect (synthetic)",
                   f"python benchmarks/evilm_mvm.py --demo {args.demo}", body)


if __name__ == "__main__":
    main()
