"""The demo's time budget: how many steps each training stage gets on this machine.

``leanvl demo`` measures every stage for a few steps (``StageProbe``: the seconds a step takes,
what a stage costs besides its steps, how long a new epoch's loader takes to start), estimates
the evaluation, and ``plan_stages`` shrinks the stages by one common factor until synthesis,
training and evaluation fit the budget (a stage that costs little keeps its whole length). A
stage never runs longer than its preset (the nominal length: ``train.epochs``); warm-up keeps
its share of the run, so warm-up and cosine span the steps a stage really takes. The plan is
written to the demo folder and reused by a rerun, so stages that finished keep an identical
config and are not trained again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: probe steps per stage; the first ``PROBE_WARM`` (loader start, kernel set-up) are left out
#: of the step time
PROBE_STEPS = 5
PROBE_WARM = 2
#: kept free for what the plan cannot see coming (load from other processes, the report)
RESERVE_FRACTION = 0.05
RESERVE_MIN_SECONDS = 20.0
#: a stage whose whole preset costs at most this share of the training time keeps it whole:
#: cutting it saves little, and a short stage cut shorter may not learn at all (the demo's
#: CLIP stand-in teacher: 78 steps cost ~35 s of ~600; cut to 44-49 steps, its VTC loss ended
#: at chance in two runs of four, and stage 1 then copied near-constant features)
WHOLE_STAGE_FRACTION = 0.1
PLAN_FILE = "demo_plan.json"


@dataclass
class StageProbe:
    """What a few measured steps of a stage say about its cost."""

    name: str
    nominal_steps: int  # the preset's length: train.epochs (capped by train.max_steps)
    steps_per_epoch: int
    step_seconds: float  # a steady step (median of the probe's later steps)
    fixed_seconds: float  # building the model and data, releasing the weights
    restart_seconds: float  # a new epoch: the loader's first batch beyond a steady step
    warmup_fraction: float  # the preset's warm-up steps / its nominal steps


@dataclass
class StagePlan:
    """The steps one stage will take and what they are expected to cost."""

    name: str
    steps: int
    warmup_steps: int
    nominal_steps: int
    step_seconds: float
    expected_seconds: float
    reused: bool = False  # trained before with this plan: costs nothing now


def probe_from_steps(name: str, step_times: list[float], wall_seconds: float,
                     nominal_steps: int, steps_per_epoch: int, warmup_steps: int) -> StageProbe:
    """A ``StageProbe`` from the per-step times of a probe run and its whole wall time."""
    steady = sorted(step_times[PROBE_WARM:] or step_times)
    median = steady[len(steady) // 2]
    restart = max(0.0, step_times[0] - median) if step_times else 0.0
    fixed = max(0.0, wall_seconds - sum(step_times))
    return StageProbe(name, max(1, nominal_steps), max(1, steps_per_epoch), median, fixed,
                      restart, min(1.0, warmup_steps / max(1, nominal_steps)))


def stage_seconds(probe: StageProbe, steps: int) -> float:
    """Expected seconds of ``steps`` steps of a stage, set-up and epoch starts included."""
    epochs = math.ceil(steps / probe.steps_per_epoch)
    return probe.fixed_seconds + epochs * probe.restart_seconds + steps * probe.step_seconds


def warmup_steps(steps: int, fraction: float) -> int:
    """Warm-up steps that keep the preset's share of the run."""
    return min(steps, round(fraction * steps))


def plan_stages(probes: list[StageProbe], seconds: float, fixed: dict[str, StagePlan] | None = None,
                whole_fraction: float = WHOLE_STAGE_FRACTION) -> list[StagePlan]:
    """Steps per stage so that their expected time fits ``seconds``: the nominal steps of every
    stage times the largest common factor <= 1 that fits (at least one step each). ``fixed``
    stages (by name) keep their plan; their expected time (0 when reused) is taken first. A
    stage whose whole preset costs at most ``whole_fraction`` of ``seconds`` keeps all its
    steps, and the others share what is left (when the cheap stages alone do not fit, every
    stage is scaled)."""
    fixed = dict(fixed or {})
    free = [p for p in probes if p.name not in fixed]
    cheap = {p.name: _plan_of(p, p.nominal_steps) for p in free
             if stage_seconds(p, p.nominal_steps) <= whole_fraction * seconds}
    if cheap and len(cheap) < len(free) and \
            sum(plan.expected_seconds for plan in cheap.values()) < seconds:
        fixed.update(cheap)
        free = [p for p in free if p.name not in cheap]
    left = seconds - sum(fixed[p.name].expected_seconds for p in probes if p.name in fixed)

    def steps_at(scale: float) -> list[int]:
        return [max(1, math.floor(scale * p.nominal_steps + 1e-9)) for p in free]

    def cost(steps: list[int]) -> float:
        return sum(stage_seconds(p, n) for p, n in zip(free, steps, strict=True))

    low, high = 0.0, 1.0
    if cost(steps_at(high)) > left:
        for _ in range(50):  # bisection on the common factor
            middle = (low + high) / 2
            low, high = (middle, high) if cost(steps_at(middle)) <= left else (low, middle)
        high = low
    chosen = dict(zip([p.name for p in free], steps_at(high), strict=True))
    plans = []
    for probe in probes:
        if probe.name in fixed:
            plans.append(fixed[probe.name])
            continue
        plans.append(_plan_of(probe, chosen[probe.name]))
    return plans


def _plan_of(probe: StageProbe, steps: int) -> StagePlan:
    """The plan of ``steps`` steps of a probed stage."""
    return StagePlan(probe.name, steps, warmup_steps(steps, probe.warmup_fraction),
                     probe.nominal_steps, probe.step_seconds, stage_seconds(probe, steps))


def reserve_seconds(budget_seconds: float) -> float:
    """The part of the budget the plan leaves free."""
    return max(RESERVE_MIN_SECONDS, RESERVE_FRACTION * budget_seconds)


def eval_seconds(fraction: float, seconds: float) -> float:
    """The whole evaluation's seconds from one timed subset (``fraction`` of the test items, of
    whole evaluation batches): scaled in proportion. Fixed costs scale with it, so the estimate
    errs high by a little: on the demo's 1,000-clip benchmark 123 s for 116 taken (UMT) and 89
    for 80 (Perceiver-VL), where a line through two slices of one and two batches gave 89 and
    70, short of the budget."""
    return seconds / max(fraction, 1e-9)


def format_plan(plans: list[StagePlan], header: dict[str, str], estimates: dict[str, float],
                budget_seconds: float, spent_seconds: float) -> str:
    """The plan as printed before training (``spent_seconds``: the budget used so far)."""
    lines = [f"demo plan ({budget_seconds / 60:g}-minute budget)"]
    width = max(len(k) for k in header)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in header.items()]
    name_width = max([len(p.name) for p in plans] + [len(k) for k in estimates] + [32])
    lines.append(f"  {'stage'.ljust(name_width)}  {'steps':>11}  {'s/step':>6}  {'minutes':>7}")
    spent = "spent so far (synthesis, probes)"
    lines.append(f"  {spent.ljust(name_width)}  {'':>11}  {'':>6}  {spent_seconds / 60:7.1f}")
    for p in plans:
        steps = f"{p.steps}/{p.nominal_steps}"
        minutes = "reused" if p.reused else f"{p.expected_seconds / 60:7.1f}"
        lines.append(f"  {p.name.ljust(name_width)}  {steps:>11}  {p.step_seconds:6.2f}  "
                     f"{minutes:>7}")
    for name, seconds in estimates.items():
        lines.append(f"  {name.ljust(name_width)}  {'':>11}  {'':>6}  {seconds / 60:7.1f}")
    total = spent_seconds + sum(estimates.values()) + sum(
        p.expected_seconds for p in plans if not p.reused)
    lines.append(f"  {'expected total'.ljust(name_width)}  {'':>11}  {'':>6}  {total / 60:7.1f}")
    if total > budget_seconds:
        lines.append("  warning: even one step per stage does not fit the budget; each stage "
                     "stops where the budget runs out")
    scaled = [p for p in plans if p.steps < p.nominal_steps and not p.reused]
    if all(p.reused for p in plans):
        lines.append("  every stage was trained before with this plan: reused")
    elif scaled:
        whole = [p.name for p in plans if p.steps == p.nominal_steps and not p.reused]
        kept = f"; {', '.join(whole)}: whole (cheap)" if whole else ""
        lines.append(f"  steps per stage: {scaled[0].steps / scaled[0].nominal_steps:.0%} of the "
                     "presets' (steps/nominal) to fit the budget; warm-up and cosine span them"
                     + kept)
    else:
        lines.append("  every stage keeps its preset's length (the budget allows more; the plan "
                     "never trains longer than the presets)")
    return "\n".join(lines)


def format_outcome(plans: list[StagePlan], timings: dict[str, float],
                   steps_taken: dict[str, int], estimates: dict[str, float]) -> str:
    """The plan next to what happened, printed at the end."""
    rows = [("stage", "planned steps", "taken", "planned min", "took min")]
    for p in plans:
        rows.append((p.name, str(p.steps), str(steps_taken.get(p.name, "-")),
                     "reused" if p.reused else f"{p.expected_seconds / 60:.1f}",
                     f"{timings[p.name] / 60:.1f}" if p.name in timings else "-"))
    for name, seconds in estimates.items():
        rows.append((name, "", "", f"{seconds / 60:.1f}",
                     f"{timings[name] / 60:.1f}" if name in timings else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "plan against what happened\n" + "\n".join(
        "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in rows)


def save_plan(path: Path, settings: dict[str, Any], plans: list[StagePlan]) -> None:
    """Write the plan with the settings it was made for, merged into what ``path`` holds (the
    ablation adds its stages beside the full pipeline's)."""
    from leanvl.data.annotations import atomic_write_text

    stored = load_plan(path, settings)
    stored.update({p.name: dataclasses.asdict(p) for p in plans})
    atomic_write_text(path, json.dumps({"settings": settings, "stages": stored}, indent=1))


def load_plan(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stored stage plans (by name) if ``path`` was written for the same settings."""
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    return stored["stages"] if stored.get("settings") == settings else {}


def stage_plan(values: dict[str, Any]) -> StagePlan:
    """A ``StagePlan`` from its stored dict."""
    names = {f.name for f in dataclasses.fields(StagePlan)}
    return StagePlan(**{k: v for k, v in values.items() if k in names})
