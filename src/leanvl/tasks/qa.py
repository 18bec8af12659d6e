"""Video question answering, two ways (``EvalConfig.qa_mode``).

``classify`` (E-ViLM, Perceiver-VL): a classifier over a fixed answer vocabulary reads the
fused [CLS] of (video, question). ``VideoQAClassifier`` wraps a backbone with a ``QAHead``; it
needs the optional contract method ``model.fused_cls(video_feats, text_feats) -> B x D`` (the
cross-encoder's [CLS] output, the vector the VTM head reads) and the width ``model.fused_dim``
(or pass ``dim``). A model with its own ``qa_logits(video_feats, text_feats) -> B x A`` is used
as is. Training loss: cross-entropy, ignoring answers outside the vocabulary (index -1); in
evaluation those items count as wrong, as in the benchmarks.

``rank`` (UMT, SMAUG): rank a fixed answer list per question. A model with
``answer_scores(video_feats, question_feats, answer_ids, answer_mask) -> B x A`` (e.g. an
answer decoder's log-likelihoods; higher = better) is used directly. Otherwise each candidate is
scored by the cross-encoder, ``model.match(video, "question answer")``, after keeping the
``cfg_eval.rerank_k`` answers closest to the video by ``model.similarity`` (answer text alone,
encoded once). Limitation: VTM was trained to judge captions, not question-answer pairs, so
this is a zero-shot stand-in until a model is fine-tuned that way; an autoregressive answer
decoder like UMT's (generating and scoring answer tokens) is a follow-up.

Under a process group ``evaluate_qa`` is a collective: each rank answers its block of the
questions, the answer list is encoded once, split over the ranks (``retrieval.encode_texts``),
and every rank returns the metrics of all questions.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from leanvl.metrics import accuracy, predicted_classes
from leanvl.models.base import TextFeatures, VideoFeatures
from leanvl.tasks.common import (
    batches,
    eval_loader,
    evaluating,
    float32_similarity,
    gather_rows,
    has_method,
    progress,
    shard_dataset,
    unwrap_model,
)


def answer_vocabulary(records: Iterable[dict], size: int = 1500) -> list[str]:
    """The ``size`` most frequent answers of (training) QA records, most frequent first."""
    counts = Counter(str(r["answer"]) for r in records)
    return [answer for answer, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0]))[:size]]


class QAHead(nn.Module):
    """Answer classifier over a fused [CLS]: Linear -> GELU -> LayerNorm -> Linear (VQA style)."""

    def __init__(self, dim: int, num_answers: int, hidden: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        hidden = hidden or 2 * dim
        self.dense = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_answers)

    def forward(self, fused_cls: torch.Tensor) -> torch.Tensor:
        """B x D -> B x num_answers logits."""
        return self.classifier(self.dropout(self.norm(F.gelu(self.dense(fused_cls)))))


def qa_loss(logits: torch.Tensor, answer_index: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the answer vocabulary, ignoring index -1 (0 when all are ignored)."""
    answer_index = answer_index.to(logits.device)
    if (answer_index >= 0).sum() == 0:
        return logits.sum() * 0.0  # keeps the graph (DDP) without a NaN
    return F.cross_entropy(logits.float(), answer_index, ignore_index=-1)


class VideoQAClassifier(nn.Module):
    """A backbone plus a ``QAHead`` on ``backbone.fused_cls``: the trainable QA model.

    ``losses(batch)`` (also exposed as ``pretrain_losses``, the name the engine calls) returns
    ``{"qa": loss}``; ``layer_id(name)`` gives depths for layer-wise lr decay.
    """

    #: a task uses part of its backbone (QA never runs the VTC projections or the VTM head)
    ddp_find_unused_parameters = True

    def __init__(self, model: nn.Module, num_answers: int, dim: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        if not has_method(model, "fused_cls"):
            raise TypeError(f"{type(model).__name__} has no fused_cls(video_feats, text_feats); "
                            "QA classification needs the fused [CLS] of (video, question)")
        dim = dim or getattr(model, "fused_dim", None)
        if dim is None:
            raise ValueError("pass dim= (the width of fused_cls) or give the model fused_dim")
        self.model = model
        self.head = QAHead(int(dim), num_answers, dropout=dropout)
        self.num_answers = num_answers

    def qa_logits(self, video_feats: VideoFeatures, text_feats: TextFeatures) -> torch.Tensor:
        """B x num_answers answer logits."""
        return self.head(self.model.fused_cls(video_feats, text_feats))

    def encode_video(self, video: torch.Tensor) -> VideoFeatures:
        """The backbone's video features."""
        return self.model.encode_video(video)

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        """The backbone's text features."""
        return self.model.encode_text(text_ids, text_mask)

    def forward(self, video: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
                ) -> torch.Tensor:
        """Answer logits for a batch of clips and tokenised questions."""
        return self.qa_logits(self.encode_video(video), self.encode_text(text_ids, text_mask))

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """``{"qa": cross-entropy}`` for a QA batch (``video``, ``text_ids``, ``text_mask``,
        ``answer_index``)."""
        device = next(self.head.parameters()).device
        logits = self(batch["video"].to(device), batch["text_ids"].to(device),
                      batch["text_mask"].to(device))
        return {"qa": qa_loss(logits, batch["answer_index"])}

    pretrain_losses = losses

    @property
    def num_layers(self) -> int:
        """The backbone's depth (``num_layers``, 0 when it does not say)."""
        return int(getattr(self.model, "num_layers", 0))

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay depth: the backbone's ``layer_id``; the head is the last layer."""
        if name.startswith("model.") and has_method(self.model, "layer_id"):
            return int(self.model.layer_id(name[len("model."):]))
        if name.startswith("model."):
            from leanvl.tasks.classify import vit_layer_id

            return vit_layer_id(name[len("model."):], self.num_layers)
        return self.num_layers + 1


#: ``EvalConfig.qa_mode`` values; ``auto`` classifies with an answer head and ranks without one
QA_MODES = ("auto", "classify", "rank")


def _answer_list(dataset, answers: Sequence[str] | None) -> list[str] | None:
    if answers is not None:
        return list(answers)
    index = getattr(getattr(dataset, "builder", None), "answer_index", None)
    return list(index) if index else None


def _classify_batch(model, video_feats, text_feats) -> torch.Tensor:
    if not has_method(model, "qa_logits"):
        raise TypeError(f"{type(model).__name__} has no answer head (qa_logits) for "
                        "qa_mode=classify: fine-tune it for QA (`leanvl finetune qa`, or wrap it "
                        "in VideoQAClassifier), or use qa_mode=rank")
    return model.qa_logits(video_feats, text_feats).float()


def rank_answers(model, video_feats: VideoFeatures, question_feats: TextFeatures,
                 questions: Sequence[str], answers: Sequence[str], text_encoder,
                 answer_feats: TextFeatures | None = None, top_k: int = 128,
                 device: torch.device | str = "cpu", batch_size: int = 32) -> torch.Tensor:
    """B x A answer scores (higher = better; -inf for answers dropped by the pre-filter)."""
    if has_method(model, "answer_scores"):
        tokens = text_encoder(list(answers))
        return model.answer_scores(video_feats, question_feats, tokens["text_ids"].to(device),
                                   tokens["text_mask"].to(device)).float()
    if not has_method(model, "match"):
        raise TypeError(f"{type(model).__name__} can neither score answers (answer_scores) nor "
                        "match (video, text) pairs: use qa_mode=classify for a model with an "
                        "answer head")
    size, num_answers = len(questions), len(answers)
    if top_k and 0 < top_k < num_answers:
        if answer_feats is None:
            raise ValueError("pre-filtering needs the encoded answers (answer_feats)")
        candidates = float32_similarity(model, video_feats, answer_feats).topk(top_k, 1).indices
    else:
        candidates = torch.arange(num_answers, device=video_feats.embedding.device).repeat(
            size, 1)
    k = candidates.shape[1]
    owners = torch.arange(size).repeat_interleave(k)
    flat = candidates.reshape(-1).cpu()
    logits = torch.empty(size * k)
    for rows in batches(len(flat), batch_size):
        texts = [f"{questions[int(q)]} {answers[int(a)]}" for q, a in
                 zip(owners[rows], flat[rows])]
        tokens = text_encoder(texts)
        pair_text = model.encode_text(tokens["text_ids"].to(device),
                                      tokens["text_mask"].to(device))
        logits[rows] = model.match(video_feats.index(owners[rows].to(
            video_feats.embedding.device)), pair_text).float().cpu()
    scores = torch.full((size, num_answers), float("-inf"))
    return scores.scatter_(1, candidates.cpu(), logits.view(size, k))


def evaluate_qa(model, dataset, text_encoder, cfg_eval=None, device: torch.device | str = "cpu",
                batch_size: int | None = None, num_workers: int = 0,
                answers: Sequence[str] | None = None, mode: str | None = None,
                progress_bar: bool = True, return_predictions: bool = False) -> dict[str, Any]:
    """QA accuracy (%) over a ``VideoQADataset``, by answer classification or answer ranking.

    ``answers`` is the answer vocabulary / candidate list (default: the dataset's ``answers``).
    Keys: ``accuracy``, ``num_items``, ``num_out_of_vocabulary`` (answers not in the list,
    always wrong), ``mode``, ``seconds``; with ``return_predictions`` the predicted strings.
    """
    model = unwrap_model(model)
    from leanvl.data.datasets import Collator

    if cfg_eval is None:
        from leanvl.config import EvalConfig

        cfg_eval = EvalConfig()
    mode = mode or cfg_eval.qa_mode
    if mode not in QA_MODES:
        raise ValueError(f"qa_mode must be one of {', '.join(QA_MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "classify" if has_method(model, "qa_logits") else "rank"
    answer_list = _answer_list(dataset, answers)
    if answer_list is None:
        raise ValueError("no answer list: pass answers= or build the dataset with answers=")
    lookup = {a: i for i, a in enumerate(answer_list)}
    batch_size = batch_size or cfg_eval.batch_size
    begin = time.perf_counter()
    part, _ = shard_dataset(dataset)  # under a process group, each rank answers its block
    loader = eval_loader(part, Collator(text_encoder), batch_size, num_workers)
    choices, targets, best = [], [], []
    with evaluating(model):
        answer_feats = None
        if mode == "rank" and not has_method(model, "answer_scores") and \
                0 < cfg_eval.rerank_k < len(answer_list):
            from leanvl.tasks.retrieval import encode_texts

            answer_feats = encode_texts(model, answer_list, text_encoder, device, batch_size,
                                        progress_bar=False)
        for batch in progress(loader, f"video QA ({mode})", enabled=progress_bar):
            video_feats = model.encode_video(batch["video"].to(device))
            text_feats = model.encode_text(batch["text_ids"].to(device),
                                           batch["text_mask"].to(device))
            if mode == "classify":
                scores = _classify_batch(model, video_feats, text_feats)
            else:
                scores = rank_answers(model, video_feats, text_feats, batch["question"],
                                      answer_list, text_encoder, answer_feats,
                                      cfg_eval.rerank_k, device, batch_size)
            if scores.shape[1] != len(answer_list):
                raise ValueError(f"{scores.shape[1]} answer scores for {len(answer_list)} answers")
            truth = torch.tensor([lookup.get(str(a), -1) for a in batch["answer"]])
            scores = scores.cpu()
            # the scored choice (a true answer tied for the top counts as wrong, as in
            # leanvl.metrics) and the plain argmax; ranks exchange these, not the N x A scores
            choices.append(predicted_classes(scores, truth))
            best.append(scores.argmax(dim=1))
            targets.append(truth)
    count = len(dataset)
    truth = gather_rows(torch.cat(targets), count)
    results: dict[str, Any] = {
        "accuracy": accuracy(gather_rows(torch.cat(choices), count), truth),
        "num_items": int(len(truth)),
        "num_out_of_vocabulary": int((truth < 0).sum()),
        "mode": mode,
        "seconds": time.perf_counter() - begin,
    }
    if return_predictions:
        results["predictions"] = [answer_list[int(i)] for i in gather_rows(torch.cat(best), count)]
    return results
