"""``leanvl demo``: a method's whole pipeline on the synthetic benchmark, on the CPU.

``--method umt`` (default):

1. generate the synthetic benchmark (real mp4 files + annotations);
2. train a small CLIP with VTC on single frames (no CLIP weights exist offline; with real
   weights this step is skipped by passing ``teacher=PATH``) and export its image tower;
3. UMT stage 1: video-only distillation from that teacher (semantic masking + UTA);
4. UMT stage 2: vision-language pre-training (VTC + VTM + MLM + UTA) from the stage-1 weights;
5. zero-shot evaluation: retrieval on the 1,000-clip test split, multiple choice (temporal and
   static items), QA by answer ranking; a results table and a report folder with plots.

``--method smaug``: SMAUG-tiny pre-trained in two stages (one frame, then 4 frames with
text-guided selection of 2 for the cross-encoder, from the single-frame weights), evaluated as
UMT is (dual encoder, then the top candidates re-ranked by VTM).

``--method evilm``: the same benchmark and evaluation around E-ViLM-tiny: its semantic VQ
tokenizer first (codebook utilisation and perplexity measured on the retrieval test clips),
then pre-training with MLM + VTM + MVM on the tokenizer's codes (+ VTC on the unimodal
passes, for zero-shot retrieval), evaluated with the unimodal fast path re-ranked by VTM.

``--method perceiver_vl``: the same benchmark and evaluation around one pre-training stage of
Perceiver-VL-tiny (VTC on the separate encodings; VTM with swapped videos, half of them mined
by VTC similarity, + MLM through the query decoder; LayerDrop off at this scale), evaluated as a
mixed-stream model (every test pair scored by the decoder over cached latents), with the
ranking by the separate encoders' embeddings printed beside it.

Every method keeps a wall-clock budget (``budget`` minutes, 15 by default): after generating the
benchmark the demo trains each stage for a few steps with the precision it will use, times a
slice of the evaluation, and sizes every stage's steps (at most its preset's) so that the whole
demo fits; warm-up and cosine span the steps a stage really takes (``leanvl.demo_budget``). It
prints the plan before training and the plan against what happened at the end. A method's stage
function needs nothing for this beyond building stages with ``_stage_config`` and training them
with ``_train_stage``: the demo calls it twice, once to probe (into ``out/plan_probe``, deleted
afterwards) and once to train.

A stage whose released weights exist with an identical config is reused, so an interrupted
demo continues where it stopped (the plan is stored in the demo folder and reused with it).

Extra ``key=value`` arguments are synthetic-benchmark options, except ``train.*``, ``data.*``,
``eval.*`` and ``model.*`` ones, which go to every stage's run config (e.g.
``leanvl demo --quick pretrain_clips=8 train.epochs=1`` for a run of seconds, as the tests do).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from leanvl.config import load_config, save_config
from leanvl.demo_budget import StagePlan, StageProbe

log = logging.getLogger(__name__)

# The demo's benchmark: clips of 8 frames (the demo samples 4), which halves decoding and
# rendering against the default 16, and no classification splits, which the demo does not use
# (benchmarks/action_recognition.py adds them to a demo folder).
DEMO_SYNTH = ["frames=8", "classify_train_clips=0", "classify_test_clips=0"]
QUICK_SYNTH = ["pretrain_clips=500", "retrieval_test_clips=200", "mc_test_clips=200"]
QUICK_TRAIN = {"teacher": ["train.epochs=3"], "stage1": ["train.epochs=1"],
               "stage2": ["train.epochs=3"], "perceiver_vl": ["train.epochs=4"],
               "smaug": ["train.epochs=1"],
               "evilm_tokenizer": ["train.epochs=1"], "evilm": ["train.epochs=1"]}
METHODS = ("umt", "perceiver_vl", "smaug", "evilm")
# Overrides with these sections go to every stage's run config (e.g. train.epochs=0.1 for a
# shorter run); the others are synthetic-benchmark options.
STAGE_SECTIONS = ("train.", "data.", "eval.", "model.")


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(synthetic-benchmark overrides, stage overrides) of the demo's key=value list."""
    stage = [item for item in items if item.startswith(STAGE_SECTIONS)]
    return [item for item in items if item not in stage], stage


BUDGET_MINUTES = 15.0
#: the demo's precision on the CPU: auto (bf16 where the CPU has native bf16 units), bf16, fp32
PRECISION_ENV = "LEANVL_DEMO_PRECISION"
DEMO_PRECISIONS = ("auto", "bf16", "fp32")
#: the planner times the evaluation on two evaluation batches of the smallest test file (at
#: least this fraction of every file) and scales it to the whole: whole batches, because
#: partial ones cost more per item (slices of 2% and 6% made the estimate 1.5x too high)
EVAL_PROBE_FRACTION = 0.02
REPORT_SECONDS = 10.0  # writing the report's plots, as measured on the demo


@dataclass
class _Pass:
    """How ``_stage_config`` and ``_train_stage`` behave during one pass over a method's
    stages: ``probe`` (a few timed steps per stage) or ``run`` (the planned steps)."""

    mode: str = "run"
    precision: str = "auto"
    out: Path | None = None  # the demo folder
    probe_root: Path | None = None
    plans: dict[str, StagePlan] = field(default_factory=dict)
    stored: dict[str, StagePlan] = field(default_factory=dict)  # from an earlier run
    probes: list[StageProbe] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # stage names in the order they train
    deadlines: dict[str, float] = field(default_factory=dict)  # time.time() per stage
    steps_taken: dict[str, int] = field(default_factory=dict)


_active = _Pass()


def _stage_config(preset: str, out: Path, synth_root: Path, extra: list[str]):
    overrides = [f"out={out}", f"data.root={synth_root}",
                 f"data.train={synth_root / 'pretrain.jsonl'}"] + \
        cpu_settings(_active.precision) + extra
    return load_config(preset, overrides)


def demo_precision(precision: str | None = None) -> str:
    """The demo's precision: the argument, else ``$LEANVL_DEMO_PRECISION``, else ``auto``."""
    precision = precision or os.environ.get(PRECISION_ENV) or "auto"
    if precision not in DEMO_PRECISIONS:
        raise ValueError(f"demo precision must be one of {', '.join(DEMO_PRECISIONS)} (from "
                         f"--precision or ${PRECISION_ENV}), got {precision!r}")
    return precision


def cpu_settings(precision: str | None = None) -> list[str]:
    """On the CPU: bf16 autocast where the CPU has native bf16 units (2.0-2.5x faster steps
    for the demo's models), and torch on every core beside the loader worker, since the
    demo's small clips keep the worker mostly idle (docs/benchmarks.md, "Demo models: CPU
    step time"). Elsewhere the engine's defaults. ``precision`` (default: ``demo_precision()``)
    ``fp32`` or ``bf16`` overrides the choice, e.g. to run as on a CPU without bf16 units."""
    import torch

    from leanvl.engine.precision import native_bf16_flags

    if torch.cuda.is_available():
        return []
    precision = demo_precision(precision)
    bf16 = precision == "bf16" or (precision == "auto" and bool(native_bf16_flags()))
    return (["train.precision=bf16"] if bf16 else []) + [
        f"data.cpu_threads={os.cpu_count() or 1}"]


def _done(cfg) -> bool:
    """True when this stage already released weights under an identical config."""
    out = Path(cfg.out)
    saved = out / "stage_config.yaml"
    return (out / "model" / "model.safetensors").is_file() and saved.is_file() \
        and saved.read_text() == OmegaConf.to_yaml(cfg, resolve=True)


def _train_stage(name: str, cfg, timings: dict[str, float], progress: bool = True) -> Path:
    from leanvl.tasks.pretrain import run_pretrain

    if _active.mode == "probe":
        return _probe_stage(name, cfg)
    plan = _active.plans.get(name)
    if plan is not None:
        _apply_plan(cfg, plan)
    if _done(cfg):
        log.info("demo: %s already trained in %s, reusing it", name, cfg.out)
        record = json.loads((Path(cfg.out) / "stage_time.json").read_text())
        timings[name] = record["seconds"]
        _active.steps_taken[name] = int(record.get("steps", plan.steps if plan else 0))
    else:
        start = time.perf_counter()
        result = run_pretrain(cfg, evaluate=lambda model: {}, progress=progress,
                              stop_at=_active.deadlines.get(name))
        timings[name] = time.perf_counter() - start
        _active.steps_taken[name] = int(result["step"])
        (Path(cfg.out) / "stage_time.json").write_text(json.dumps(
            {"seconds": timings[name], "steps": int(result["step"]),
             "stopped_early": bool(result.get("stopped_early"))}))
        save_config(cfg, cfg.out, "stage_config.yaml")
    return Path(cfg.out) / "model"


def _apply_plan(cfg, plan: StagePlan) -> None:
    """Set a stage's config to the planned steps, warm-up and cosine spanning them (in place,
    so the stage function's config is the one trained)."""
    cfg.train.max_steps = plan.steps
    cfg.train.warmup_steps = plan.warmup_steps
    cfg.train.warmup_epochs = 0.0


def _real_stage(cfg, plan: StagePlan) -> Path | None:
    """The released weights of the demo's own stage that a probe stands for, when it was
    trained with this plan (paths under the probe folder point into the demo folder)."""
    from omegaconf import OmegaConf

    planned = OmegaConf.merge(cfg, {})
    _apply_plan(planned, plan)
    probe, real = str(_active.probe_root), str(_active.out)
    text = OmegaConf.to_yaml(planned, resolve=True).replace(probe, real)
    out = Path(str(cfg.out).replace(probe, real))
    saved = out / "stage_config.yaml"
    done = (out / "model" / "model.safetensors").is_file() and saved.is_file() \
        and saved.read_text() == text
    return out / "model" if done else None


def _probe_stage(name: str, cfg) -> Path:
    """Train a stage for a few steps in the probe folder and record what they cost; a stage
    that an earlier run trained with its stored plan is reused instead."""
    from leanvl.demo_budget import PROBE_STEPS, probe_from_steps
    from leanvl.report import read_metrics
    from leanvl.tasks.pretrain import run_pretrain

    _active.order.append(name)
    stored = _active.stored.get(name)
    if stored is not None:
        reused = _real_stage(cfg, stored)
        if reused is not None:
            stored.reused, stored.expected_seconds = True, 0.0
            _active.plans[name] = stored
            return reused
    train = cfg.train
    nominal_cap = int(train.max_steps)
    train.max_steps = PROBE_STEPS
    train.log_every = 1
    train.save_every = 0
    start = time.perf_counter()
    result = run_pretrain(cfg, evaluate=lambda model: {}, progress=False)
    wall = time.perf_counter() - start
    per_epoch = int(result["steps_per_epoch"] or 1)
    nominal = math.ceil(float(train.epochs) * per_epoch - 1e-9)
    if nominal_cap > 0:
        nominal = min(nominal, nominal_cap)
    warmup = int(train.warmup_steps) or round(float(train.warmup_epochs) * per_epoch)
    step_times = [row["step_time"] for row in read_metrics(Path(cfg.out)) if "step_time" in row]
    _active.probes.append(probe_from_steps(name, step_times, wall, nominal, per_epoch, warmup))
    log.info("demo plan: %s probed: steps of %s s, %.1f s in all; %s", name,
             ", ".join(f"{t:.2f}" for t in step_times), wall, _active.probes[-1])
    return Path(cfg.out) / "model"


def evaluate_all(model_dir: Path, synth_root: Path, cfg, progress: bool = True,
                 annotations: Path | None = None) -> dict[str, Any]:
    """Zero-shot retrieval, multiple choice and QA of released weights on the benchmark (its
    test files, or those in ``annotations``: a subset with the same names)."""
    from leanvl.engine.checkpoint import load_pretrained
    from leanvl.engine.precision import autocast
    from leanvl.tasks.build import build_text_encoder

    model = load_pretrained(model_dir)
    text = build_text_encoder(cfg.data, model)
    with autocast(cfg.train.precision, "cpu"):  # the stages' precision (bf16 on such CPUs)
        return _evaluate(model, text, cfg, synth_root, progress, annotations)


def _evaluate(model, text, cfg, synth_root: Path, progress: bool,
              annotations: Path | None = None) -> dict[str, Any]:
    from leanvl.data.datasets import build_dataset
    from leanvl.tasks.mc import evaluate_mc
    from leanvl.tasks.qa import evaluate_qa
    from leanvl.tasks.retrieval import evaluate_retrieval

    data, root = cfg.data, str(synth_root)
    synth_root = annotations or synth_root  # where the annotation files are
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
    if "embed/t2v/R@1" in r:
        rows.append(("text-to-video R@1 / R@5 / R@10 (separate encoders' embeddings)",
                     f"{r['embed/t2v/R@1']:.1f} / {r['embed/t2v/R@5']:.1f} / "
                     f"{r['embed/t2v/R@10']:.1f}"))
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
             teacher: str | None = None, method: str = "umt",
             budget_minutes: float = BUDGET_MINUTES, precision: str | None = None,
             started_at: float | None = None) -> dict[str, Any]:
    """Run the demo of ``method`` into ``out`` within ``budget_minutes`` (0: the presets'
    lengths, no plan) counted from ``started_at`` (a ``time.time()``; default: now), in
    ``precision`` (see ``demo_precision``); returns {results, timings, report, plan}."""
    global _active
    from leanvl.config import to_object
    from leanvl.data import synthetic
    from leanvl.report import write_report

    if method not in METHODS:
        raise ValueError(f"unknown demo method {method!r}; choose from {', '.join(METHODS)}")
    if method != "umt" and (ablation or teacher):
        raise ValueError("--ablation and --teacher belong to the UMT demo (--method umt)")
    if budget_minutes < 0:
        raise ValueError(f"--budget must be >= 0 minutes (0: no plan), got {budget_minutes}")
    out = Path(out)
    synth_overrides, stage_overrides = split_overrides(list(synth_overrides or []))
    budget_end = (started_at or time.time()) + 60.0 * budget_minutes
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

    def quick_for(stage: str) -> list[str]:
        return (QUICK_TRAIN[stage] if quick else []) + stage_overrides

    if method == "perceiver_vl":
        stage_fn, report_name = _perceiver_vl_stages, "report_perceiver_vl"
    elif method == "smaug":
        stage_fn, report_name = _smaug_stages, "report_smaug"
    elif method == "evilm":
        stage_fn, report_name = _evilm_stages, "report_evilm"
    settings = {"budget_minutes": budget_minutes, "precision": demo_precision(precision),
                "quick": quick, "synth": OmegaConf.to_container(synth_cfg.synth)}
    if method == "umt":
        # the ablation's stage 2 takes as many steps as the full pipeline's did (when it ran)
        from leanvl.demo_budget import PLAN_FILE, load_plan

        same = load_plan(out / PLAN_FILE, settings).get("UMT stage 2", {}).get("steps", 0)

        def stage_fn(stage_out, stage_root, quick_for, stage_timings, stage_progress):
            return _umt_stages(stage_out, stage_root, ablation, teacher, quick_for,
                               stage_timings, stage_progress, ablation_steps=same)
        report_name = "report_ablation" if ablation else "report"
    _active = _Pass(precision=settings["precision"], out=out)
    try:
        estimates: dict[str, float] = {}
        if budget_minutes > 0:
            plan_start = time.perf_counter()
            estimates = _make_plan(out, root, stage_fn, quick_for, settings, budget_end)
            timings["planning (timed probe steps)"] = time.perf_counter() - plan_start
            print(_plan_text(settings, budget_minutes, estimates,
                             time.time() - (budget_end - 60.0 * budget_minutes)), flush=True)
        final, cfg, *rest = stage_fn(out, root, quick_for, timings, progress)
        plan, steps_taken = list(_active.plans.values()), dict(_active.steps_taken)
    finally:
        _active = _Pass()
    teacher = rest[0] if rest else None
    stages = _stage_dirs(out, ablation, teacher) if method == "umt" else [final.parent]
    eval_start = time.perf_counter()
    results = evaluate_all(final, root, cfg, progress)
    timings["zero-shot evaluation"] = time.perf_counter() - eval_start
    timings["total"] = time.perf_counter() - start
    table = results_table(results, timings)
    plan_record = {"settings": settings, "stages": [vars(p) for p in plan],
                   "steps_taken": steps_taken, "estimates": estimates,
                   "seconds_since_start": time.time() - (budget_end - 60.0 * budget_minutes)}
    outcome = ""
    if plan:
        from leanvl.demo_budget import format_outcome

        outcome = ("\n\n" + format_outcome(plan, timings, steps_taken, estimates)
                   + f"\n  since the start: {plan_record['seconds_since_start'] / 60:.1f} min "
                   f"of a {budget_minutes:g}-minute budget, before the report")
    report = write_report(out / report_name, results, timings, table + outcome, stages=stages,
                          model_dir=final, synth_root=root, teacher=teacher, cfg=cfg)
    name = "results.json" if report_name == "report" else f"results_{report_name[7:]}.json"
    (out / name).write_text(json.dumps({"results": results, "timings": timings,
                                        "plan": plan_record}, indent=1, default=float))
    print("\n" + table + f"\n\nreport: {report}" + outcome)
    return {"results": results, "timings": timings, "report": str(report), "plan": plan_record}


def _perceiver_vl_stages(out: Path, root: Path, quick_for, timings: dict[str, float],
                         progress: bool = True):
    """Perceiver-VL's one pre-training stage; returns its weights folder and config."""
    cfg = _stage_config("demo_perceiver_vl", out / "perceiver_vl", root,
                        quick_for("perceiver_vl"))
    return _train_stage("Perceiver-VL pre-training", cfg, timings, progress), cfg


def _make_plan(out: Path, root: Path, stage_fn, quick_for, settings: dict[str, Any],
               budget_end: float) -> dict[str, float]:
    """Probe the stages and the evaluation, then plan the stages' steps into ``_active``;
    returns the estimated seconds of what is not a training stage."""
    from leanvl.demo_budget import (
        PLAN_FILE,
        load_plan,
        plan_stages,
        reserve_seconds,
        save_plan,
        stage_plan,
    )

    _active.mode, _active.probe_root = "probe", out / "plan_probe"
    _active.stored = {name: stage_plan(values)
                      for name, values in load_plan(out / PLAN_FILE, settings).items()}
    shutil.rmtree(_active.probe_root, ignore_errors=True)
    try:
        final, cfg, *_ = stage_fn(_active.probe_root, root, quick_for, {}, False)
        estimates = {"zero-shot evaluation": _probe_evaluation(final, root, cfg),
                     "report": REPORT_SECONDS} if _active.probes else {}
    finally:
        shutil.rmtree(_active.probe_root, ignore_errors=True)
    reserve = reserve_seconds(60.0 * settings["budget_minutes"])
    seconds = budget_end - time.time() - sum(estimates.values()) - reserve
    probed = {probe.name: probe for probe in _active.probes}
    order = list(_active.order)
    plans = plan_stages([probed.get(name) or StageProbe(name, 1, 1, 0, 0, 0, 0)
                         for name in order], seconds, fixed=dict(_active.plans))
    _active.plans = {p.name: p for p in plans}
    save_plan(out / PLAN_FILE, settings, plans)
    # a stage that runs slower than probed stops where the later stages' time begins
    later = 0.0
    for name in reversed(order):
        _active.deadlines[name] = budget_end - reserve / 2 - sum(estimates.values()) - later
        later += _active.plans[name].expected_seconds
    _active.mode = "run"
    return estimates


def _probe_evaluation(model_dir: Path, root: Path, cfg) -> float:
    """Seconds the whole evaluation is expected to take: a slice of the test files timed."""
    from leanvl.demo_budget import eval_seconds

    files = {name: (root / name).read_text().splitlines()
             for name in ("retrieval_test.jsonl", "mc_test.jsonl", "qa_test.jsonl")}
    fraction = min(1.0, max(EVAL_PROBE_FRACTION,
                            2 * int(cfg.eval.batch_size) / min(len(v) for v in files.values())))
    folder = _active.probe_root / "eval_slice"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / "answers.json", folder / "answers.json")
    for name, lines in files.items():
        (folder / name).write_text("\n".join(lines[:math.ceil(fraction * len(lines))]) + "\n")
    start = time.perf_counter()
    evaluate_all(model_dir, root, cfg, progress=False, annotations=folder)
    seconds = time.perf_counter() - start
    log.info("demo plan: evaluation timed on %.0f%% of the items in %.1f s", 100 * fraction,
             seconds)
    return eval_seconds(fraction, seconds)


def _plan_text(settings: dict[str, Any], budget_minutes: float,
               estimates: dict[str, float], spent: float) -> str:
    """The plan as printed before training, with the machine it was made on."""
    from leanvl.demo_budget import format_plan
    from leanvl.engine.precision import cpu_name, native_bf16_flags

    flags = native_bf16_flags()
    chosen = "bf16" if "train.precision=bf16" in cpu_settings(settings["precision"]) else "fp32"
    header = {"cpu": f"{cpu_name()}, {os.cpu_count()} cores",
              "native bf16": ", ".join(flags) if flags else "no (bf16 would be emulated: slow)",
              "precision": f"{chosen} ({settings['precision']}; --precision or "
                           f"${PRECISION_ENV})"}
    return format_plan(list(_active.plans.values()), header, estimates, 60.0 * budget_minutes,
                       spent)


def _umt_stages(out: Path, root: Path, ablation: bool, teacher: str | None, quick_for,
                timings: dict[str, float], progress: bool = True, ablation_steps: int = 0):
    """The UMT stages (teacher, stage 1, stage 2 or the stage-2-only ablation, capped at
    ``ablation_steps`` when > 0); returns the final weights folder, the last stage's config and
    the teacher file."""
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
                            + quick_for("stage2")
                            + ([f"train.max_steps={ablation_steps}"] if ablation_steps else []))
        final = _train_stage("stage 2 only (no stage 1, no UTA)", cfg, timings, progress)
    else:
        cfg = _stage_config("demo_umt_stage1", out / "stage1", root,
                            teacher_args + quick_for("stage1"))
        stage1 = _train_stage("UMT stage 1", cfg, timings, progress)
        cfg = _stage_config("demo_umt_stage2", out / "stage2", root,
                            teacher_args + [f"model.pretrained={stage1}"] + quick_for("stage2"))
        final = _train_stage("UMT stage 2", cfg, timings, progress)
    return final, cfg, teacher


def _smaug_stages(out: Path, root: Path, quick_for, timings: dict[str, float],
                  progress: bool = True):
    """SMAUG's stages: single-frame pre-training, then 4 frames with frame selection 4 -> 2 from
    the single-frame weights; returns the final weights folder and the last stage's config."""
    cfg = _stage_config("demo_smaug_single_frame", out / "smaug_single_frame", root,
                        quick_for("smaug"))
    single = _train_stage("SMAUG single-frame", cfg, timings, progress)
    cfg = _stage_config("demo_smaug_multi_frame", out / "smaug", root,
                        [f"model.pretrained={single}"] + quick_for("smaug"))
    final = _train_stage("SMAUG 4 frames, selection 4->2", cfg, timings, progress)
    return final, cfg


def _evilm_stages(out: Path, root: Path, quick_for, timings: dict[str, float],
                  progress: bool = True):
    """E-ViLM's stages: the semantic VQ tokenizer, then pre-training (MLM + VTM + MVM on its
    codes, plus VTC on the unimodal passes); returns the final weights folder and the last
    stage's config. The tokenizer's codebook usage on the retrieval test clips is logged."""
    cfg = _stage_config("demo_evilm_tokenizer", out / "evilm_tokenizer", root,
                        quick_for("evilm_tokenizer"))
    tokenizer = _train_stage("E-ViLM tokenizer (semantic VQ)", cfg, timings, progress)
    if _active.mode != "probe":  # the planner's timed steps need no codebook statistics
        _log_codebook_usage(out, root, tokenizer, cfg, timings, progress)
    cfg = _stage_config("demo_evilm", out / "evilm", root,
                        [f"model.kwargs.tokenizer={tokenizer}"] + quick_for("evilm"))
    final = _train_stage("E-ViLM pre-training (MLM + VTM + MVM + VTC)", cfg, timings, progress)
    return final, cfg


def _log_codebook_usage(out: Path, root: Path, tokenizer: Path, cfg, timings: dict[str, float],
                        progress: bool) -> None:
    """Measure (once per trained tokenizer) and log its codebook usage on the test clips."""
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


def _stage_dirs(out: Path, ablation: bool, teacher: str) -> list[Path]:
    names = ["stage2_only"] if ablation else ["stage1", "stage2"]
    if (out / "teacher").is_dir():
        names.insert(0, "teacher")
    return [out / n for n in names if (out / n).is_dir()]
