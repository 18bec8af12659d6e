"""Pre-training losses shared by the methods: VTC, VTM (with hard negatives), MLM, UTA, focal.

Conventions: embeddings passed to ``vtc_loss`` are L2-normalised; ``match`` logits are one
number per pair (the log-odds of "match"), so VTM is a binary cross-entropy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` over ranks along dim 0, keeping the gradient of the local slice.

    ``torch.distributed.nn.functional.all_gather`` back-propagates into every rank's input, so
    each rank's loss over the global batch reaches its own features. Single process: ``x``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def _rank_offset(local: int) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() * local
    return 0


def vtc_loss(video_embedding: torch.Tensor, text_embedding: torch.Tensor,
             temperature: torch.Tensor | float, ids: torch.Tensor | None = None,
             negative_text: torch.Tensor | None = None,
             negative_video: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between normalised video and text embeddings, over the global batch.

    ``ids`` (one per pair, e.g. the video index) marks pairs sharing a video as positives too,
    with the target spread evenly over them; without it the diagonal is the only positive.
    ``negative_text`` (N x D, this rank's hard-negative captions, e.g. of time-reversed clips)
    adds N columns that are negatives for every video in the video-to-text direction;
    ``negative_video`` (M x D, this rank's hard-negative clips, e.g. its clips played backwards)
    adds M columns that are negatives for every text in the text-to-video direction.
    """
    all_video = gather_with_grad(video_embedding)
    all_text = gather_with_grad(text_embedding)
    logits_v2t = video_embedding @ all_text.t() / temperature
    logits_t2v = text_embedding @ all_video.t() / temperature
    local = video_embedding.shape[0]
    if ids is None:
        positives = F.one_hot(torch.arange(local, device=video_embedding.device)
                              + _rank_offset(local), all_text.shape[0]).float()
    else:
        all_ids = gather_with_grad(ids)
        positives = (ids.view(-1, 1) == all_ids.view(1, -1)).float()
    target = positives / positives.sum(dim=1, keepdim=True)
    target_t2v = target
    if negative_video is not None and negative_video.shape[0]:
        logits_t2v = torch.cat([logits_t2v, text_embedding @ negative_video.t() / temperature],
                               dim=1)
        target_t2v = F.pad(target, (0, negative_video.shape[0]))
    loss_t2v = soft_cross_entropy(logits_t2v, target_t2v)
    if negative_text is not None and negative_text.shape[0]:
        logits_v2t = torch.cat([logits_v2t, video_embedding @ negative_text.t() / temperature],
                               dim=1)
        target = F.pad(target, (0, negative_text.shape[0]))
    loss_v2t = soft_cross_entropy(logits_v2t, target)
    return (loss_v2t + loss_t2v) / 2


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each row of ``logits`` against a target distribution over its columns,
    averaged over rows."""
    return -(F.log_softmax(logits, dim=1) * target).sum(dim=1).mean()


def ranking_loss(scores: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric cross-entropy over a B x B matrix of a cross-encoder's match logits (row i =
    video i, column j = caption j): each video ranks the batch's captions and each caption the
    batch's videos, as VTC does with dot products. ``ids`` marks pairs sharing a video as
    positives too (target spread evenly over them), as in ``vtc_loss``. Local to the rank: the
    scores of pairs across ranks would need the other ranks' encodings."""
    if ids is None:
        positives = torch.eye(scores.shape[0], device=scores.device)
    else:
        positives = (ids.view(-1, 1) == ids.view(1, -1)).float()
    target = positives / positives.sum(dim=1, keepdim=True)  # symmetric: rows = columns
    return (soft_cross_entropy(scores, target) + soft_cross_entropy(scores.t(), target)) / 2


@torch.no_grad()
def sample_hard_negatives(similarity: torch.Tensor, ids: torch.Tensor | None = None,
                          generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per sample in each direction, drawn from softmax(similarity).

    ``similarity`` is the local B x B video-to-text score matrix (row i = video i). Returns
    (negative text index for each video, negative video index for each text); positives
    (the diagonal, or pairs sharing ``ids``) are never drawn.
    """
    size = similarity.shape[0]
    if size < 2:
        raise ValueError("hard negatives need a batch of at least 2 pairs")
    if ids is None:
        positive = torch.eye(size, dtype=torch.bool, device=similarity.device)
    else:
        positive = ids.view(-1, 1) == ids.view(1, -1)
    if positive.all(dim=1).any():
        raise ValueError("a sample has no negative in its batch (all pairs share its id)")
    scores = similarity.float().masked_fill(positive, float("-inf"))
    weights_v2t = torch.softmax(scores, dim=1)
    weights_t2v = torch.softmax(scores.t(), dim=1)
    # softmax of very peaked scores can underflow to all-zero rows: fall back to uniform
    for weights in (weights_v2t, weights_t2v):
        empty = weights.sum(dim=1) <= 0
        if empty.any():
            weights[empty] = (~positive[empty]).float()
    negative_text = torch.multinomial(weights_v2t, 1, generator=generator).squeeze(1)
    negative_video = torch.multinomial(weights_t2v, 1, generator=generator).squeeze(1)
    return negative_text, negative_video


def vtm_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over matching pairs (label 1) and mined negatives (label 0)."""
    logits = torch.cat([positive_logits.reshape(-1), negative_logits.reshape(-1)])
    labels = torch.cat([torch.ones_like(positive_logits.reshape(-1)),
                        torch.zeros_like(negative_logits.reshape(-1))])
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def hard_negative_vtm_loss(match, video, text, ids: torch.Tensor | None = None,
                           extra_negatives: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """VTM as UMT and SMAUG train it: the B matching pairs, then for each video one text and for
    each text one video drawn by ``sample_hard_negatives`` from the (detached) dual similarity
    ``video.embedding @ text.embedding.T``, plus any ``extra_negatives`` logits the caller scored.

    ``video`` / ``text`` are the contract's feature objects (``embedding``, ``index(rows)``);
    ``match(video, text)`` gives one logit per row-aligned pair.
    """
    similarity = (video.embedding @ text.embedding.t()).detach()
    negative_text, negative_video = sample_hard_negatives(similarity, ids=ids)
    positive = match(video, text)
    negatives = [match(video, text.index(negative_text)),
                 match(video.index(negative_video), text), *extra_negatives]
    return vtm_loss(positive, torch.cat(negatives))


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the masked positions (labels are -100 elsewhere)."""
    if not (labels != -100).any():
        return logits.sum() * 0.0  # keeps the graph (and DDP) intact when nothing is masked
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100)


def uta_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Unmasked token alignment: mean over layers and tokens of ``2 - 2 cos(student, teacher)``.

    Both sides are L2-normalised per token, so this equals the summed squared error of the
    normalised vectors (the MSE of the official code times the feature dimension).
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"UTA needs as many student as teacher layers, got {len(student)} "
                         f"and {len(teacher)}")
    losses = []
    for s, t in zip(student, teacher, strict=True):
        if s.shape != t.shape:
            raise ValueError(f"UTA shapes differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
        cosine = (F.normalize(s.float(), dim=-1) * F.normalize(t.float(), dim=-1)).sum(dim=-1)
        losses.append((2 - 2 * cosine).mean())
    return torch.stack(losses).mean()


def pixel_reconstruction_loss(predicted: torch.Tensor, target: torch.Tensor,
                              scored: torch.Tensor, normalize_target: bool = False) -> torch.Tensor:
    """MAE's MVM: mean squared pixel error per patch, averaged over the ``scored`` patches only.

    ``predicted`` / ``target`` B x P x (p*p*C) (``nn.mae.patchify``), ``scored`` B x P bool
    (True = counts, e.g. the masked patches). ``normalize_target`` standardises each target
    patch by its own mean and variance (MAE's ``norm_pix_loss``).
    """
    if predicted.shape != target.shape or scored.shape != target.shape[:2]:
        raise ValueError(f"shapes differ: predicted {tuple(predicted.shape)}, target "
                         f"{tuple(target.shape)}, scored {tuple(scored.shape)}")
    target = target.float()
    if normalize_target:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = ((predicted.float() - target) ** 2).mean(dim=-1)
    weights = scored.float()
    if not bool(scored.any()):
        return (per_patch * weights).sum()  # zero, graph kept
    return (per_patch * weights).sum() / weights.sum()


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_pos: float = 0.0,
               gamma_neg: float = 1.0) -> torch.Tensor:
    """Multi-label focal loss, mean over classes and samples (E-ViLM's tokenizer, eq. 6).

    With p = sigmoid(logit), a positive class costs ``-(1 - p)^gamma_pos * log p`` and a
    negative one ``-p^gamma_neg * log(1 - p)``: the defaults (0, 1) are E-ViLM's eq. 6, where
    the many easy negatives of a large vocabulary are down-weighted by their own probability
    (the asymmetric form of Ben-Baruch et al.); gamma 0 on both sides is plain binary
    cross-entropy. ``targets`` is 0/1 of ``logits``' shape.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
                         "differ in shape")
    logits, targets = logits.float(), targets.float()
    probability = torch.sigmoid(logits)
    # log p and log(1 - p) from the logits, stable for large |logit|
    positive = -F.logsigmoid(logits) * (1 - probability).pow(gamma_pos)
    negative = -F.logsigmoid(-logits) * probability.pow(gamma_neg)
    return (targets * positive + (1 - targets) * negative).mean()
