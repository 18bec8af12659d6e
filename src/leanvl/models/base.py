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

Optional, used when present: ``qa_logits(video_feats, text_feats) -> B x num_answers``,
``classify_logits(video) -> B x num_classes``, ``mlm_logits(...)``, ``answer_scores(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VideoFeatures:
    """Video side of the dual encoder: per-token features and a pooled, normalised embedding."""

    tokens: torch.Tensor  # B x N x D (what the cross-encoder attends to)
    embedding: torch.Tensor  # B x E, L2-normalised (contrastive space)
    mask: torch.Tensor | None = None  # B x N, 1 = valid token

    def index(self, rows) -> VideoFeatures:
        """The features of a subset of rows (for re-ranking)."""
        return VideoFeatures(self.tokens[rows], self.embedding[rows],
                             None if self.mask is None else self.mask[rows])


@dataclass
class TextFeatures:
    """Text side: per-token features, the attention mask and a pooled, normalised embedding."""

    tokens: torch.Tensor  # B x L x D
    mask: torch.Tensor  # B x L
    embedding: torch.Tensor  # B x E, L2-normalised

    def index(self, rows) -> TextFeatures:
        """The features of a subset of rows."""
        return TextFeatures(self.tokens[rows], self.mask[rows], self.embedding[rows])


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

    def similarity(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """Dual-encoder scores: cosine similarity over temperature, B_v x B_t."""
        temperature = getattr(self, "temperature", None)
        scale = 1.0 / temperature if temperature is not None else 1.0
        return video.embedding @ text.embedding.t() * scale
