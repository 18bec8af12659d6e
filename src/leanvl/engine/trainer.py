"""One training loop for every task.

``Trainer(cfg, model, train_loader, evaluate=None).fit()`` trains any module that implements
``pretrain_losses(batch) -> dict[str, Tensor]`` (named scalar losses; a task wraps its model
in such a module for fine-tuning) on batches that are dicts (tensors are moved to the device,
other values such as caption lists are passed through). The engine owns everything else:

- DDP over the trainable parameters only: parameters and buffers under the model's
  ``frozen_prefixes`` (teachers) are ``requires_grad=False``, never broadcast or reduced by
  DDP, never in the optimizer and (by default) never in checkpoints;
- loss = sum of ``train.loss_weights[name] * loss`` (weight 1 for names not configured);
  a model's optional ``step_metrics()`` (values measured in its last ``pretrain_losses``
  call) are averaged over ranks and logged beside the losses as ``metric/<name>``, never
  trained on;
- gradient accumulation (``no_sync`` on all but the last micro-batch), gradient clipping,
  autocast / GradScaler (``train.precision``), optional activation checkpointing through the
  model's ``set_grad_checkpointing(True)``;
- training for ``train.epochs`` (fractions allowed) capped by ``train.max_steps``; optimizer
  steps per epoch = batches per epoch // ``grad_accum`` (a remainder is left out);
- checkpoints every ``save_every`` steps and at each epoch end, resumable exactly
  (``train.resume``: a path or ``auto``): see ``resumable.py`` for the data order and
  ``checkpoint.py`` for what is stored;
- corrupt-sample accounting (``BadSampleTracker``) and a clear error on NaN/inf losses;
  either stops every rank together, because the check happens after the per-step all-reduce;
- ``stop_at``: a wall-clock deadline (``time.time()``), for runs that must keep a time budget
  (the demo). When the pace of the steps so far says the remaining ones would pass it, the run
  is shortened to the steps that fit, and the rest of the lr schedule is compressed onto them
  (``CosineFactor.shorten``), so it still ends at ``min_lr``; a later, faster pace lengthens
  it again, up to the configured steps (``fit()['shortened']``). A step that ends past the
  deadline ends training (``fit()['stopped_early']``); either way it saves and releases as usual;
- ``evaluate(model) -> dict[str, float]``: called on every rank with the unwrapped model in
  eval mode under ``torch.no_grad()`` and autocast, every ``train.eval_every`` epochs and at
  the end; the RNG state is saved around it, so evaluating never changes the training run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanvl.engine import distributed as dist_utils
from leanvl.engine.checkpoint import (
    CHECKPOINT_DIR,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    load_model_state,
    model_state,
    restore_rng_state,
    save_checkpoint,
    to_plain,
)
from leanvl.engine.logging import MetricsWriter, ProgressBar
from leanvl.engine.optim import (
    build_optimizer,
    build_scheduler,
    freeze,
    frozen_prefixes_of,
    is_frozen,
)
from leanvl.engine.precision import autocast, make_grad_scaler, resolve_precision
from leanvl.engine.resumable import ResumableBatches

log = logging.getLogger(__name__)
# Over the corrupt-sample limit, how long a run may keep reading its epoch (without training)
# so that its error counts the corrupt media the loader workers and the other ranks met.
BAD_SAMPLE_COUNT_SECONDS = 120.0

EvaluateFn = Callable[[nn.Module], dict[str, float]]


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the loss and the step."""


class _LossForward(nn.Module):
    """Routes ``forward(batch)`` to ``model.pretrain_losses`` so DDP's hooks see the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model.pretrain_losses(batch)


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside dicts, lists and tuples) to ``device``; leave the rest."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(to_device(item, device) for item in value)
    return value


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        if "index" in batch:
            return len(batch["index"])
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
    return 0


def _config_dict(cfg: Any) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(cfg):
        return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    return dict(cfg)


def _dataset_size(loader: Any) -> int | None:
    loaders = list(loader.loaders.values()) if isinstance(getattr(loader, "loaders", None),
                                                           dict) else [loader]
    total = 0
    for item in loaders:
        try:
            total += len(item.dataset)
        except (AttributeError, TypeError):
            return None
    return total


class Trainer:
    """Trains ``model`` on ``train_loader`` following ``cfg`` (a ``leanvl.config.Config``)."""

    def __init__(self, cfg: Any, model: nn.Module, train_loader: Any,
                 evaluate: EvaluateFn | None = None, device: torch.device | str | None = None,
                 *, find_unused_parameters: bool | None = None, include_frozen: bool = False,
                 progress: bool = True, stop_at: float | None = None):
        self.cfg, self.train_cfg = cfg, cfg.train
        self.model = model
        self.evaluate = evaluate
        self.include_frozen = include_frozen
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        self.is_main = self.rank == 0
        self.device = torch.device(device) if device is not None else dist_utils.select_device()
        self.out = Path(cfg.out)
        self.checkpoint_dir = self.out / CHECKPOINT_DIR
        self.accum = max(1, int(self.train_cfg.grad_accum))
        self.loss_weights = {str(k): float(v) for k, v in (self.train_cfg.loss_weights or {}).items()}
        self.frozen_prefixes = frozen_prefixes_of(model)
        self.progress = progress and self.is_main
        self.stop_at = stop_at
        self.stopped_early = False
        self._pace_from: tuple[int, float] | None = None  # (step, time) the pace counts from

        if self.train_cfg.activation_checkpointing:
            setter = getattr(model, "set_grad_checkpointing", None)
            if callable(setter):
                setter(True)
            else:
                log.warning("train.activation_checkpointing ignored: %s has no "
                            "set_grad_checkpointing()", type(model).__name__)
        freeze(model, self.frozen_prefixes)
        model.to(self.device)

        self.batches = ResumableBatches(train_loader, seed=int(cfg.seed))
        self.batches_per_epoch = self._batches_per_epoch(train_loader)
        self.steps_per_epoch, self.total_steps, self.warmup_steps = self._plan()
        self.planned_steps = self.total_steps  # what the config asks for; stop_at may shorten
        self._pace_logged = self.planned_steps  # the run length last reported at INFO

        self.precision = resolve_precision(self.train_cfg.precision, self.device)
        self.scaler = make_grad_scaler(self.precision, self.device)
        self.optimizer = build_optimizer(model, self.train_cfg)
        self.trainable_parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = build_scheduler(self.optimizer, float(self.train_cfg.lr),
                                         float(self.train_cfg.min_lr), self.warmup_steps,
                                         self.total_steps)

        self.forward: nn.Module = _LossForward(model)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if dist_utils.is_distributed():
            if find_unused_parameters is None:
                # a model whose steps skip parameters (LayerDrop, a task head using part of a
                # backbone) says so; a loss weighted 0 leaves its head without gradients
                find_unused_parameters = any(
                    bool(getattr(m, "ddp_find_unused_parameters", False))
                    for m in model.modules()) or 0.0 in self.loss_weights.values()
            ignored = [f"model.{name}" for name, _ in
                       list(model.named_parameters()) + list(model.named_buffers())
                       if is_frozen(name, self.frozen_prefixes)]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.forward, ignored)
            self.ddp = nn.parallel.DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=find_unused_parameters)
            self.forward = self.ddp

        from leanvl.data.datasets import BadSampleTracker

        self.tracker = BadSampleTracker(float(cfg.data.max_bad_fraction),
                                        _dataset_size(train_loader))
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.eval_history: list[dict[str, Any]] = []
        self.last_checkpoint: Path | None = None
        self._saved_step = -1
        self._evaluated_step = -1
        self._writer: MetricsWriter | None = None
        self._unknown_weights_checked = False

    # ------------------------------------------------------------------ planning

    def _batches_per_epoch(self, loader: Any) -> int | None:
        try:
            count = len(self.batches)
        except TypeError:
            return None
        dataset = getattr(loader, "dataset", None)
        if isinstance(dataset, torch.utils.data.IterableDataset) and self.world_size > 1:
            count //= self.world_size  # a stream's length counts every rank's samples
        return count

    def _plan(self) -> tuple[int | None, int, int]:
        """Steps per epoch, total optimizer steps and warmup steps."""
        cfg = self.train_cfg
        steps_per_epoch = None
        limits = []
        if self.batches_per_epoch is not None:
            steps_per_epoch = self.batches_per_epoch // self.accum
            if steps_per_epoch == 0:
                raise ValueError(f"an epoch has {self.batches_per_epoch} batches, fewer than "
                                 f"train.grad_accum={self.accum}")
            if float(cfg.epochs) > 0:
                limits.append(math.ceil(float(cfg.epochs) * steps_per_epoch - 1e-9))
        if int(cfg.max_steps) > 0:
            limits.append(int(cfg.max_steps))
        if not limits:
            raise ValueError("the training loader has no length: set train.max_steps")
        total = min(limits)
        if int(cfg.warmup_steps) > 0:
            warmup = int(cfg.warmup_steps)
        elif steps_per_epoch is not None:
            warmup = round(float(cfg.warmup_epochs) * steps_per_epoch)
        else:
            warmup = 0
            if float(cfg.warmup_epochs) > 0:
                log.warning("train.warmup_epochs needs a loader with a length; no warmup "
                            "(set train.warmup_steps)")
        return steps_per_epoch, total, min(warmup, total)

    # ------------------------------------------------------------------ helpers

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training autocast context (also used around evaluation)."""
        return autocast(self.precision, self.device)

    def _train_mode(self) -> None:
        self.model.train()
        for name, module in self.model.named_modules():
            if name and is_frozen(name + ".", self.frozen_prefixes):
                module.eval()  # frozen teachers: no dropout, no batch-norm updates

    def _weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        if not isinstance(losses, dict) or not losses:
            raise TypeError(f"{type(self.model).__name__}.pretrain_losses must return a "
                            f"non-empty dict of scalar losses, got {type(losses).__name__}")
        if not self._unknown_weights_checked:
            self._unknown_weights_checked = True
            unknown = sorted(set(self.loss_weights) - set(losses))
            if unknown:
                log.warning("train.loss_weights names losses the model does not return: %s "
                            "(it returns %s)", ", ".join(unknown), ", ".join(sorted(losses)))
        total = None
        for name, value in losses.items():
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise TypeError(f"loss '{name}' must be a scalar tensor, got "
                                f"{getattr(value, 'shape', type(value).__name__)}")
            weight = self.loss_weights.get(name, 1.0)
            if weight == 0.0:
                continue
            term = value * weight if weight != 1.0 else value
            total = term if total is None else total + term
        return total if total is not None else sum(v * 0.0 for v in losses.values())

    def _step_metrics(self) -> dict[str, Any]:
        """What the model measured in its last ``pretrain_losses`` call besides the losses
        (``step_metrics()``, e.g. a codebook's utilisation): logged with them, never summed."""
        method = getattr(self.model, "step_metrics", None)
        return dict(method()) if callable(method) else {}

    def _epoch_position(self) -> float:
        if not self.batches_per_epoch:
            return float(self.epoch)
        return round(self.epoch + self.batch_in_epoch / (self.steps_per_epoch * self.accum), 6)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_state(self) -> dict[str, Any]:
        excluded = [] if self.include_frozen else list(self.frozen_prefixes)
        return {
            "format": "leanvl.checkpoint/1",
            "model": model_state(self.model, excluded),
            "model_excluded_prefixes": excluded,
            # the kwargs it was built with: the config's, plus what the build derived from the
            # data (a truncated vocabulary's ids), so that the checkpoint loads on its own
            "model_kwargs": to_plain(getattr(self.model, "registry_kwargs", None)),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world_size,
            "grad_accum": self.accum,
            "total_steps": self.total_steps,
            "config": _config_dict(self.cfg),
        }

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (collective: call on every rank)."""
        rng = dist_utils.all_gather_object(capture_rng_state())
        bad = dist_utils.all_gather_object({"seen": self.tracker.seen,
                                            "bad": dict(self.tracker.bad)})
        path = None
        if self.is_main:
            state = self._checkpoint_state()
            state["rng"], state["bad_samples"] = rng, bad
            path = save_checkpoint(state, self.checkpoint_dir, self.step,
                                   int(self.train_cfg.keep_checkpoints))
            log.info("saved %s", path)
        self.last_checkpoint = path or self.last_checkpoint
        self._saved_step = self.step
        return path

    def _resume_path(self) -> Path | None:
        resume = str(self.train_cfg.resume or "")
        if not resume:
            return None
        if resume == "auto":
            found = latest_checkpoint(self.checkpoint_dir) if self.is_main else None
            found = dist_utils.broadcast_object(str(found) if found else None)
            if found is None:
                log.info("train.resume=auto: no checkpoint in %s, starting fresh",
                         self.checkpoint_dir)
                return None
            return Path(found)
        path = Path(resume)
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is None:
                raise FileNotFoundError(f"train.resume={resume}: no checkpoint-*.pt in it")
            return found
        if not path.is_file():
            raise FileNotFoundError(f"train.resume={resume}: no such checkpoint")
        return path

    def resume(self, path: str | Path) -> dict[str, Any] | None:
        """Load a checkpoint into model, optimizer, scheduler, scaler and position; returns this
        rank's RNG state (restored by ``fit`` once the epoch's iterator exists), if usable."""
        checkpoint = load_checkpoint(path, map_location="cpu")
        load_model_state(self.model, checkpoint["model"],
                         allow_missing=checkpoint.get("model_excluded_prefixes", []))
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.step = int(checkpoint["step"])
        if self.scheduler.lr_lambdas[0].from_step > 0:  # a run shortened to keep a deadline
            self.total_steps = int(checkpoint.get("total_steps", self.total_steps))
        self.epoch = int(checkpoint["epoch"])
        self.batch_in_epoch = int(checkpoint["batch_in_epoch"])
        self._saved_step = self.step
        self.last_checkpoint = Path(path)
        same_layout = (checkpoint.get("world_size") == self.world_size
                       and checkpoint.get("grad_accum") == self.accum)
        if not same_layout:
            log.warning("resuming %s written with world_size=%s, grad_accum=%s under "
                        "world_size=%d, grad_accum=%d: training continues, but not exactly "
                        "as the original run would have", path, checkpoint.get("world_size"),
                        checkpoint.get("grad_accum"), self.world_size, self.accum)
        counts = checkpoint.get("bad_samples") or []
        if len(counts) == self.world_size:
            self.tracker.seen = int(counts[self.rank]["seen"])
            self.tracker.bad = dict(counts[self.rank]["bad"])
        states = checkpoint.get("rng") or []
        log.info("resumed from %s at step %d (epoch %d, batch %d)", path, self.step,
                 self.epoch, self.batch_in_epoch)
        if len(states) == self.world_size:
            return states[self.rank]
        dist_utils.seed_everything(int(self.cfg.seed) + 1000 * self.step, self.rank)
        return None

    # ------------------------------------------------------------------ evaluation

    def run_evaluation(self) -> dict[str, float]:
        """Call the evaluation callback (every rank), log and record its metrics."""
        if self.evaluate is None:
            return {}
        rng = capture_rng_state()
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                metrics = self.evaluate(self.model) or {}
        finally:
            restore_rng_state(rng)
            self._train_mode()
        metrics = {str(k): (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}
        record = {"step": self.step, "epoch": self._epoch_position(),
                  **{f"eval/{k}": v for k, v in metrics.items()}}
        self.eval_history.append(record)
        self._evaluated_step = self.step
        if self._writer is not None:
            self._writer.write(record)
        if metrics:
            log.info("eval at step %d: %s", self.step, ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ training

    def _count_every_bad_sample(self, iterator) -> Exception:
        """The error of a run over ``data.max_bad_fraction``, counting every corrupt sample:
        loader workers run ahead of training, so this rank first reads the rest of its epoch
        (no training; at most ``BAD_SAMPLE_COUNT_SECONDS``), then the ranks pool their lists."""
        deadline = time.perf_counter() + BAD_SAMPLE_COUNT_SECONDS
        complete = True
        for batch in iterator:
            if isinstance(batch, dict):
                self.tracker.count(batch)
            if time.perf_counter() > deadline:
                complete = False
                break
        bad: dict[str, int] = {}
        parts = dist_utils.all_gather_object((dict(self.tracker.bad), complete))
        for part, _ in parts:
            for name, times in part.items():
                bad[name] = bad.get(name, 0) + times
        note = "" if all(done for _, done in parts) else \
            f" (at least: counting stopped after {BAD_SAMPLE_COUNT_SECONDS:.0f} s of reading)"
        return self.tracker.error(bad, note)

    def _train_step(self, iterator) -> dict[str, float] | None:
        """One optimizer step over ``grad_accum`` micro-batches; None when the data ran out."""
        start = time.perf_counter()
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        data_time, samples, skipped = 0.0, 0, 0
        over_limit = False
        for micro in range(self.accum):
            fetch = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                if micro:
                    log.warning("the epoch's data ended inside a gradient-accumulation window; "
                                "dropping its %d micro-batches", micro)
                    self.optimizer.zero_grad(set_to_none=True)
                return None
            data_time += time.perf_counter() - fetch
            self.batch_in_epoch += 1
            if isinstance(batch, dict):
                self.tracker.count(batch)
                over_limit = over_limit or self.tracker.over_limit()
                skipped += len(batch.get("skipped", []) or [])
            samples += _batch_size(batch)
            batch = to_device(batch, self.device)
            last = micro == self.accum - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else \
                contextlib.nullcontext()
            with sync:
                with self.autocast():
                    losses = self.forward(batch)
                    total = self._weighted_total(losses)
                scaled = total / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float().reshape(())
                counts[name] = counts.get(name, 0) + 1
            for name, value in self._step_metrics().items():  # logged, not trained on
                key = f"metric/{name}"
                sums[key] = sums.get(key, 0.0) + torch.as_tensor(
                    value, dtype=torch.float32, device=self.device).reshape(())
                counts[key] = counts.get(key, 0) + 1
            sums["loss"] = sums.get("loss", 0.0) + total.detach().float().reshape(())
            counts["loss"] = counts.get("loss", 0) + 1

        names = sorted(n for n in sums if n != "loss") + ["loss"]
        flags = torch.tensor([1.0 if over_limit else 0.0], device=self.device)
        values = torch.stack([sums[n] / counts[n] for n in names] + [flags[0]])
        values = dist_utils.all_reduce_mean(values).tolist()
        if values[-1] > 0:  # some rank is over the limit: every rank stops here
            raise self._count_every_bad_sample(iterator)
        reduced = dict(zip(names, values[:-1]))
        for name in names:
            if not math.isfinite(reduced[name]):
                which = "the weighted total loss" if name == "loss" else f"loss '{name}'"
                raise NonFiniteLossError(
                    f"{which} is {reduced[name]} at step {self.step + 1} (epoch {self.epoch}, "
                    f"batch {self.batch_in_epoch}); losses this step: "
                    + ", ".join(f"{k}={v:.4g}" for k, v in reduced.items())
                    + ". Lower train.lr, check the inputs, or use train.precision=fp32.")

        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if float(self.train_cfg.clip_grad) > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable_parameters,
                                                             float(self.train_cfg.clip_grad)))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        group = self.optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_scale", 1.0)
        with warnings.catch_warnings():
            # a step fp16's GradScaler skips (inf gradients) still counts in the schedule, which
            # stays on self.step; torch warns that the optimizer did not step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        self.step += 1

        result = dict(reduced)
        result.update(lr=lr, data_time=data_time, step_time=time.perf_counter() - start,
                      samples=samples * self.world_size, skipped=skipped)
        if grad_norm is not None:
            result["grad_norm"] = grad_norm
        return result

    def fit(self) -> dict[str, Any]:
        """Train to the end (resuming if configured); returns the final metrics and history.

        Keys: ``step``, ``epoch``, ``steps_per_epoch``, ``stopped_early`` (``stop_at`` ended
        the run before ``total_steps``), ``shortened`` (the pace shortened it to keep
        ``stop_at``), ``train`` (the last logged record), ``eval`` (the last
        evaluation's metrics), ``history`` (every logged record), ``eval_history``,
        ``checkpoint`` (the last checkpoint written or loaded).
        """
        from leanvl.config import save_config

        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out)
        self._writer = MetricsWriter(self.out, enabled=self.is_main,
                                     tensorboard=bool(self.train_cfg.tensorboard))
        dist_utils.seed_everything(int(self.cfg.seed), self.rank)
        pending_rng = None
        path = self._resume_path()
        if path is not None:
            pending_rng = self.resume(path)
            self._writer.truncate_after(self.step)
        self._train_mode()
        log.info("training %d steps (%s per epoch, grad_accum %d, world %d, precision %s)",
                 self.total_steps, self.steps_per_epoch, self.accum, self.world_size,
                 self.precision)
        bar = ProgressBar(self.total_steps, initial=self.step, enabled=self.progress)
        log_every = max(1, int(self.train_cfg.log_every))
        save_every = int(self.train_cfg.save_every)
        eval_every = int(self.train_cfg.eval_every)
        window: list[dict[str, float]] = []
        window_start = time.perf_counter()
        try:
            while self.step < self.total_steps:
                iterator = self.batches.epoch(self.epoch, skip=self.batch_in_epoch)
                if pending_rng is not None:  # after the iterator: its set-up must not count
                    restore_rng_state(pending_rng)
                    pending_rng = None
                epoch_done = False
                while self.step < self.total_steps:
                    if self.batches_per_epoch is not None and \
                            self.batch_in_epoch + self.accum > self.steps_per_epoch * self.accum:
                        epoch_done = True
                        break
                    result = self._train_step(iterator)
                    if result is None:
                        epoch_done = True
                        break
                    window.append(result)
                    bar.advance()
                    if self.step % log_every == 0 or self.step == self.total_steps:
                        self._log(window, time.perf_counter() - window_start, bar)
                        window, window_start = [], time.perf_counter()
                    if save_every > 0 and self.step % save_every == 0:
                        self.save()
                    if self._past_deadline():
                        break
                    self._keep_pace(bar)
                if self.batches_per_epoch is not None and \
                        self.batch_in_epoch + self.accum > self.steps_per_epoch * self.accum:
                    epoch_done = True
                if not epoch_done or self.stopped_early:
                    break  # reached total_steps (or the deadline) inside the epoch
                if self.batch_in_epoch == 0 and self.batches_per_epoch is None:
                    raise RuntimeError("the training loader yielded no batches")
                self.epoch += 1
                self.batch_in_epoch = 0
                if self._saved_step != self.step:
                    self.save()
                if eval_every > 0 and self.epoch % eval_every == 0 and \
                        self.step < self.total_steps:
                    self.run_evaluation()
            if pending_rng is not None:
                restore_rng_state(pending_rng)
            if window:
                self._log(window, time.perf_counter() - window_start, bar)
            if self._saved_step != self.step:
                self.save()
            final_eval = self.run_evaluation() if self._evaluated_step != self.step or \
                not self.eval_history else self._last_eval()
        finally:
            bar.close()
            self._writer.close()
        return {"step": self.step, "epoch": self._epoch_position(),
                "steps_per_epoch": self.steps_per_epoch, "stopped_early": self.stopped_early,
                "shortened": self.total_steps < self.planned_steps,
                "train": self.history[-1] if self.history else {},
                "eval": final_eval, "history": self.history, "eval_history": self.eval_history,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}

    def _keep_pace(self, bar: ProgressBar) -> None:
        """Fit the run's length to ``stop_at`` at the pace of its steps so far (the first two
        steps of a run, loader start and kernel set-up, are left out of the pace)."""
        if self.stop_at is None:
            return
        now = time.time()
        if self._pace_from is None:
            self._pace_from = (self.step + 2, 0.0)  # the step the pace counts from, and when
        if self.step <= self._pace_from[0]:
            self._pace_from = (self._pace_from[0], now)
            return
        counted = self.step - self._pace_from[0]
        if counted < 5:
            return
        pace = (now - self._pace_from[1]) / counted
        fit = self.step + max(0, math.floor((self.stop_at - now) / pace))
        # rank 0's clock decides for every rank
        target = int(dist_utils.broadcast_object(min(self.planned_steps, fit)))
        margin = self.planned_steps // 50  # 2% of the run
        if self.total_steps <= target <= self.total_steps + margin:
            return  # lengthen only by more than the margin, so the end does not wobble
        self.scheduler.lr_lambdas[0].shorten(self.step, target)  # one factor for every group
        # a noisy machine moves the end by a step or two at a time: say so once per margin
        moved = abs(target - self._pace_logged) > margin
        level = logging.INFO if moved else logging.DEBUG
        log.log(level, "at %.2f s per step, %d steps fit before stop_at: the run now ends at "
                "step %d of %d (the lr schedule compressed to match)", pace, fit, target,
                self.planned_steps)
        if moved:
            self._pace_logged = target
        self.total_steps = target
        bar.set_total(target)

    def _past_deadline(self) -> bool:
        """Whether ``stop_at`` has passed (rank 0's clock decides for every rank)."""
        if self.stop_at is None or self.step >= self.total_steps:
            return False
        passed = torch.tensor([1.0 if time.time() >= self.stop_at else 0.0], device=self.device)
        if dist_utils.is_distributed():
            passed = dist_utils.all_reduce_max(passed)
        if passed.item() > 0:
            self.stopped_early = True
            log.warning("stopping at step %d of %d: the time budget (stop_at) has run out",
                        self.step, self.total_steps)
        return self.stopped_early

    def _last_eval(self) -> dict[str, float]:
        record = self.eval_history[-1]
        return {k[len("eval/"):]: v for k, v in record.items() if k.startswith("eval/")}

    def _log(self, window: list[dict[str, float]], elapsed: float, bar: ProgressBar) -> None:
        keys = [k for k in window[-1] if k not in ("lr", "samples", "skipped", "step_time",
                                                   "data_time")]
        record: dict[str, Any] = {"step": self.step, "epoch": self._epoch_position(),
                                  "lr": window[-1]["lr"]}
        for key in keys:
            present = [w[key] for w in window if key in w]
            record[key] = sum(present) / len(present)
        record["clips_per_s"] = sum(w["samples"] for w in window) / max(elapsed, 1e-9)
        record["data_time"] = sum(w["data_time"] for w in window) / len(window)
        record["step_time"] = sum(w["step_time"] for w in window) / len(window)
        record["skipped"] = sum(w["skipped"] for w in window)
        record["bad_samples"] = self.tracker.num_bad
        self.history.append(record)
        if self._writer is not None:
            self._writer.write(record)
        bar.show(loss=record["loss"], clips_s=round(record["clips_per_s"], 1))
        if not self.progress:
            log.info("step %d/%d loss %.4f lr %.3g %.1f clips/s", self.step, self.total_steps,
                     record["loss"], record["lr"], record["clips_per_s"])
