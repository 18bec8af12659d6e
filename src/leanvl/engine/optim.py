"""AdamW over the trainable parameters with no-decay groups and layer-wise lr decay, and the
cosine schedule with linear warmup.

Parameter groups:

- frozen modules (names starting with a ``frozen_prefixes`` entry of the model or of any
  sub-module, taken relative to it) are set to ``requires_grad=False`` and left out;
- no weight decay for biases, every 1-D parameter (norm weights, scales, temperatures) and
  the names a module returns from ``no_weight_decay()`` (position tables, [CLS]/mask tokens;
  names are relative to the module that declares them and may name a whole sub-module);
- layer-wise lr decay (fine-tuning, ``train.layer_decay < 1``) when the model exposes
  ``layer_id(param_name) -> int`` and ``num_layers``: the lr of layer ``i`` is multiplied by
  ``decay ** (num_layers + 1 - i)`` (embeddings are layer 0, the head ``num_layers + 1``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


def is_frozen(name: str, prefixes: Iterable[str]) -> bool:
    """Whether parameter/buffer ``name`` belongs to a frozen module."""
    return any(name.startswith(prefix) for prefix in prefixes if prefix)


def frozen_prefixes_of(model: nn.Module) -> tuple[str, ...]:
    """Every ``frozen_prefixes`` declared in the module tree, as full-name prefixes (a task
    wrapping a model with a teacher under ``self.model`` yields ``model.teacher.``)."""
    found: list[str] = []
    for module_name, module in model.named_modules():
        for prefix in getattr(module, "frozen_prefixes", ()) or ():
            found.append(f"{module_name}.{prefix}" if module_name else str(prefix))
    return tuple(dict.fromkeys(found))


def freeze(model: nn.Module, prefixes: Sequence[str] | None = None) -> list[str]:
    """Set ``requires_grad=False`` on parameters under ``prefixes`` (default: every
    ``frozen_prefixes`` in the module tree); returns the frozen names."""
    prefixes = frozen_prefixes_of(model) if prefixes is None else tuple(prefixes)
    frozen = []
    for name, param in model.named_parameters():
        if is_frozen(name, prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names (or module prefixes) declared by ``no_weight_decay()`` methods."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        method = getattr(module, "no_weight_decay", None)
        if callable(method):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + str(n) for n in method())
    return names


def _skip_decay(name: str, param: torch.Tensor, declared: set[str]) -> bool:
    if param.ndim <= 1 or name.endswith(".bias"):
        return True
    return any(_under(name, d) for d in declared)


def layer_scales(model: nn.Module, layer_decay: float) -> dict[str, float] | None:
    """Per-parameter lr multipliers from ``model.layer_id``; None when not applicable."""
    if layer_decay >= 1.0:
        return None
    layer_id = getattr(model, "layer_id", None)
    num_layers = getattr(model, "num_layers", None)
    if not callable(layer_id) or num_layers is None:
        log.warning("train.layer_decay=%s ignored: %s has no layer_id()/num_layers",
                    layer_decay, type(model).__name__)
        return None
    num_layers = int(num_layers() if callable(num_layers) else num_layers)
    return {name: layer_decay ** (num_layers + 1 - int(layer_id(name)))
            for name, _ in model.named_parameters()}


def _under(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` is ``prefix`` itself or lies inside module ``prefix``."""
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def prefix_scale(name: str, lr_scales: dict[str, float] | None) -> float:
    """The multiplier of the longest ``lr_scales`` prefix that ``name`` starts with (else 1)."""
    best, scale = -1, 1.0
    for prefix, value in (lr_scales or {}).items():
        if _under(name, prefix) and len(prefix) > best:
            best, scale = len(prefix), float(value)
    return scale


def param_groups(model: nn.Module, weight_decay: float, lr: float = 1.0,
                 layer_decay: float = 1.0, lr_scales: dict[str, float] | None = None
                 ) -> list[dict[str, Any]]:
    """AdamW parameter groups over the trainable parameters (see the module docstring).

    ``lr_scales`` maps parameter-name prefixes to lr multipliers (e.g. ``{"text_encoder": 0.1}``
    for a pretrained part), applied on top of layer decay. Each group carries ``lr``
    (= ``lr * lr_scale``), ``lr_scale``, ``weight_decay`` and a readable ``group_name`` such as
    ``decay`` or ``no_decay/layer_3``.
    """
    frozen = frozen_prefixes_of(model)
    declared = no_weight_decay_names(model)
    scales = layer_scales(model, layer_decay)
    names = {name for name, _ in model.named_parameters()}
    for prefix in lr_scales or {}:
        if not any(_under(n, prefix) for n in names):
            raise ValueError(f"train.lr_scales: no parameter of {type(model).__name__} starts "
                             f"with '{prefix}'")
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or is_frozen(name, frozen):
            continue
        no_decay = _skip_decay(name, param, declared)
        scale = (scales[name] if scales else 1.0) * prefix_scale(name, lr_scales)
        key = (no_decay, scale)
        if key not in groups:
            label = "no_decay" if no_decay else "decay"
            if scales:
                label += f"/layer_{int(model.layer_id(name))}"
            if lr_scales:
                label += f"/x{scale:g}"
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_scale": scale, "lr": lr * scale, "group_name": label}
        groups[key]["params"].append(param)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return list(groups.values())


def build_optimizer(model: nn.Module, train_cfg: Any) -> torch.optim.AdamW:
    """AdamW from ``train.lr``, ``weight_decay``, ``betas``, ``eps``, ``layer_decay``,
    ``lr_scales``.

    Freezes the model's ``frozen_prefixes`` first, so they never reach the optimizer.
    """
    freeze(model)
    from leanvl.engine.checkpoint import to_plain

    lr_scales = to_plain(getattr(train_cfg, "lr_scales", None))
    groups = param_groups(model, float(train_cfg.weight_decay), float(train_cfg.lr),
                          float(train_cfg.layer_decay), lr_scales)
    betas = tuple(float(b) for b in train_cfg.betas)
    if len(betas) != 2:
        raise ValueError(f"train.betas needs two values, got {list(train_cfg.betas)}")
    return torch.optim.AdamW(groups, lr=float(train_cfg.lr), betas=betas,
                             eps=float(train_cfg.eps))


def cosine_lr(step: float, base_lr: float, min_lr: float, warmup_steps: int,
              total_steps: int) -> float:
    """The lr for optimizer step ``step`` (0-based).

    Linear warmup reaches ``base_lr`` at ``step = warmup_steps - 1`` (so the first step is
    not wasted at lr 0), then a half cosine from ``base_lr`` at ``warmup_steps`` to
    ``min_lr`` at ``total_steps`` (past the end it stays at ``min_lr``).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class CosineFactor:
    """``cosine_lr / base_lr`` per step, as LambdaLR's multiplier. ``shorten(step, total)`` ends
    the run at ``total`` steps instead: from ``step`` on, the rest of the schedule (warm-up
    included, if any is left) is compressed onto the steps left, so the lr still reaches
    ``min_lr`` at the new last step. Its state is plain attributes, which LambdaLR's state dict
    saves and restores."""

    def __init__(self, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int):
        self.base_lr, self.min_lr = base_lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.from_step, self.from_position, self.stretch = 0, 0.0, 1.0  # no shortening yet

    def position(self, step: int) -> float:
        """Where on the original schedule step ``step`` lies."""
        if step < self.from_step:
            return float(step)
        return self.from_position + (step - self.from_step) * self.stretch

    def shorten(self, step: int, total: int) -> None:
        """Map the schedule left after ``step`` onto ``total - step`` steps."""
        at = self.position(step)
        self.from_step, self.from_position = step, at
        self.stretch = (self.total_steps - at) / max(1, total - step)

    def __call__(self, step: int) -> float:
        if self.base_lr <= 0:
            return 0.0
        return cosine_lr(self.position(step), self.base_lr, self.min_lr, self.warmup_steps,
                         self.total_steps) / self.base_lr


def build_scheduler(optimizer: torch.optim.Optimizer, base_lr: float, min_lr: float,
                    warmup_steps: int, total_steps: int) -> LambdaLR:
    """Per-step cosine schedule as a LambdaLR (its state goes in the checkpoint); its
    ``CosineFactor`` (``lr_lambdas[0]``) can shorten the run.

    Every group follows the same curve scaled by its initial lr, so layer-decay ratios hold
    throughout (``min_lr`` is scaled alike).
    """
    return LambdaLR(optimizer, CosineFactor(base_lr, min_lr, warmup_steps, total_steps))
