"""The demo's time budget: the planner's arithmetic, the schedule over the planned steps, the
engine's deadline, and the precision switch (no timing is asserted)."""

from __future__ import annotations

import math

import pytest
import torch

from leanvl.data.datasets import make_loader
from leanvl.demo import _apply_plan, cpu_settings, demo_precision
from leanvl.demo_budget import (
    StagePlan,
    StageProbe,
    eval_seconds,
    format_plan,
    load_plan,
    plan_stages,
    probe_from_steps,
    save_plan,
    stage_seconds,
    warmup_steps,
)
from leanvl.engine.trainer import Trainer
from tests.engine_scripts.toy_setup import ToyDataset, ToyModel, collate, toy_config


def _probe(name, nominal, step, fixed=0.0, restart=0.0, per_epoch=10_000, warmup=0.0):
    return StageProbe(name, nominal, per_epoch, step, fixed, restart, warmup)


def test_plan_scales_every_stage_by_one_factor_to_fit():
    probes = [_probe("a", 100, 1.0, fixed=10.0), _probe("b", 400, 2.0, fixed=10.0)]
    # half of each stage's steps: 10 + 50 * 1 + 10 + 200 * 2 = 470 seconds
    plans = plan_stages(probes, 470.0)
    assert [p.steps for p in plans] == [50, 200]
    assert sum(p.expected_seconds for p in plans) == pytest.approx(470.0)
    # one second less no longer fits half
    tighter = plan_stages(probes, 469.0)
    assert sum(p.expected_seconds for p in tighter) <= 469.0
    assert tighter[1].steps < 200


def test_plan_never_exceeds_the_presets_and_keeps_one_step():
    probes = [_probe("a", 100, 1.0), _probe("b", 30, 2.0)]
    assert [p.steps for p in plan_stages(probes, 1e6)] == [100, 30]
    assert [p.steps for p in plan_stages(probes, -5.0)] == [1, 1]


def test_reused_stage_keeps_its_plan_and_frees_its_time():
    reused = StagePlan("a", 70, 7, 100, 1.0, 0.0, reused=True)
    probes = [_probe("a", 100, 1.0), _probe("b", 200, 1.0)]
    plans = plan_stages(probes, 150.0, fixed={"a": reused})
    assert plans[0] is reused
    assert plans[1].steps == 150  # all 150 s go to b


def test_a_cheap_stage_keeps_its_whole_preset():
    # a costs 78 s whole (under a tenth of 1,000 s): it keeps 78 steps, b gets the rest
    probes = [_probe("a", 78, 1.0), _probe("b", 2000, 1.0)]
    plans = plan_stages(probes, 1000.0)
    assert [p.steps for p in plans] == [78, 922]
    # with every stage scaled alike, a would have been cut to under half of its steps
    assert plan_stages(probes, 1000.0, whole_fraction=0.0)[0].steps == 37
    # over the share it is scaled with the rest; all cheap: scaled alike as before
    assert plan_stages(probes, 700.0)[0].steps < 78
    assert [p.steps for p in plan_stages([_probe("a", 30, 1.0), _probe("b", 40, 1.0)], 35.0)
            ] == [15, 20]


def test_printed_plan_names_the_scaled_share_and_the_whole_stages():
    plans = plan_stages([_probe("teacher", 78, 1.0), _probe("stage 2", 2000, 1.0)], 1000.0)
    text = format_plan(plans, {"cpu": "test"}, {"evaluation": 60.0}, 1200.0, 30.0)
    assert "78/78" in text and "922/2000" in text
    assert "46% of the presets'" in text and "teacher: whole (cheap)" in text
    # 30 s spent + 1,000 s of stages + 60 s of evaluation, in minutes
    assert f"{1090 / 60:7.1f}" in text.splitlines()[-2]


def test_stage_seconds_counts_set_up_and_each_epoch_start():
    probe = _probe("a", 300, 0.5, fixed=8.0, restart=2.0, per_epoch=100)
    assert stage_seconds(probe, 250) == pytest.approx(8.0 + 3 * 2.0 + 250 * 0.5)


def test_probe_leaves_the_first_steps_out_of_the_step_time():
    times = [4.0, 1.5, 1.0, 1.2, 0.9]
    probe = probe_from_steps("a", times, wall_seconds=20.0, nominal_steps=390,
                             steps_per_epoch=78, warmup_steps=23)
    assert probe.step_seconds == 1.0  # median of 1.0, 1.2, 0.9
    assert probe.restart_seconds == pytest.approx(3.0)
    assert probe.fixed_seconds == pytest.approx(20.0 - sum(times))
    assert probe.warmup_fraction == pytest.approx(23 / 390)


def test_warmup_keeps_its_share_of_the_run():
    fraction = 23 / 390
    plans = plan_stages([_probe("a", 390, 1.0, warmup=fraction)], 195.0)
    assert plans[0].steps == 195
    assert plans[0].warmup_steps == round(fraction * 195) == warmup_steps(195, fraction)


def test_evaluation_is_scaled_from_its_slice():
    # 12.8 s for 12.8% of the items: 100 s for all of them
    assert eval_seconds(0.128, 12.8) == pytest.approx(100.0)
    assert eval_seconds(1.0, 3.0) == pytest.approx(3.0)  # a benchmark smaller than the slice


def test_stored_plan_is_used_only_for_the_same_settings(tmp_path):
    path = tmp_path / "plan.json"
    settings = {"budget_minutes": 15.0, "precision": "fp32"}
    save_plan(path, settings, [StagePlan("a", 10, 1, 20, 0.5, 6.0)])
    save_plan(path, settings, [StagePlan("b", 5, 0, 5, 0.5, 3.0)])
    assert sorted(load_plan(path, settings)) == ["a", "b"]
    assert load_plan(path, {**settings, "budget_minutes": 10.0}) == {}


def test_planned_steps_set_the_schedule(tmp_path):
    """A preset of 3 epochs planned down to 7 steps: the trainer takes 7 steps, warms up for
    the planned steps and ends its cosine at the last of them."""
    cfg = toy_config(tmp_path, ["train.epochs=3", "train.warmup_epochs=0.5",
                                "train.warmup_steps=0"])
    _apply_plan(cfg, StagePlan("toy", 7, 2, 18, 0.1, 1.0))
    torch.manual_seed(0)
    loader = make_loader(ToyDataset(), 4, collate, train=True, seed=0)
    trainer = Trainer(cfg, ToyModel(), loader, device="cpu", progress=False)
    assert (trainer.steps_per_epoch, trainer.total_steps, trainer.warmup_steps) == (6, 7, 2)
    result = trainer.fit()
    lrs = [row["lr"] for row in result["history"]]
    lr, min_lr = float(cfg.train.lr), float(cfg.train.min_lr)
    expected = [lr / 2, lr] + [min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * k / 5))
                               for k in range(5)]
    assert lrs == pytest.approx(expected)
    assert result["step"] == 7 and not result["stopped_early"]


def test_trainer_stops_at_its_deadline(tmp_path):
    cfg = toy_config(tmp_path)
    loader = make_loader(ToyDataset(), 4, collate, train=True, seed=0)
    trainer = Trainer(cfg, ToyModel(), loader, device="cpu", progress=False, stop_at=0.0)
    result = trainer.fit()
    assert trainer.total_steps == 18
    assert result["step"] == 1 and result["stopped_early"]
    assert result["checkpoint"] is not None  # the stopped run is saved and resumable


def test_results_table_shows_the_rows_of_the_scores_a_model_has():
    """Re-ranked rows only for a model whose similarity is not its final score; the separate
    encoders' row whenever retrieval reports it; video-to-text once either way."""
    from leanvl.demo import results_table

    dual = {"dual/t2v/R@1": 1.0, "dual/t2v/R@5": 2.0, "dual/t2v/R@10": 3.0,
            "dual/v2t/R@1": 4.0, "num_videos": 10, "unique_caption_fraction": 1.0}
    reranked = {"rerank/t2v/R@1": 5.0, "rerank/t2v/R@5": 6.0, "rerank/t2v/R@10": 7.0,
                "rerank/v2t/R@1": 8.0, "rerank_k": 8}
    embed = {"embed/t2v/R@1": 9.0, "embed/t2v/R@5": 10.0, "embed/t2v/R@10": 11.0}
    final = {"rerank_skipped": "the model's similarity already is its final score"}

    def rows(retrieval):
        table = results_table({"retrieval": retrieval, "mc": {"accuracy": 20.0},
                               "qa": {"accuracy": 5.0}}, {})
        return dict(line.split("  ", 1) for line in table.splitlines())

    for retrieval, has_rerank, has_embed in [({**dual, **final}, False, False),
                                             ({**dual, **final, **embed}, False, True),
                                             ({**dual, **reranked}, True, False),
                                             ({**dual, **reranked, **embed}, True, True)]:
        table = rows(retrieval)
        labels = [label.strip() for label in table]
        assert sum(label.startswith("video-to-text R@1") for label in labels) == 1
        assert any("re-ranked" in label for label in labels) == has_rerank
        embedded = [value.strip() for label, value in table.items() if "embeddings" in label]
        assert embedded == (["9.0 / 10.0 / 11.0"] if has_embed else [])


def test_demo_precision_switch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LEANVL_DEMO_PRECISION", "fp32")
    assert demo_precision() == "fp32"
    assert "train.precision=bf16" not in cpu_settings()
    assert "train.precision=bf16" in cpu_settings("bf16")  # the argument wins
    monkeypatch.setenv("LEANVL_DEMO_PRECISION", "fp16")
    with pytest.raises(ValueError, match="LEANVL_DEMO_PRECISION"):
        cpu_settings()


@pytest.mark.parametrize("argv", [
    ["pretrain", "demo_umt_stage1"],
    ["finetune", "retrieval", "demo_umt_stage2"],
    ["eval", "retrieval"],
    ["demo"],
    ["data", "synth"],
    ["data", "check", "a.jsonl"],
    ["data", "shard", "a.jsonl", "--out", "shards"],
])
def test_commands_with_progress_bars_take_quiet(argv):
    from leanvl.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(argv + ["--quiet"]).quiet
    assert not parser.parse_args(argv).quiet


def test_demo_budget_options_parse():
    from leanvl.cli import build_parser

    args = build_parser().parse_args(["demo", "--budget", "20", "--precision", "fp32",
                                      "--budget-from", "1700000000"])
    assert (args.budget, args.precision, args.budget_from) == (20.0, "fp32", 1700000000.0)
    assert build_parser().parse_args(["demo"]).budget == 15.0


def test_shortened_schedule_is_continuous_and_ends_at_min_lr():
    from leanvl.engine.optim import CosineFactor, cosine_lr

    factor = CosineFactor(1.0, 0.1, 2, 20)
    before = [factor(step) for step in range(21)]
    assert before == pytest.approx([cosine_lr(s, 1.0, 0.1, 2, 20) for s in range(21)])
    factor.shorten(10, 15)  # the 10 steps left of the schedule now take 5
    assert [factor(s) for s in range(11)] == pytest.approx(before[:11])
    assert factor(15) == pytest.approx(0.1)
    assert factor(12) == pytest.approx(cosine_lr(14, 1.0, 0.1, 2, 20))


def test_trainer_shortens_its_run_to_the_pace_of_its_steps(tmp_path, monkeypatch):
    """A clock on which every step takes a second and a deadline 12 s away: the 18 configured
    steps do not fit, so the run ends earlier with its lr schedule run to the end."""
    import types

    from leanvl.engine import trainer as trainer_module

    clock = {"now": 0.0}

    def fake_time():
        clock["now"] += 0.5  # the trainer reads the clock twice per step
        return clock["now"]

    monkeypatch.setattr(trainer_module, "time",
                        types.SimpleNamespace(time=fake_time, perf_counter=time_perf_counter))
    cfg = toy_config(tmp_path, ["train.warmup_steps=1"])
    loader = make_loader(ToyDataset(), 4, collate, train=True, seed=0)
    trainer = Trainer(cfg, ToyModel(), loader, device="cpu", progress=False, stop_at=12.0)
    result = trainer.fit()
    assert result["shortened"] and not result["stopped_early"]
    assert result["step"] < 18
    lr, min_lr = float(cfg.train.lr), float(cfg.train.min_lr)
    last = result["history"][-1]["lr"]
    assert last < min_lr + 0.1 * (lr - min_lr)  # the cosine ran to its end
    # the same steps without a deadline would still be half-way down the cosine
    assert cosine_lr_at(result["step"] - 1, cfg) > min_lr + 0.3 * (lr - min_lr)


def test_pace_changes_are_reported_once_per_two_percent_of_the_run(tmp_path, monkeypatch,
                                                                       caplog):
    """Steps that slow down a little each time move the run's end a step at a time: the lr
    schedule follows every move (each noted at DEBUG), the log reports one at INFO each time the
    end has moved by more than 2% of the run."""
    import logging
    import types

    from leanvl.engine import trainer as trainer_module

    clock = {"now": 0.0, "calls": 0}

    def fake_time():
        clock["calls"] += 1
        clock["now"] += 0.5 * (1 + 0.004 * clock["calls"])  # two reads per step, each slower
        return clock["now"]

    monkeypatch.setattr(trainer_module, "time",
                        types.SimpleNamespace(time=fake_time, perf_counter=time_perf_counter))
    cfg = toy_config(tmp_path, ["train.epochs=34", "train.log_every=1000",
                                "train.save_every=0"])
    loader = make_loader(ToyDataset(), 4, collate, train=True, seed=0)
    trainer = Trainer(cfg, ToyModel(), loader, device="cpu", progress=False, stop_at=300.0)
    with caplog.at_level(logging.DEBUG, logger="leanvl.engine.trainer"):
        result = trainer.fit()
    planned = trainer.planned_steps
    moves = [(int(r.getMessage().split("ends at step ")[1].split()[0]), r.levelno)
             for r in caplog.records if "steps fit before stop_at" in r.getMessage()]
    reported = [end for end, level in moves if level == logging.INFO]
    assert result["shortened"] and result["step"] == moves[-1][0]
    assert len(moves) > 2 * len(reported) > 0
    for before, after in zip([planned, *reported], reported):
        assert abs(after - before) > planned // 50


def time_perf_counter() -> float:
    """The real monotonic clock (step times), beside the fake wall clock."""
    import time

    return time.perf_counter()


def cosine_lr_at(step: int, cfg) -> float:
    """The lr of ``step`` on the toy config's unshortened 18-step schedule."""
    from leanvl.engine.optim import cosine_lr

    return cosine_lr(step, float(cfg.train.lr), float(cfg.train.min_lr), 1, 18)


def test_any_stage_function_is_planned_and_resumed(tmp_path, monkeypatch):
    """A method's stage function written only with _stage_config and _train_stage is probed,
    planned and trained to its plan; a rerun reuses its finished stages without probing."""
    import json
    from pathlib import Path

    from leanvl import demo
    from leanvl.tasks import pretrain

    calls = []

    def fake_pretrain(cfg, evaluate=None, progress=True, stop_at=None):
        out = Path(cfg.out)
        steps = int(cfg.train.max_steps)
        calls.append((out.name, steps, int(cfg.train.warmup_steps)))
        (out / "model").mkdir(parents=True, exist_ok=True)
        (out / "model" / "model.safetensors").write_text("weights")
        step_time = 1.0 if out.name == "first" else 3.0
        (out / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s + 1, "step_time": step_time}) + "\n" for s in range(steps)))
        return {"step": steps, "steps_per_epoch": 100, "stopped_early": False}

    def stages(out, root, quick_for, timings, progress):
        first = demo._stage_config("demo_clip_teacher", out / "first", root, [])
        weights = demo._train_stage("first", first, timings, progress)
        second = demo._stage_config("demo_umt_stage1", out / "second", root,
                                    [f"model.pretrained={weights}", "train.epochs=2"])
        return demo._train_stage("second", second, timings, progress), second

    monkeypatch.setattr(pretrain, "run_pretrain", fake_pretrain)
    monkeypatch.setattr(demo, "_probe_evaluation", lambda *args: 10.0)
    monkeypatch.setattr(demo, "_active", demo._Pass(out=tmp_path))
    settings = {"budget_minutes": 10.0}
    # the first stage is nominally 100 steps of 1 s, the second 200 of 3 s (epochs 1 and 2
    # of 100 steps); 200 s for training leave 200 / 700 of each
    budget_end = demo.time.time() + 200.0 + 10.0 + demo.REPORT_SECONDS + 30.0
    demo._make_plan(tmp_path, tmp_path / "synth", stages, lambda s: [], settings, budget_end)
    assert [c[1] for c in calls] == [5, 5]  # the probes
    plans = demo._active.plans
    assert plans["first"].nominal_steps == 100 and plans["second"].nominal_steps == 200
    assert plans["first"].steps == pytest.approx(100 * 200 / 700, abs=2)
    assert plans["second"].steps == pytest.approx(200 * 200 / 700, abs=4)
    assert not (tmp_path / "plan_probe").exists()

    calls.clear()
    _, cfg = stages(tmp_path, tmp_path / "synth", None, {}, False)
    assert [c[:2] for c in calls] == [("first", plans["first"].steps),
                                      ("second", plans["second"].steps)]
    assert int(cfg.train.max_steps) == plans["second"].steps
    assert cfg.model.pretrained == str(tmp_path / "first" / "model")

    calls.clear()  # a rerun: the stored plan and the finished stages are reused
    monkeypatch.setattr(demo, "_active", demo._Pass(out=tmp_path))
    demo._make_plan(tmp_path, tmp_path / "synth", stages, lambda s: [], settings, budget_end)
    assert calls == [] and all(p.reused for p in demo._active.plans.values())
    stages(tmp_path, tmp_path / "synth", None, {}, False)
    assert calls == []
