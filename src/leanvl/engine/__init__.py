"""The training engine: one loop (``Trainer``) for every task, plus distributed set-up,
precision, optimizer/schedule, checkpoints and logging.

Names are imported lazily so that ``import leanvl.engine.checkpoint`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": "trainer",
    "NonFiniteLossError": "trainer",
    "init_distributed": "distributed",
    "cleanup": "distributed",
    "is_main": "distributed",
    "seed_everything": "distributed",
    "build_optimizer": "optim",
    "build_scheduler": "optim",
    "save_pretrained": "checkpoint",
    "load_pretrained": "checkpoint",
    "load_weights": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "setup_logging": "logging",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
