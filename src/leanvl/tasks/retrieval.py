"""Text-video retrieval evaluation with the field's protocol.

1. Encode every video once (``model.encode_video``) and every caption once
   (``model.encode_text``); ``encode_videos`` / ``encode_texts`` are public so other code can
   cache features (e.g. a mixed-stream Perceiver-VL reusing its latents); under a process
   group every rank must call them (see "Distributed" below).
2. Dual-encoder scores ``model.similarity`` for all pairs, computed ``chunk_size`` x
   ``chunk_size`` blocks at a time so memory stays bounded.
3. For each text, the top ``rerank_k`` videos by dual score are re-scored by the cross-encoder
   (``model.rerank_logit`` where the model has one, else ``model.match``); the same for each
   video with its top ``rerank_k`` texts. As in UMT's code the re-ranked score is the raw VTM
   logit. Items outside the top-k keep their dual-encoder
   order *below* every re-scored item (UMT fills them with a constant, which would make their
   ranks one big tie); recall@k for k <= rerank_k is the same either way.

Both the dual-encoder-only metrics (``dual/...``) and the re-ranked ones (``rerank/...``) are
returned; a model whose ``similarity`` is not the dot product of its ``embedding``s (contract:
``similarity_is_dot_product``) also gets ``embed/...``, the ranking by those embeddings alone.
Ranks use the pessimistic tie rule of ``leanvl.metrics``. A model whose ``similarity`` already
is its final score says so with ``needs_rerank = False`` (e.g. a mixed-stream Perceiver-VL,
which scores every pair with its decoder); step 3 is then skipped and the ``dual/`` metrics are
the model's metrics.

Distributed: when torch.distributed is initialised (every rank must call these functions) the
work is split over the ranks: each encodes its contiguous block of the videos and of the texts,
scores its block of the texts against every video, and re-scores its block of the (query,
candidate) pairs; the pieces are all-gathered after each step, so every rank ends with the full
features, scores and metrics, equal to a single process's. Only rank 0 shows progress bars,
which count its own share.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from leanvl.engine.precision import full_precision
from leanvl.metrics import retrieval_metrics
from leanvl.models.base import TextFeatures, VideoFeatures
from leanvl.tasks.common import (
    batches,
    cat_features,
    eval_loader,
    evaluating,
    float32_similarity,
    gather_features,
    gather_rows,
    move_features,
    num_rows,
    progress,
    shard,
    shard_dataset,
    unwrap_model,
)

log = logging.getLogger(__name__)


def _eval_config(cfg_eval: Any):
    if cfg_eval is None:
        from leanvl.config import EvalConfig

        return EvalConfig()
    return cfg_eval


def encode_videos(model, dataset, device: torch.device | str = "cpu", batch_size: int = 32,
                  num_workers: int = 0, feature_device: torch.device | str | None = None,
                  progress_bar: bool = True) -> VideoFeatures:
    """Every clip of ``dataset`` through ``model.encode_video``, in dataset order (each rank of a
    process group encodes its block; every rank gets all of them).

    Features are kept on ``feature_device`` (default: ``device``); pass ``"cpu"`` when all
    video tokens do not fit on the accelerator.
    """
    from leanvl.data.datasets import Collator

    feature_device = device if feature_device is None else feature_device
    part, mine = shard_dataset(dataset)
    loader = eval_loader(part, Collator(None), batch_size, num_workers)
    parts, expected = [], mine.start
    with evaluating(model):
        for batch in progress(loader, "encode videos", enabled=progress_bar):
            index = batch["index"]
            if not torch.equal(index, torch.arange(expected, expected + len(index))):
                raise RuntimeError("video batches arrived out of order (or a sample was "
                                   f"substituted): expected {expected}.., got {index.tolist()}")
            expected += len(index)
            video = batch["video"].to(device, non_blocking=True)
            parts.append(move_features(model.encode_video(video), feature_device))
    return gather_features(cat_features(parts), len(dataset))


def encode_texts(model, texts: Sequence[str], text_encoder, device: torch.device | str = "cpu",
                 batch_size: int = 32, feature_device: torch.device | str | None = None,
                 progress_bar: bool = True) -> TextFeatures:
    """``texts`` tokenised by ``text_encoder`` in batches and encoded by ``model.encode_text``
    (each rank of a process group encodes its block; every rank gets all of them)."""
    if not texts:
        raise ValueError("no texts to encode")
    feature_device = device if feature_device is None else feature_device
    mine = shard(len(texts))
    parts = []
    with evaluating(model):
        for rows in progress(list(batches(mine.stop, batch_size, mine.start)), "encode texts",
                             enabled=progress_bar):
            tokens = text_encoder(list(texts[rows]))
            feats = model.encode_text(tokens["text_ids"].to(device),
                                      tokens["text_mask"].to(device))
            parts.append(move_features(feats, feature_device))
    return gather_features(cat_features(parts), len(texts))


def similarity_matrix(model, video_feats: VideoFeatures, text_feats: TextFeatures,
                      chunk_size: int = 1024, device: torch.device | str | None = None,
                      progress_bar: bool = False) -> torch.Tensor:
    """Dual-encoder scores, texts x videos (float32), ``chunk_size`` x ``chunk_size`` blocks at a
    time; the result lives where the text features do. Each rank of a process group scores its
    block of the texts; every rank gets the whole matrix."""
    num_texts, num_videos = num_rows(text_feats), num_rows(video_feats)
    out_device = text_feats.embedding.device
    mine = shard(num_texts)
    sim = torch.empty(mine.stop - mine.start, num_videos, dtype=torch.float32, device=out_device)
    text_blocks = list(batches(mine.stop, chunk_size, mine.start))
    compute_device = torch.device(device) if device is not None else out_device
    for text_rows in progress(text_blocks, "similarity", enabled=progress_bar):
        # cast once per text block: float32_similarity's own cast is then a no-op for it
        text = move_features(text_feats.index(text_rows), compute_device, torch.float32)
        for video_rows in batches(num_videos, chunk_size):
            block = float32_similarity(model, video_feats.index(video_rows), text,
                                       compute_device)
            expected = (video_rows.stop - video_rows.start, text_rows.stop - text_rows.start)
            if tuple(block.shape) != expected:
                raise ValueError(f"model.similarity returned {tuple(block.shape)}, expected "
                                 f"videos x texts = {expected}")
            sim[text_rows.start - mine.start:text_rows.stop - mine.start, video_rows] = \
                block.t().to(out_device)
    return gather_rows(sim, num_texts)


def rerank(model, query_feats, candidate_feats, scores: torch.Tensor, k: int,
           queries_are_texts: bool, device: torch.device | str | None = None,
           batch_size: int = 32, progress_bar: bool = True, desc: str = "re-rank"
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-score each query's top-``k`` candidates (by ``scores``, queries x candidates) with
    ``model.rerank_logit`` (``model.match`` for models without one). Returns (top-k candidate indices Q x k, their VTM logits Q x k). Each rank
    of a process group scores its block of the pairs; every rank gets all the logits."""
    num_queries, num_candidates = scores.shape
    k = min(int(k), num_candidates)
    top = scores.topk(k, dim=1).indices.cpu()
    query_index = torch.arange(num_queries).repeat_interleave(k)
    candidate_index = top.reshape(-1)
    mine = shard(len(query_index))
    logits = torch.empty(mine.stop - mine.start, dtype=torch.float32)  # this rank's pairs
    score = getattr(model, "rerank_logit", None) or model.match
    with evaluating(model):
        for rows in progress(list(batches(mine.stop, batch_size, mine.start)), desc,
                             enabled=progress_bar):
            query = move_features(query_feats.index(query_index[rows]), device)
            candidate = move_features(candidate_feats.index(candidate_index[rows]), device)
            video, text = (candidate, query) if queries_are_texts else (query, candidate)
            out = score(video, text)
            if out.shape != (rows.stop - rows.start,):
                raise ValueError(f"model.match / rerank_logit must return one logit per pair (shape B), got "
                                 f"{tuple(out.shape)}")
            logits[rows.start - mine.start:rows.stop - mine.start] = out.float().cpu()
    return top, gather_rows(logits, len(query_index)).view(num_queries, k)


def reranked_scores(scores: torch.Tensor, top: torch.Tensor, logits: torch.Tensor
                    ) -> torch.Tensor:
    """Queries x candidates scores: the VTM logit for each query's top-k, and below them the
    remaining candidates in their dual-encoder order (float64, so the shift keeps the order)."""
    scores = scores.detach().double().cpu()
    logits = logits.double()
    in_top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
    final = torch.empty_like(scores)
    if in_top.all():
        return final.scatter_(1, top, logits)
    floor = logits.min(dim=1, keepdim=True).values - 1.0
    rest_max = scores.masked_fill(in_top, float("-inf")).max(dim=1, keepdim=True).values
    final = floor - (rest_max - scores)  # <= floor for every candidate outside the top-k
    return final.scatter_(1, top, logits)


def paragraph_texts(dataset) -> tuple[list[str], list[int]]:
    """One query per video: all of its captions joined by spaces (DiDeMo/ActivityNet style)."""
    texts, owners = dataset.texts()
    joined: dict[int, list[str]] = {}
    for text, owner in zip(texts, owners):
        joined.setdefault(owner, []).append(text.strip())
    videos = sorted(joined)
    return [" ".join(joined[v]) for v in videos], videos


def _has_embeddings(video: VideoFeatures, text: TextFeatures) -> bool:
    v, t = getattr(video, "embedding", None), getattr(text, "embedding", None)
    return v is not None and t is not None and v.dim() == t.dim() == 2 \
        and v.shape[-1] == t.shape[-1]


def retrieval_from_features(model, video_feats: VideoFeatures, text_feats: TextFeatures,
                            text_to_video: Sequence[int], cfg_eval=None,
                            device: torch.device | str = "cpu", batch_size: int | None = None,
                            progress_bar: bool = True, return_scores: bool = False
                            ) -> dict[str, Any]:
    """Steps 2-3 of the protocol on already-encoded features; see the module docstring."""
    cfg_eval = _eval_config(cfg_eval)
    batch_size = batch_size or cfg_eval.batch_size
    start = time.perf_counter()
    sim = similarity_matrix(model, video_feats, text_feats, cfg_eval.chunk_size, device,
                            progress_bar)
    results: dict[str, Any] = {f"dual/{k}": v for k, v in
                               retrieval_metrics(sim, text_to_video).items()}
    results["seconds_similarity"] = time.perf_counter() - start
    scores: dict[str, torch.Tensor] = {"dual": sim.cpu()}
    final = not getattr(model, "needs_rerank", True)
    if final:
        results["rerank_skipped"] = "the model's similarity already is its final score"
    if not getattr(model, "similarity_is_dot_product", True) and _has_embeddings(video_feats,
                                                                              text_feats):
        # a model that scores pairs jointly (e.g. mixed-stream Perceiver-VL) also reports what
        # the dot product of its separate encoders' embeddings alone ranks, in float32 as
        # similarity_matrix scores: under bf16 autocast the cosines would be rounded to steps
        # of 1/256 and the pessimistic tie rule would count the ties as misses
        text_embedding, video_embedding = text_feats.embedding, video_feats.embedding
        with torch.no_grad(), full_precision(text_embedding.device):
            embedded = text_embedding.float() @ video_embedding.float().to(
                text_embedding.device).t()  # T x V
        results.update({f"embed/{k}": v for k, v in
                        retrieval_metrics(embedded.cpu(), text_to_video).items()})
    if cfg_eval.rerank_k and cfg_eval.rerank_k > 0 and not final:
        start = time.perf_counter()
        top, logits = rerank(model, text_feats, video_feats, sim, cfg_eval.rerank_k, True,
                             device, batch_size, progress_bar, "re-rank t2v")
        t2v = reranked_scores(sim, top, logits)
        top, logits = rerank(model, video_feats, text_feats, sim.t(), cfg_eval.rerank_k, False,
                             device, batch_size, progress_bar, "re-rank v2t")
        v2t = reranked_scores(sim.t(), top, logits)
        results.update({f"rerank/{k}": v for k, v in
                        retrieval_metrics(t2v, text_to_video, sim_video_text=v2t).items()})
        results["rerank_k"] = int(cfg_eval.rerank_k)
        results["seconds_rerank"] = time.perf_counter() - start
        scores.update({"rerank_t2v": t2v, "rerank_v2t": v2t})
    if return_scores:
        results["scores"] = scores
    return results


def evaluate_retrieval(model, dataset, text_encoder, cfg_eval=None,
                       device: torch.device | str = "cpu", batch_size: int | None = None,
                       num_workers: int = 0, *, feature_device: torch.device | str | None = None,
                       progress_bar: bool = True, return_scores: bool = False
                       ) -> dict[str, Any]:
    """Dual-encoder and re-ranked retrieval metrics of ``model`` over a ``VideoTextDataset``.

    Keys: ``dual/t2v/R@1`` ... ``dual/v2t/MnR``, ``dual/mean_recall``, the same under
    ``rerank/`` (when ``cfg_eval.rerank_k > 0``), ``num_videos``, ``num_texts``, ``seconds``
    and per-stage ``seconds_*``. R@k are percentages. ``cfg_eval`` is an ``EvalConfig``
    (``rerank_k``, ``chunk_size``, ``paragraph``, ``batch_size``). With ``return_scores`` the
    score matrices come back under ``scores`` (``dual`` texts x videos, ``rerank_t2v`` texts x
    videos, ``rerank_v2t`` videos x texts).
    """
    model = unwrap_model(model)
    cfg_eval = _eval_config(cfg_eval)
    batch_size = batch_size or cfg_eval.batch_size
    begin = time.perf_counter()
    if cfg_eval.paragraph:
        texts, text_to_video = paragraph_texts(dataset)
    else:
        texts, text_to_video = dataset.texts()
    start = time.perf_counter()
    video_feats = encode_videos(model, dataset, device, batch_size, num_workers, feature_device,
                                progress_bar)
    seconds_videos = time.perf_counter() - start
    start = time.perf_counter()
    text_feats = encode_texts(model, texts, text_encoder, device, batch_size, feature_device,
                              progress_bar)
    seconds_texts = time.perf_counter() - start
    if num_rows(video_feats) != len(dataset):
        raise RuntimeError(f"encoded {num_rows(video_feats)} videos for {len(dataset)} records")
    results = retrieval_from_features(model, video_feats, text_feats, text_to_video, cfg_eval,
                                      device, batch_size, progress_bar, return_scores)
    results.update(num_videos=len(dataset), num_texts=len(texts),
                   seconds_encode_videos=seconds_videos, seconds_encode_texts=seconds_texts,
                   seconds=time.perf_counter() - begin)
    if cfg_eval.paragraph:
        results["paragraph"] = True
    return results
