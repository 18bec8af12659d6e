"""Fine-tuning and evaluation runners behind ``leanvl finetune`` and ``leanvl eval``.

- ``retrieval`` (and ``mc``, which the field evaluates with the retrieval model): the model's
  own ``pretrain_losses`` on video-text pairs (set ``train.loss_weights.mlm=0`` for VTC+VTM
  only, as UMT's retrieval fine-tuning), evaluated with the re-ranking protocol.
- ``qa``: ``VideoQAClassifier`` (answer classification over ``answers.json`` next to the
  training file, or the most frequent training answers).
- ``classify``: ``VideoClassifier`` (``classes.json`` next to the training file, or the sorted
  labels), with layer-wise lr decay from ``train.layer_decay``.

Fine-tuned weights are released like pre-trained ones, with the task and its answer / class
list in ``config.json``'s ``extra``; ``load_finetuned`` rebuilds the wrapper.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanvl.data.annotations import load_annotations
from leanvl.data.datasets import build_dataset
from leanvl.tasks.build import (
    build_model,
    build_text_encoder,
    build_train_loader,
    configure_threads,
    truncate_vocabulary,
)
from leanvl.tasks.pretrain import run_pretrain

TASKS = ("retrieval", "qa", "mc", "classify")
EVAL_TASKS = TASKS + ("probe",)  # probe: E-ViLM's linear probe of a frozen backbone


def _side_list(annotations: str, name: str) -> list | None:
    path = Path(annotations).parent / name
    return json.loads(path.read_text()) if path.is_file() else None


def task_labels(cfg: Any, task: str) -> list | None:
    """The answer vocabulary (qa) or class list (classify) for the training data."""
    if task == "qa":
        from leanvl.tasks.qa import answer_vocabulary

        return _side_list(cfg.data.train, "answers.json") or answer_vocabulary(
            load_annotations(cfg.data.train, kind="qa"))
    if task == "classify":
        classes = _side_list(cfg.data.train, "classes.json")
        if classes is None:
            classes = sorted({r["label"] for r in load_annotations(cfg.data.train)}, key=str)
        return classes
    return None


def wrap(model: nn.Module, task: str, labels: list | None) -> nn.Module:
    """The trainable module of a task around a backbone."""
    if task == "qa":
        from leanvl.tasks.qa import VideoQAClassifier

        return VideoQAClassifier(model, len(labels))
    if task == "classify":
        from leanvl.tasks.classify import VideoClassifier

        return VideoClassifier(model, len(labels))
    return model


def load_finetuned(folder: str | Path, overrides: dict[str, Any] | None = None
                   ) -> tuple[nn.Module, str, list | None]:
    """(model, task, labels) from weights released by ``run_finetune`` (or by pre-training);
    ``overrides`` replace stored model kwargs (inference options such as a stream)."""
    from leanvl.engine.checkpoint import CONFIG_NAME, load_pretrained, load_weights
    from leanvl.models.registry import create_model

    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    extra = config.get("extra") or {}
    task = extra.get("task", "retrieval")
    if task in ("retrieval", "mc"):
        return load_pretrained(folder, overrides=overrides), task, None
    labels = extra["labels"]
    model = wrap(create_model(config["name"], **{**config["kwargs"], **(overrides or {})}),
                 task, labels)
    load_weights(model, folder)
    return model.eval(), task, labels


def _evaluator(cfg: Any, task: str, labels: list | None, device, progress: bool = True):
    """``evaluate(model) -> metrics`` on ``data.test`` for ``task`` (None without test data)."""
    if not cfg.data.test:
        return None
    def text(model):  # the model's own vocabulary (a truncated one maps ids differently)
        return build_text_encoder(cfg.data, model)

    data, root = cfg.data, cfg.data.root or None
    loader_args = dict(batch_size=cfg.eval.batch_size, num_workers=data.num_workers)
    if task == "retrieval":
        from leanvl.tasks.retrieval import evaluate_retrieval

        dataset = build_dataset(data.test, root, data, train=False, kind="retrieval")
        return lambda m: evaluate_retrieval(m, dataset, text(m), cfg.eval, device,
                                            progress_bar=progress, **loader_args)
    if task == "mc":
        from leanvl.tasks.mc import evaluate_mc

        dataset = build_dataset(data.test, root, data, train=False, kind="mc")
        return lambda m: evaluate_mc(m, dataset, text(m), cfg.eval, device,
                                     progress_bar=progress, **loader_args)
    if task == "qa":
        from leanvl.tasks.qa import evaluate_qa

        dataset = build_dataset(data.test, root, data, train=False, kind="qa", answers=labels)
        # eval.qa_mode (auto: a fine-tuned answer head classifies, a pre-trained model ranks)
        return lambda m: evaluate_qa(m, dataset, text(m), cfg.eval, device, answers=labels,
                                     progress_bar=progress, **loader_args)
    from leanvl.tasks.classify import evaluate_classification

    dataset = build_dataset(data.test, root, data, train=False, kind="classification",
                            classes=labels)
    return lambda m: evaluate_classification(m, dataset, device, progress_bar=progress,
                                             **loader_args)


def run_finetune(cfg: Any, task: str, progress: bool = True) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` for ``task`` on ``data.train``; evaluate on ``data.test``
    (``progress``: progress bars on rank 0; without them, a log line per ``log_every``)."""
    from leanvl.engine import distributed
    from leanvl.engine.checkpoint import input_settings, save_pretrained
    from leanvl.engine.logging import setup_logging
    from leanvl.engine.trainer import Trainer

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    info = distributed.init_distributed(cfg.train.distributed_backend)
    if task in ("retrieval", "mc"):
        return run_pretrain(cfg, evaluate=_evaluator(cfg, task, None, info.device, progress),
                            progress=progress)
    setup_logging(info.rank, cfg.out)
    configure_threads(cfg.data.num_workers, cfg.data.cpu_threads)
    labels = task_labels(cfg, task)
    text = build_text_encoder(cfg.data)
    base = build_model(cfg.model, truncate_vocabulary(cfg, text))
    model = wrap(base, task, labels)
    kind = "qa" if task == "qa" else "classification"
    extra = {"answers": labels} if task == "qa" else {"classes": labels}
    loader = build_train_loader(cfg, text, kind=kind, **extra)
    trainer = Trainer(cfg, model, loader,
                      evaluate=_evaluator(cfg, task, labels, info.device, progress),
                      device=info.device, progress=progress)
    result = trainer.fit()
    if distributed.is_main():
        kwargs, exclude = base.release_config() if hasattr(base, "release_config") else (
            dict(getattr(base, "registry_kwargs", {})), ())
        result["released"] = str(save_pretrained(
            model, Path(cfg.out) / "model", name=base.registry_name, kwargs=kwargs,
            extra={"task": task, "labels": labels, "data": input_settings(cfg.data)},
            exclude_prefixes=tuple(f"model.{p}" for p in exclude)))
    distributed.barrier()
    return result


def run_eval(cfg: Any, task: str, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model.pretrained`` (released weights) on ``data.test`` for ``task``;
    ``model.kwargs`` given here override the stored ones (inference options)."""
    from leanvl.engine import distributed

    if task not in EVAL_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(EVAL_TASKS)}")
    if not cfg.data.test:
        raise ValueError("data.test is not set: give the test annotation file")
    if task == "probe" and not cfg.data.train:
        raise ValueError("the linear probe trains on data.train: give the training annotation "
                         "file (classification records)")
    configure_threads(cfg.data.num_workers, cfg.data.cpu_threads)
    pretrained = Path(cfg.model.pretrained) if cfg.model.pretrained else None
    if pretrained is not None and (pretrained / "config.json").is_file():
        from leanvl.engine.checkpoint import to_plain

        model, trained_task, labels = load_finetuned(pretrained, to_plain(cfg.model.kwargs))
        if task == "probe":  # probing a fine-tuned classifier probes its backbone
            model, labels = getattr(model, "model", model), None
        elif trained_task in ("qa", "classify") and trained_task != task:
            raise ValueError(f"{pretrained} was fine-tuned for {trained_task}, not {task}")
    else:
        model, labels = build_model(cfg.model).eval(), None
    if task == "qa" and labels is None:
        labels = _side_list(cfg.data.test, "answers.json")
    if task == "classify" and labels is None:
        labels = _side_list(cfg.data.test, "classes.json")
    # under torchrun each rank takes its GPU; retrieval splits its work over the ranks
    device = distributed.init_distributed(cfg.train.distributed_backend).device
    if task == "probe":
        return _linear_probe(cfg, model.to(device), device, progress)
    evaluate = _evaluator(cfg, task, labels, device, progress)
    with torch.no_grad():
        return evaluate(model.to(device))


def _linear_probe(cfg: Any, model: nn.Module, device, progress: bool) -> dict[str, Any]:
    """``leanvl eval probe``: frozen features of ``data.train`` / ``data.test`` (evaluation
    transforms for both), one linear layer trained on the training ones."""
    from leanvl.tasks.classify import linear_probe

    data, root = cfg.data, cfg.data.root or None
    classes = task_labels(cfg, "classify")
    train, test = (build_dataset(path, root, data, train=False, kind="classification",
                                 classes=classes) for path in (data.train, data.test))
    return linear_probe(model, train, test, device, batch_size=cfg.eval.batch_size,
                        num_workers=data.num_workers, source=cfg.eval.probe_features,
                        epochs=cfg.eval.probe_epochs, lr=cfg.eval.probe_lr, seed=cfg.seed,
                        progress_bar=progress)
