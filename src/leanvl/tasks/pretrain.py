"""Pre-training: build the model, data and trainer from a ``Config`` and run.

``run_pretrain(cfg)`` is what ``leanvl pretrain PRESET k=v ...`` calls; the builders it uses
live in ``tasks/build.py``, shared with fine-tuning, evaluation and the demo.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanvl.data.datasets import build_dataset
from leanvl.data.text import TextEncoder
from leanvl.tasks.build import (
    build_model,
    build_text_encoder,
    build_train_loader,
    configure_threads,
    release,
    truncate_vocabulary,
)

log = logging.getLogger(__name__)


def retrieval_callback(cfg: Any, text: TextEncoder, device: torch.device):
    """Zero-shot retrieval on ``data.test`` after training (None when it is not set)."""
    if not cfg.data.test:
        return None
    from leanvl.tasks.retrieval import evaluate_retrieval

    dataset = build_dataset(cfg.data.test, cfg.data.root or None, cfg.data, train=False,
                            kind="retrieval")

    def evaluate(model: nn.Module) -> dict[str, float]:
        return evaluate_retrieval(model, dataset, text, cfg.eval, device,
                                  batch_size=cfg.eval.batch_size,
                                  num_workers=cfg.data.num_workers)

    return evaluate


def run_pretrain(cfg: Any, evaluate=None, progress: bool = True,
                 stop_at: float | None = None) -> dict[str, Any]:
    """Pre-train ``cfg.model`` on ``cfg.data.train``; release weights to ``cfg.out/model``
    (``progress``: the progress bar on rank 0; without it, a log line per ``log_every``;
    ``stop_at``: a ``time.time()`` deadline that ends training early, see ``Trainer``)."""
    from leanvl.engine import distributed
    from leanvl.engine.logging import setup_logging
    from leanvl.engine.trainer import Trainer

    info = distributed.init_distributed(cfg.train.distributed_backend)
    setup_logging(info.rank, cfg.out)
    configure_threads(cfg.data.num_workers, cfg.data.cpu_threads)
    text = build_text_encoder(cfg.data)
    model = build_model(cfg.model, truncate_vocabulary(cfg, text))
    loader = build_train_loader(cfg, text)
    if evaluate is None:
        evaluate = retrieval_callback(cfg, text, info.device)
    trainer = Trainer(cfg, model, loader, evaluate=evaluate, device=info.device,
                      progress=progress, stop_at=stop_at)
    result = trainer.fit()
    if distributed.is_main():
        result["released"] = str(release(model, Path(cfg.out) / "model", cfg.data))
    distributed.barrier()
    return result
