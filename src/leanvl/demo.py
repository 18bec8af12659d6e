"""``leanvl demo``: a method's whole pipeline on the synthetic benchmark, on the CPU.

``--method umt`` (default):

1. generate the synthetic benchmark (real mp4 files + annotations);
2. train a small CLIP with VTC on single frames (no CLIP weights exist offline; with real
   weights this step is skipped by passing ``teacher=PATH``) and export its image tower;
3. UMT stage 1: video-only distillation from that teacher (semantic masking + UTA);
4. UMT stage 2: vision-language pre-training (VTC + VTM + MLM + UTA) from the stage-1 weights;
5. zero-shot evaluation: retrieval on the 1,000-clip test split, multiple choice (temporal and
   static items), QA by answer ranking; a results table and a report folder with plots.

``--method evilm``: the same benchmark and evaluation around E-ViLM-tiny: its semantic VQ
tokenizer first (codebook utilisation and perplexity measured on the retrieval test clips),
then pre-training with MLM + VTM + MVM on the tokenizer's codes (+ VTC on the unimodal
passes, for zero-shot retrieval), evaluated with the unimodal fast path re-ranked by VTM.

``--method perceiver_vl``: the same benchmark and evaluation around one pre-training stage of
Perceiver-VL-tiny (VTM with swapped videos + MLM through the query decoder, LayerDrop on
cross-attention), evaluated as a mixed-stream model (every test pair scored by the decoder over
cached latents).

A stage whose released weights exist with an identical config is reused, so an interrupted
demo continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from leanvl.config import load_config, save_config

log = logging.getLogger(__name__)

# The demo's benchmark: clips of 8 frames (the demo samples 4), which halves decoding and
# rendering against the default 16, and no classification splits, which the demo does not use
# (benchmarks/action_recognition.py adds them to a demo folder).
DEMO_SYNTH = ["frames=8", "classify_train_clips=0", "classify_test_clips=0"]
QUICK_SYNTH = ["pretrain_clips=500", "retrieval_test_clips=200", "mc_test_clips=200"]
QUICK_TRAIN = {"teacher": ["train.epochs=3"], "stage1": ["train.epochs=1"],
               "stage2": ["train.epochs=3"], "perceiver_vl": ["train.epochs=4"],
               "evilm_tokenizer": ["train.epochs=1"], "evilm": ["train.epochs=1"]}
METHODS = ("umt", "perceiver_vl", "evilm")


def _stage_config(preset: str, out: Path, synth_root: Path, extra: list[str]):
    overrides = [f"out={out}", f"data.root={synth_root}",
                 f"data.train={synth_root / 'pretrain.jsonl'}"] + cpu_settings() + extra
    return load_config(preset, overrides)


def cpu_settings() -> list[str]:
    """On the CPU: bf16 autocast where the CPU has native bf16 units (2.0-2.5x faster steps
    for the demo's models), and torch on every core beside the loader worker, since the
    demo's small clips keep the worker mostly idle (docs/benchmarks.md, "Demo models: CPU
    step time"). Elsewhere the engine's defaults."""
    import torch

    from leanvl.engine.precision import native_bf16_flags

    if torch.cuda.is_available():
        return []
    return (["train.precision=bf16"] if native_bf16_flags() else []) + [
        f"data.cpu_threads={os.cpu_count() or 1}"]


def _done(cfg) -> bool:
    """True when this stage already released weights under an identical config."""
    out = Path(cfg.out)
    saved = out / "stage_config.yaml"
    return (out / "model" / "model.safetensors").is_file() and saved.is_file() \
        and saved.read_text() == OmegaConf.to_yaml(cfg, resolve=True)


def _train_stage(name: str, cfg, timings: dict[str, float], progress: bool = True) -> Path:
    from leanvl.tasks.pretrain import run_pretrain

    if _done(cfg):
        log.info("demo: %s already trained in %s, reusing it", name, cfg.out)
        timings[name] = json.loads((Path(cfg.out) / "stage_time.json").read_text())["seconds"]
    else:
        start = time.perf_counter()
        run_pretrain(cfg, evaluate=lambda model: {}, progress=progress)
        timings[name] = time.perf_counter() - start
        (Path(cfg.out) / "stage_time.json").write_text(json.dumps({"seconds": timings[name]}))
        save_config(cfg, cfg.out, "stage_config.yaml")
    return Path(cfg.out) / "model"


def evaluate_all(model_dir: Path, synth_root: Path, cfg, progress: bool = True) -> dict[str, Any]:
    """Zero-shot retrieval, multiple choice and QA of released weights on the benchmark."""
    from leanvl.engine.checkpoint import load_pretrained
    from leanvl.engine.precision import autocast
    from leanvl.tasks.build import build_text_encoder

    model = load_pretrained(model_dir)
    text = build_text_encoder(cfg.data, model)
    with autocast(cfg.train.precision, "cpu"):  # the stages' precision (bf16 on such CPUs)
        return _evaluate(model, text, cfg, synth_root, progress)


def _evaluate(model, text, cfg, synth_root: Path, progress: bool) -> dict[str, Any]:
    from leanvl.data.datasets import build_dataset
    from leanvl.tasks.mc import evaluate_mc
    from leanvl.tasks.qa import evaluate_qa
    from leanvl.tasks.retrieval import evaluate_retrieval

    data, root = cfg.data, str(synth_root)
    kwargs = dict(batch_size=cfg.eval.batch_size, num_workers=data.num_workers)
    results: dict[str, Any] = {}
    retrieval_set = build_dataset(synth_root / "retrieval_test.jsonl", root, data, train=False)
    results["retrieval"] = evaluate_retrieval(model, retrieval_set, text, cfg.eval, "cpu",
                                              progress_bar=progress, return_scores=True,
                                              **kwargs)
    texts, _ = retrieval_set.texts()
    results["retrieval"]["unique_caption_fraction"] = len(set(texts)) / len(texts)
    mc_set = build_dataset(synth_root / "mc_test.jsonl", root, data, train=False, kind="mc")
    results["mc"] = evaluate_mc(model, mc_set, text, cfg.eval, "cpu", progress_bar=progress,
                                **kwargs)
    answers = json.loads((synth_root / "answers.json").read_text())
    qa_set = build_dataset(synth_root / "qa_test.jsonl", root, data, train=False, kind="qa",
                           answers=answers)
    results["qa"] = evaluate_qa(model, qa_set, text, cfg.eval, "cpu", answers=answers,
                                mode="rank", progress_bar=progress, **kwargs)
    return results


def results_table(results: dict[str, Any], timings: dict[str, float]) -> str:
    """The demo's summary as an aligned text table."""
    r, mc, qa = results["retrieval"], results["mc"], results["qa"]
    final = "rerank_skipped" in r  # the model's similarity already is its final score
    rows = [
        ("text-to-video R@1 / R@5 / R@10" + ("" if final else " (dual encoder)"),
         f"{r['dual/t2v/R@1']:.1f} / {r['dual/t2v/R@5']:.1f} / {r['dual/t2v/R@10']:.1f}"),
    ]
    if final:
        rows.append(("video-to-text R@1", f"{r['dual/v2t/R@1']:.1f}"))
    else:
        rows += [
            (f"text-to-video R@1 / R@5 / R@10 (re-ranked, k={r.get('rerank_k', '-')})",
             f"{r['rerank/t2v/R@1']:.1f} / {r['rerank/t2v/R@5']:.1f} / "
             f"{r['rerank/t2v/R@10']:.1f}" if "rerank/t2v/R@1" in r else "-"),
            ("video-to-text R@1 (dual / re-ranked)",
             f"{r['dual/v2t/R@1']:.1f} / {r.get('rerank/v2t/R@1', float('nan')):.1f}"),
        ]
    rows += [
        ("retrieval test clips (unique captions)",
         f"{r['num_videos']} ({100 * r['unique_caption_fraction']:.1f}%)"),
        ("multiple choice accuracy: all / temporal / static (chance 20)",
         f"{mc['accuracy']:.1f} / {mc.get('accuracy/temporal', float('nan')):.1f} / "
         f"{mc.get('accuracy/static', float('nan')):.1f}"),
        ("QA accuracy, answer ranking (zero-shot)", f"{qa['accuracy']:.1f}"),
    ]
    rows += [(f"time: {name}", f"{seconds:.0f} s") for name, seconds in timings.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def run_demo(out: str | Path = "work/demo", quick: bool = False, progress: bool = True,
             ablation: bool = False, synth_overrides: list[str] | None = None,
             teacher: str | None = None, method: str = "umt") -> dict[str, Any]:
    """Run the demo of ``method`` into ``out``; returns {results, timings, report}."""
    from leanvl.config import to_object
    from leanvl.data import synthetic
    from leanvl.report import write_report

    if method not in METHODS:
        raise ValueError(f"unknown demo method {method!r}; choose from {', '.join(METHODS)}")
    if method != "umt" and (ablation or teacher):
        raise ValueError("--ablation and --teacher belong to the UMT demo (--method umt)")
    out = Path(out)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    synth_cfg = load_config(None, [f"synth.out={out / 'synth'}"] + [
        f"synth.{o}" if not o.startswith("synth.") else o
        for o in DEMO_SYNTH + (QUICK_SYNTH if quick else []) + list(synth_overrides or [])])
    save_config(synth_cfg.synth, out / "synth", "synth_config.yaml")
    summary = synthetic.generate(to_object(synth_cfg).synth, progress=progress)
    print(synthetic.format_summary(summary))
    timings["synthetic benchmark"] = time.perf_counter() - start
    root = out / "synth"
    quick_for = (lambda stage: QUICK_TRAIN[stage]) if quick else (lambda stage: [])

    if method == "perceiver_vl":
        cfg = _stage_config("demo_perceiver_vl", out / "perceiver_vl", root,
                            quick_for("perceiver_vl"))
        final = _train_stage("Perceiver-VL pre-training", cfg, timings, progress)
        stages, report_name = [out / "perceiver_vl"], "report_perceiver_vl"
    elif method == "evilm":
        final, cfg = _evilm_stages(out, root, quick_for, timings, progress)
        stages, report_name = [out / "evilm_tokenizer", out / "evilm"], "report_evilm"
    else:
        final, cfg, teacher = _umt_stages(out, root, ablation, teacher, quick_for, timings,
                                          progress)
        stages = _stage_dirs(out, ablation, teacher)
        report_name = "report_ablation" if ablation else "report"
    eval_start = time.perf_counter()
    results = evaluate_all(final, root, cfg, progress)
    timings["zero-shot evaluation"] = time.perf_counter() - eval_start
    timings["total"] = time.perf_counter() - start
    table = results_table(results, timings)
    report = write_report(out / report_name, results, timings, table, stages=stages,
                          model_dir=final, synth_root=root, teacher=teacher, cfg=cfg)
    name = "results.json" if report_name == "report" else f"results_{report_name[7:]}.json"
    (out / name).write_text(json.dumps({"results": results, "timings": timings}, indent=1,
                                       default=float))
    print("\n" + table + f"\n\nreport: {report}")
    return {"results": results, "timings": timings, "report": str(report)}


def _umt_stages(out: Path, root: Path, ablation: bool, teacher: str | None, quick_for,
                timings: dict[str, float], progress: bool = True):
    """The UMT stages (teacher, stage 1, stage 2 or the stage-2-only ablation); returns the
    final weights folder, the last stage's config and the teacher file."""
    if teacher is None:
        cfg = _stage_config("demo_clip_teacher", out / "teacher", root, quick_for("teacher"))
        teacher_dir = _train_stage("teacher (CLIP, VTC on frames)", cfg, timings, progress)
        teacher = str(out / "teacher" / "clip_visual.safetensors")
        if not Path(teacher).is_file() or Path(teacher).stat().st_mtime < \
                (teacher_dir / "model.safetensors").stat().st_mtime:
            from leanvl.engine.checkpoint import load_pretrained

            load_pretrained(teacher_dir).export_teacher(teacher)
    teacher_args = [f"model.kwargs.teacher={teacher}"]
    if ablation:
        cfg = _stage_config("demo_umt_stage2", out / "stage2_only", root,
                            ["model.kwargs.teacher=", "model.kwargs.mask_type=random"]
                            + quick_for("stage2"))
        final = _train_stage("stage 2 only (no stage 1, no UTA)", cfg, timings, progress)
    else:
        cfg = _stage_config("demo_umt_stage1", out / "stage1", root,
                            teacher_args + quick_for("stage1"))
        stage1 = _train_stage("UMT stage 1", cfg, timings, progress)
        cfg = _stage_config("demo_umt_stage2", out / "stage2", root,
                            teacher_args + [f"model.pretrained={stage1}"] + quick_for("stage2"))
        final = _train_stage("UMT stage 2", cfg, timings, progress)
    return final, cfg, teacher


def _evilm_stages(out: Path, root: Path, quick_for, timings: dict[str, float],
                  progress: bool = True):
    """E-ViLM's stages: the semantic VQ tokenizer, then pre-training (MLM + VTM + MVM on its
    codes, plus VTC on the unimodal passes); returns the final weights folder and the last
    stage's config. The tokenizer's codebook usage on the retrieval test clips is logged."""
    cfg = _stage_config("demo_evilm_tokenizer", out / "evilm_tokenizer", root,
                        quick_for("evilm_tokenizer"))
    tokenizer = _train_stage("E-ViLM tokenizer (semantic VQ)", cfg, timings, progress)
    usage_file = out / "evilm_tokenizer" / "codebook_usage.json"
    if not usage_file.is_file() or usage_file.stat().st_mtime < \
            (tokenizer / "model.safetensors").stat().st_mtime:
        from leanvl.engine.checkpoint import load_pretrained
        from leanvl.tasks.codes import dataset_codebook_statistics

        start = time.perf_counter()
        usage = dataset_codebook_statistics(load_pretrained(tokenizer),
                                            root / "retrieval_test.jsonl", str(root), cfg.data,
                                            batch_size=64, progress_bar=progress)
        usage["seconds"] = time.perf_counter() - start
        usage_file.write_text(json.dumps(usage, indent=1))
    usage = json.loads(usage_file.read_text())
    timings["tokenizer codebook usage"] = usage["seconds"]
    log.info("demo: tokenizer codebook on the retrieval test clips: %d of %d codes used "
             "(utilisation %.1f%%), perplexity %.1f", usage["codes_used"], usage["num_codes"],
             100 * usage["utilisation"], usage["perplexity"])
    cfg = _stage_config("demo_evilm", out / "evilm", root,
                        [f"model.kwargs.tokenizer={tokenizer}"] + quick_for("evilm"))
    final = _train_stage("E-ViLM pre-training (MLM + VTM + MVM + VTC)", cfg, timings, progress)
    return final, cfg


def _stage_dirs(out: Path, ablation: bool, teacher: str) -> list[Path]:
    names = ["stage2_only"] if ablation else ["stage1", "stage2"]
    if (out / "teacher").is_dir():
        names.insert(0, "teacher")
    return [out / n for n in names if (out / n).is_dir()]
