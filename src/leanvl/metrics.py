"""Retrieval and classification metrics: recall@k, median/mean rank, accuracy.

All rates are percentages (0-100), as the field reports them.

Tie rule (pessimistic, used everywhere): an item's rank is 1 + the number of *wrong* candidates
scoring greater than *or equal to* it. A correct item tied with wrong ones is ranked after all of
them, so a model that scores everything the same gets the worst rank, never recall 100%. The
same rule gives ``topk_accuracy`` and ``accuracy`` from logits (a tie with the true class at the
top counts as a miss).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _as_owner_tensor(text_to_video: Sequence[int] | torch.Tensor, num_texts: int,
                     num_videos: int, device: torch.device) -> torch.Tensor:
    owners = torch.as_tensor(text_to_video, dtype=torch.long, device=device)
    if owners.shape != (num_texts,):
        raise ValueError(f"text_to_video has {owners.numel()} entries for {num_texts} texts")
    if num_texts and (owners.min() < 0 or owners.max() >= num_videos):
        raise ValueError(f"text_to_video holds video indices outside [0, {num_videos})")
    return owners


def _check_scores(scores: torch.Tensor, name: str) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(f"{name} must be a 2-D score matrix, got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"{name} contains NaN scores")
    return scores if scores.dtype == torch.float64 else scores.float()


def text_to_video_ranks(sim: torch.Tensor, text_to_video: Sequence[int] | torch.Tensor
                        ) -> torch.Tensor:
    """Rank (1-based, pessimistic ties) of each text's video; ``sim`` is texts x videos."""
    sim = _check_scores(sim, "sim")
    owners = _as_owner_tensor(text_to_video, sim.shape[0], sim.shape[1], sim.device)
    correct = sim.gather(1, owners[:, None])
    # every candidate >= the correct score, minus the correct one itself
    return (sim >= correct).sum(dim=1)


def video_to_text_ranks(sim_video_text: torch.Tensor, text_to_video: Sequence[int] | torch.Tensor
                        ) -> torch.Tensor:
    """Rank of each video's first correct text; ``sim_video_text`` is videos x texts.

    With several captions per video the best-scored one counts; other correct captions never
    push it down. Videos without any caption get rank 0 (and are left out of the metrics).
    """
    sim = _check_scores(sim_video_text, "sim_video_text")
    num_videos, num_texts = sim.shape
    owners = _as_owner_tensor(text_to_video, num_texts, num_videos, sim.device)
    ranks = torch.zeros(num_videos, dtype=torch.long, device=sim.device)
    step = max(1, (1 << 24) // max(num_texts, 1))  # bound the boolean scratch memory
    for start in range(0, num_videos, step):
        rows = sim[start:start + step]
        videos = torch.arange(start, start + rows.shape[0], device=sim.device)
        is_correct = owners[None, :] == videos[:, None]
        best = rows.masked_fill(~is_correct, float("-inf")).max(dim=1).values
        wrong_ahead = ((rows >= best[:, None]) & ~is_correct).sum(dim=1)
        has_caption = is_correct.any(dim=1)
        ranks[start:start + rows.shape[0]] = torch.where(has_caption, wrong_ahead + 1, 0)
    return ranks


def rank_summary(ranks: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """R@k (%), median rank and mean rank of 1-based ranks (entries <= 0 are skipped)."""
    ranks = torch.as_tensor(ranks)
    ranks = ranks[ranks > 0].double()
    if ranks.numel() == 0:
        return {**{f"R@{k}": float("nan") for k in ks}, "MdR": float("nan"), "MnR": float("nan")}
    summary = {f"R@{k}": float((ranks <= k).double().mean() * 100) for k in ks}
    summary["MdR"] = float(ranks.quantile(0.5))  # mean of the two middle ranks for even counts
    summary["MnR"] = float(ranks.mean())
    return summary


def retrieval_metrics(sim: torch.Tensor, text_to_video: Sequence[int] | torch.Tensor,
                      sim_video_text: torch.Tensor | None = None,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Text-to-video and video-to-text R@k (%), median rank (MdR) and mean rank (MnR).

    ``sim`` is num_texts x num_videos, ``text_to_video[i]`` the video of text i (several texts
    per video allowed). ``sim_video_text`` (videos x texts) scores the video-to-text direction
    when it differs from ``sim.T`` (e.g. re-ranked separately); default ``sim.T``. Keys:
    ``t2v/R@1`` ... ``v2t/MnR`` and ``mean_recall`` (mean of all R@k, UMT's ``r_mean``).
    """
    sim_video_text = sim.t() if sim_video_text is None else sim_video_text
    if sim_video_text.shape != sim.shape[::-1]:
        raise ValueError(f"sim_video_text {tuple(sim_video_text.shape)} must be the transpose "
                         f"shape of sim {tuple(sim.shape)}")
    metrics: dict[str, float] = {}
    t2v = rank_summary(text_to_video_ranks(sim, text_to_video), ks)
    v2t = rank_summary(video_to_text_ranks(sim_video_text, text_to_video), ks)
    metrics.update({f"t2v/{k}": v for k, v in t2v.items()})
    metrics.update({f"v2t/{k}": v for k, v in v2t.items()})
    recalls = [t2v[f"R@{k}"] for k in ks] + [v2t[f"R@{k}"] for k in ks]
    metrics["mean_recall"] = float(sum(recalls) / len(recalls))
    return metrics


def predicted_classes(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Predicted classes from class indices (1-D) or logits (2-D, pessimistic ties)."""
    outputs = torch.as_tensor(outputs)
    if outputs.dim() == 1:
        return outputs.long()
    if outputs.dim() != 2:
        raise ValueError(f"expected predictions (N) or logits (N x C), got {tuple(outputs.shape)}")
    # argmax, except that a true class tied with another at the top counts as wrong (-1)
    top = outputs.argmax(dim=1)
    valid = (targets >= 0) & (targets < outputs.shape[1])
    safe = targets.clamp(0, outputs.shape[1] - 1)
    first = topk_ranks(outputs, safe) == 1
    lost_tie = valid & ~first & (top == safe)
    return torch.where(valid & first, safe, torch.where(lost_tie, -1, top))


def topk_ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target class under ``logits`` (pessimistic ties)."""
    logits = _check_scores(torch.as_tensor(logits), "logits")
    targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device)
    correct = logits.gather(1, targets.clamp(min=0)[:, None])
    return (logits >= correct).sum(dim=1)


def accuracy(outputs: torch.Tensor, targets: torch.Tensor, ignore_index: int | None = None
             ) -> float:
    """Top-1 accuracy (%) from predicted classes (N) or logits (N x C).

    Targets outside the classes (e.g. -1, an answer not in the vocabulary) count as wrong unless
    ``ignore_index`` names them, in which case those items are left out.
    """
    targets = torch.as_tensor(targets, dtype=torch.long)
    preds = predicted_classes(torch.as_tensor(outputs).cpu(), targets.cpu())
    targets = targets.cpu()
    if preds.shape != targets.shape:
        raise ValueError(f"{preds.numel()} predictions for {targets.numel()} targets")
    keep = torch.ones_like(targets, dtype=torch.bool) if ignore_index is None \
        else targets != ignore_index
    if keep.sum() == 0:
        return float("nan")
    hit = (preds == targets) & (targets >= 0)  # a negative target is never a hit
    return float(hit[keep].double().mean() * 100)


def mean_per_class_accuracy(outputs: torch.Tensor, targets: torch.Tensor,
                            num_classes: int | None = None) -> float:
    """Mean over the classes present in ``targets`` of each class's accuracy (%)."""
    targets = torch.as_tensor(targets, dtype=torch.long).cpu()
    preds = predicted_classes(torch.as_tensor(outputs).cpu(), targets)
    classes = torch.unique(targets[targets >= 0])
    if num_classes is not None:
        classes = classes[classes < num_classes]
    if classes.numel() == 0:
        return float("nan")
    per_class = [(preds[targets == c] == c).double().mean() for c in classes]
    return float(torch.stack(per_class).mean() * 100)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
                  ) -> dict[int, float]:
    """Top-k accuracy (%) for each k (k larger than the number of classes is clipped)."""
    logits = torch.as_tensor(logits).cpu()
    targets = torch.as_tensor(targets, dtype=torch.long).cpu()
    valid = (targets >= 0) & (targets < logits.shape[1])
    ranks = topk_ranks(logits, targets)
    ranks = torch.where(valid, ranks, logits.shape[1] + 1)  # unknown targets never hit
    return {k: float((ranks <= min(k, logits.shape[1])).double().mean() * 100) for k in ks}
