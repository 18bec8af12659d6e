"""Video multiple choice (MSRVTT-MC style): score each (video, option) pair, pick the argmax.

Score of option o for a video (``w`` = ``cfg_eval.mc_vtm_weight``)::

    w * sigmoid(match(video, o)) + (1 - w) * softmax_over_options(similarity(video, .))[o]

``model.match`` returns one "match" logit per pair; it is read as the log-odds of match vs no
match, so ``sigmoid`` equals the 2-way softmax over {match, no match} that UMT's code takes from
its 2-logit VTM head. ``similarity`` already divides by the model's temperature (UMT's
``sim / temp``). UMT's code uses w = 0.7; w = 1 scores by VTM alone (similarity is then not
computed), w = 0 by the dual encoder alone (``match`` is not called).

Records carrying a ``kind`` key (the synthetic benchmark's ``temporal`` / ``static``) also get
per-kind accuracy. An item whose correct option ties another for the best score counts as
wrong (the pessimistic tie rule of ``leanvl.metrics``). Under a process group ``evaluate_mc``
is a collective: each rank scores its block of the items and every rank returns the metrics
of all of them.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from leanvl.metrics import topk_ranks
from leanvl.models.base import TextFeatures, VideoFeatures
from leanvl.tasks.common import (
    eval_loader,
    evaluating,
    float32_similarity,
    gather_rows,
    progress,
    shard_dataset,
    unwrap_model,
)


def option_scores(model, video_feats: VideoFeatures, option_feats: TextFeatures,
                  num_options: int, vtm_weight: float,
                  option_count: torch.Tensor | None = None) -> torch.Tensor:
    """B x O scores for B videos and their B*O options (option-major within each video).
    ``option_count`` (B) marks the options past each item's count as padding: they get -inf
    and no share of the dual part's softmax."""
    batch = int(video_feats.embedding.shape[0])
    if int(option_feats.embedding.shape[0]) != batch * num_options:
        raise ValueError(f"{option_feats.embedding.shape[0]} option features for {batch} videos "
                         f"x {num_options} options")
    scores = torch.zeros(batch, num_options, device=video_feats.embedding.device)
    padding = None if option_count is None else \
        torch.arange(num_options, device=scores.device) >= option_count.to(scores.device)[:, None]
    if vtm_weight > 0:
        owner = torch.arange(batch, device=video_feats.embedding.device).repeat_interleave(
            num_options)
        logits = model.match(video_feats.index(owner), option_feats)
        scores = scores + vtm_weight * torch.sigmoid(logits.float()).view(batch, num_options)
    if vtm_weight < 1:
        sim = float32_similarity(model, video_feats, option_feats)  # B x (B*O)
        rows = torch.arange(batch, device=sim.device)
        own = sim.view(batch, batch, num_options)[rows, rows]
        if padding is not None:
            own = own.masked_fill(padding, float("-inf"))
        scores = scores + (1 - vtm_weight) * own.softmax(dim=1)
    return scores if padding is None else scores.masked_fill(padding, float("-inf"))


def evaluate_mc(model, dataset, text_encoder, cfg_eval=None, device: torch.device | str = "cpu",
                batch_size: int | None = None, num_workers: int = 0, progress_bar: bool = True,
                return_predictions: bool = False) -> dict[str, Any]:
    """Multiple-choice accuracy (%) of ``model`` over a ``MultipleChoiceDataset``.

    Keys: ``accuracy``, ``num_items``, ``seconds`` and, when records have a ``kind``,
    ``accuracy/<kind>`` and ``num_items/<kind>``. With ``return_predictions``, ``predictions``
    (chosen option per item) and ``scores`` (items x options).
    """
    model = unwrap_model(model)
    from leanvl.data.datasets import Collator

    if cfg_eval is None:
        from leanvl.config import EvalConfig

        cfg_eval = EvalConfig()
    weight = float(cfg_eval.mc_vtm_weight)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"mc_vtm_weight must be in [0, 1], got {weight}")
    begin = time.perf_counter()
    part, _ = shard_dataset(dataset)  # under a process group, each rank scores its block
    loader = eval_loader(part, Collator(text_encoder), batch_size or cfg_eval.batch_size,
                         num_workers)
    indices, predictions, hits, all_scores, option_counts = [], [], [], [], []
    with evaluating(model):
        for batch in progress(loader, "multiple choice", enabled=progress_bar):
            ids, mask = batch["option_ids"], batch["option_mask"]
            size, num_options, length = ids.shape
            video_feats = model.encode_video(batch["video"].to(device))
            option_feats = model.encode_text(ids.view(-1, length).to(device),
                                             mask.view(-1, length).to(device))
            counts = batch["option_count"]
            scores = option_scores(model, video_feats, option_feats, num_options, weight,
                                   counts).cpu()
            all_scores.append(scores)
            predictions.append(scores.argmax(dim=1))
            # pessimistic ties (leanvl.metrics): a correct option tied for the top is a miss
            hits.append(topk_ranks(scores, batch["answer"]) == 1)
            indices.append(batch["index"])
            option_counts.append(counts)
    count = len(dataset)
    correct = gather_rows(torch.cat(hits), count)
    predicted = gather_rows(torch.cat(predictions), count)
    index = gather_rows(torch.cat(indices), count)
    results: dict[str, Any] = {"accuracy": float(correct.double().mean() * 100),
                               "num_items": int(len(correct))}
    kinds = [dataset.records[int(i)].get("kind") for i in index]
    for kind in sorted({k for k in kinds if k is not None}, key=str):
        chosen = torch.tensor([k == kind for k in kinds])
        results[f"accuracy/{kind}"] = float(correct[chosen].double().mean() * 100)
        results[f"num_items/{kind}"] = int(chosen.sum())
    results["seconds"] = time.perf_counter() - begin
    if return_predictions:
        results["predictions"] = predicted.tolist()
        # items may have different option counts; keep per-item rows of their own length
        options = gather_rows(torch.cat(option_counts), count)
        width = max(s.shape[1] for s in all_scores)
        padded = torch.cat([F.pad(s, (0, width - s.shape[1])) for s in all_scores])
        scores = gather_rows(padded, count, pad_dim1=True)
        results["scores"] = [row[:int(n)].tolist() for row, n in zip(scores, options, strict=True)]
    return results
