"""Action classification: a linear probe on frozen features, and full fine-tuning pieces.

Linear probe (E-ViLM's protocol): the frozen backbone's video tokens are mean-pooled once per
clip (``extract_features``), standardised with the training set's statistics, and a linear
layer is trained on them with cross-entropy (``train_linear_probe``), so the backbone runs once
per clip however many probe epochs there are.

Fine-tuning (UMT's classifier): ``VideoClassifier`` = backbone + ``ClassificationHead``
(``fc_norm`` over mean-pooled tokens, dropout, ``head``; the names match UMT's fine-tuned
checkpoints). ``layer_id(name)`` gives each parameter's depth for layer-wise lr decay: 0 for
embeddings, i + 1 for block i, ``num_layers + 1`` for the head.

Evaluation: top-1 / top-5 / mean-per-class accuracy (%), optionally averaging the softmax over
several clips (views) of one video (records sharing a ``video`` path). Under a process group
``evaluate_classification`` and ``extract_features`` are collectives: each rank encodes its
block of the clips and every rank gets all rows.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from leanvl.engine.precision import full_precision
from leanvl.metrics import mean_per_class_accuracy, topk_accuracy
from leanvl.models.base import VideoFeatures
from leanvl.tasks.common import (
    eval_loader,
    evaluating,
    gather_rows,
    has_method,
    progress,
    shard_dataset,
    unwrap_model,
)

_BLOCK = re.compile(r"(?:^|\.)(?:blocks|layers|layer)\.(\d+)\.")
_EMBEDDING_WORDS = ("patch_embed", "pos_embed", "cls_token", "embeddings", "time_embed",
                    "temporal_embed", "mask_token")


def vit_layer_id(name: str, num_layers: int) -> int:
    """Depth of a transformer parameter for layer-wise lr decay: embeddings 0, block i -> i + 1
    (first ``blocks.i`` / ``layers.i`` / ``layer.i`` in the name), everything else (final norm,
    heads) ``num_layers + 1``."""
    if any(word in name for word in _EMBEDDING_WORDS):
        return 0
    found = _BLOCK.search(name)
    if found:
        return min(int(found.group(1)) + 1, num_layers + 1)
    return num_layers + 1


def pool_features(features: VideoFeatures, source: str = "tokens") -> torch.Tensor:
    """B x D clip features: masked mean of the tokens (``tokens``) or the ``embedding``."""
    if source == "embedding":
        return features.embedding
    if source != "tokens":
        raise ValueError(f"feature source must be 'tokens' or 'embedding', got {source!r}")
    tokens = features.tokens
    if features.mask is None:
        return tokens.mean(dim=1)
    weights = features.mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class ClassificationHead(nn.Module):
    """``fc_norm`` (LayerNorm) -> dropout -> ``head`` (Linear), over mean-pooled tokens.

    Takes B x N x D tokens (mean-pooled here, honouring an optional B x N mask) or B x D
    features. ``init_scale`` shrinks the initial head weights (UMT uses 0.001 for fine-tuning).
    """

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.0,
                 init_scale: float = 1.0, norm: bool = True):
        super().__init__()
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        with torch.no_grad():
            self.head.weight.mul_(init_scale)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """B x N x D tokens or B x D features -> B x num_classes logits."""
        if features.dim() == 3:
            features = pool_features(VideoFeatures(features, features[:, 0], mask))
        return self.head(self.dropout(self.fc_norm(features)))


class VideoClassifier(nn.Module):
    """A backbone's video tokens -> ``ClassificationHead``: the fine-tuned action classifier.

    ``losses(batch)`` (also ``pretrain_losses``, the name the engine calls) returns
    ``{"classify": cross-entropy}`` with optional label smoothing.
    """

    #: a task uses part of its backbone (a classifier never runs a stage-2 model's text side)
    ddp_find_unused_parameters = True

    def __init__(self, model: nn.Module, num_classes: int, dim: int | None = None,
                 dropout: float = 0.0, init_scale: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        dim = dim or getattr(model, "video_dim", None) or getattr(model, "embed_dim", None)
        if dim is None:
            raise ValueError("pass dim= (the width of the video tokens) or give the model "
                             "video_dim")
        self.model = model
        self.head = ClassificationHead(int(dim), num_classes, dropout, init_scale)
        self.num_classes, self.label_smoothing = num_classes, label_smoothing

    def classify_logits(self, video: torch.Tensor) -> torch.Tensor:
        """B x T x 3 x H x W clips -> B x num_classes logits."""
        features = self.model.encode_video(video)
        return self.head(features.tokens, features.mask)

    forward = classify_logits

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """``{"classify": cross-entropy}`` for a batch with ``video`` and ``label``."""
        device = next(self.head.parameters()).device
        logits = self(batch["video"].to(device))
        return {"classify": F.cross_entropy(logits.float(), batch["label"].to(device),
                                            label_smoothing=self.label_smoothing)}

    pretrain_losses = losses

    @property
    def num_layers(self) -> int:
        """The backbone's depth (``num_layers``, 0 when it does not say)."""
        return int(getattr(self.model, "num_layers", 0))

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay depth; the head is the last layer."""
        if name.startswith("model."):
            inner = name[len("model."):]
            if has_method(self.model, "layer_id"):
                return int(self.model.layer_id(inner))
            return vit_layer_id(inner, self.num_layers)
        return self.num_layers + 1


def extract_features(model, dataset, device: torch.device | str = "cpu", batch_size: int = 32,
                     num_workers: int = 0, source: str = "tokens", progress_bar: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen pooled features (N x D, float32, CPU) and labels (N) of a classification dataset.
    Under a process group each rank encodes its block and every rank gets all rows."""
    from leanvl.data.datasets import Collator

    features, labels = [], []
    part, _ = shard_dataset(dataset)
    with evaluating(model):
        for batch in progress(eval_loader(part, Collator(None), batch_size, num_workers),
                              "extract features", enabled=progress_bar):
            feats = model.encode_video(batch["video"].to(device))
            features.append(pool_features(feats, source).float().cpu())
            labels.append(batch["label"])
    count = len(dataset)
    return gather_rows(torch.cat(features), count), gather_rows(torch.cat(labels), count)


class LinearProbe(nn.Module):
    """Standardise features with fixed training statistics, then one linear layer."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """N x D features -> N x num_classes logits."""
        return self.linear((features - self.mean) / self.std)


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                       epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4,
                       batch_size: int = 256, seed: int = 0) -> LinearProbe:
    """Fit a ``LinearProbe`` on precomputed features with AdamW and cross-entropy, in float32
    also inside an autocast region (whose bf16 logits would tie)."""
    features = features.float()
    labels = labels.long()
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
    generator = torch.Generator().manual_seed(seed)
    probe = LinearProbe(features.shape[1], num_classes)
    probe.mean.copy_(features.mean(dim=0))
    probe.std.copy_(features.std(dim=0, unbiased=False).clamp(min=1e-6))
    nn.init.zeros_(probe.linear.weight)
    nn.init.zeros_(probe.linear.bias)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs * -(-len(features) // batch_size)))
    probe.train()
    with full_precision(features.device):
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=generator)
            for start in range(0, len(features), batch_size):
                rows = order[start:start + batch_size]
                loss = F.cross_entropy(probe(features[rows]), labels[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return probe.eval()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``top1``, ``top5`` and ``mean_class_accuracy`` (%), pessimistic ties."""
    top = topk_accuracy(logits, labels, ks=(1, 5))
    return {"top1": top[1], "top5": top[5],
            "mean_class_accuracy": mean_per_class_accuracy(logits, labels)}


def _average_views(logits: torch.Tensor, labels: torch.Tensor, keys: list[Any]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax over rows sharing a key (several clips of one video)."""
    groups: dict[Any, list[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    probs = logits.float().softmax(dim=1)
    merged = torch.stack([probs[rows].mean(dim=0) for rows in groups.values()])
    merged_labels = []
    for key, rows in groups.items():
        if len({int(labels[r]) for r in rows}) != 1:
            raise ValueError(f"views of {key!r} carry different labels")
        merged_labels.append(int(labels[rows[0]]))
    return merged, torch.tensor(merged_labels)


def evaluate_classification(model, dataset, device: torch.device | str = "cpu",
                            batch_size: int = 32, num_workers: int = 0,
                            group_by: str | None = None, progress_bar: bool = True,
                            return_predictions: bool = False) -> dict[str, Any]:
    """Top-1/top-5/mean-class accuracy of ``model.classify_logits`` over a classification
    dataset; ``group_by="video"`` averages the softmax over records of the same video. With
    ``return_predictions``, ``predictions`` (top-1 class per item, or per video when grouped)
    and the matching ``targets``."""
    model = unwrap_model(model)
    from leanvl.data.datasets import Collator

    if not has_method(model, "classify_logits"):
        raise TypeError(f"{type(model).__name__} has no classify_logits; wrap it in "
                        "VideoClassifier")
    begin = time.perf_counter()
    outputs, labels, indices = [], [], []
    part, _ = shard_dataset(dataset)  # under a process group, each rank classifies its block
    with evaluating(model):
        for batch in progress(eval_loader(part, Collator(None), batch_size, num_workers),
                              "classify", enabled=progress_bar):
            outputs.append(model.classify_logits(batch["video"].to(device)).float().cpu())
            labels.append(batch["label"])
            indices.append(batch["index"])
    count = len(dataset)
    logits, truth = gather_rows(torch.cat(outputs), count), gather_rows(torch.cat(labels), count)
    if group_by is not None:
        keys = [dataset.records[int(i)][group_by] for i in gather_rows(torch.cat(indices), count)]
        logits, truth = _average_views(logits, truth, keys)
    results: dict[str, Any] = classification_metrics(logits, truth)
    results.update(num_items=int(len(truth)), seconds=time.perf_counter() - begin)
    if return_predictions:
        results.update(predictions=logits.argmax(1).tolist(), targets=truth.tolist())
    return results


def linear_probe(model, train_dataset, test_dataset, device: torch.device | str = "cpu",
                 batch_size: int = 32, num_workers: int = 0, source: str = "tokens",
                 epochs: int = 100, lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0,
                 progress_bar: bool = True, return_predictions: bool = False) -> dict[str, Any]:
    """E-ViLM's linear-probe protocol end to end: frozen features, linear head, test metrics.
    With ``return_predictions``, the probe's top-1 class per test item (``predictions``) and the
    labels (``targets``)."""
    model = unwrap_model(model)
    begin = time.perf_counter()
    train_x, train_y = extract_features(model, train_dataset, device, batch_size, num_workers,
                                        source, progress_bar)
    test_x, test_y = extract_features(model, test_dataset, device, batch_size, num_workers,
                                      source, progress_bar)
    num_classes = len(getattr(train_dataset, "classes", [])) or int(train_y.max()) + 1
    probe = train_linear_probe(train_x, train_y, num_classes, epochs, lr, weight_decay,
                               seed=seed)
    with torch.no_grad(), full_precision(test_x.device):
        test_logits = probe(test_x)
        results: dict[str, Any] = classification_metrics(test_logits, test_y)
        results["train_top1"] = classification_metrics(probe(train_x), train_y)["top1"]
    results.update(num_train=len(train_y), num_test=len(test_y),
                   seconds=time.perf_counter() - begin)
    if return_predictions:
        results.update(predictions=test_logits.argmax(1).tolist(), targets=test_y.tolist())
    return results
