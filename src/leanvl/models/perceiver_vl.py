"""Perceiver-VL: iterative latent cross-attention for video and text (papers/perceiver-vl.txt).

Input array: video patch tokens and text tokens, each the sum of a modality embedding, a temporal
embedding (video frames only; an image is a one-frame video and gets none), a learned position
embedding (2-D patch index / token index) and the patch / token embedding.

Encoder (``nn/perceiver.py``): a latent array of N vectors (+ learned positions) attends to the
input array through ``num_blocks`` cross-attentions, each followed by ``self_per_block``
self-attentions over the latents; LayerDrop skips cross-attentions after the first in training.

Decoder: one cross-attention block from a query array to the encoded latents, then heads.
The VTM query is a learned [CLS]; MLM queries are position + mask-indicator embeddings only (the
decoder never sees token identities, so the latents must carry them). Tasks concatenate their
queries and decode in one pass.

Retrieval architectures (``stream``):

- ``single``: video and text are encoded jointly, then decoded. ``similarity`` is the multi-stream
  dot product (a cheap pre-filter) and ``match`` runs the joint encoder on each pair, so the
  retrieval task re-ranks the top ``rerank_k``; ``rerank_k`` >= the number of videos scores every
  pair the single-stream way.
- ``multi``: separate encodings; the score is the dot product of their pooled projections (VTC).
- ``mixed``: separate encodings, cached; the decoder runs over the concatenated latents (plus a
  learned stream embedding telling video latents from text latents). ``similarity`` scores
  every pair exactly that way, without re-running the decoder's attention per pair: the [CLS]
  query is the same for every pair, so the softmax over the concatenated keys splits into a
  per-video and a per-text partial sum (log-sum-exp), each computed once per item
  (``DecoderCache``). Only the decoder's MLP and the head run per pair.

Modality aggregation (``aggregation``): ``joint`` (default), ``separate``, ``separate_plus``; see
``nn/perceiver.py``. Layouts: ``paper`` (k=3 blocks of 1 cross-attention + 3 self-attentions) and
``official`` (the authors' code and the ViT-initialised variant: 12 self-attention layers with a
cross-attention before layers 1, 5 and 9, i.e. k=3, l=4).

Initialisation from a ViT-B/32 or CLIP ViT checkpoint in timm naming (``init=PATH``): patch
embedding, 2-D position table (resampled to the grid, [CLS] row dropped), self-attention blocks
and final norm load; cross-attentions, latents, text embeddings, decoder and heads start
from scratch. ``freeze_pretrained=True`` is the first stage of the paper's two-stage schedule
(train only what was not loaded); the second stage continues from its weights with everything
trainable.

``variant="official"`` is the authors' model (zinengtang/Perceiver_VL), the one their released
checkpoint needs (``leanvl convert perceiver-vl``): a [CLS] token per frame, BERT's text
embedding (word + position + token type, LayerNorm), cross-attentions whose residual is
``norm1(x)``, one shared norm over the input array and none on the decoder's context, a pooled
two-class VTM head (the match logit is class 1) and BERT's MLM head; latents without position,
single stream by default. docs/perceiver_vl.md compares it point by point with the default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanvl.engine.precision import full_precision
from leanvl.losses import mlm_loss, ranking_loss, vtc_loss
from leanvl.models.base import TextFeatures, VideoFeatures, VideoLanguageModel
from leanvl.models.registry import register_model
from leanvl.nn.attention import QuickGELU
from leanvl.nn.perceiver import (
    AGGREGATIONS,
    CrossAttentionBlock,
    LatentArray,
    PerceiverEncoder,
    concat_inputs,
)
from leanvl.nn.text import mask_tokens, model_specials
from leanvl.nn.vit import Block, init_vit_weights

log = logging.getLogger(__name__)

STREAMS = ("single", "multi", "mixed")
#: ``leanvl``: the paper's design with leanvl's choices; ``official``: the authors' code (see
#: ``OfficialMatchingHead``, ``OfficialMLMHead`` and docs/perceiver_vl.md)
VARIANTS = ("leanvl", "official")
LOSSES = ("vtm", "mlm", "vtc", "rank")
LAYOUTS = {"paper": (3, 3), "official": (3, 4)}  # (blocks k, self-attentions per block l)
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}
#: losses each stream trains by default (the paper pre-trains VTM + MLM; multi-stream is a
#: dual encoder and needs a contrastive loss to be usable)
DEFAULT_LOSSES = {"single": ("vtm", "mlm"), "mixed": ("vtm", "mlm"), "multi": ("vtc", "mlm")}
#: how VTM's swapped videos are drawn: uniformly, by VTC similarity (UMT's mining), or half each
VTM_NEGATIVES = ("random", "hard", "mixed")
VIDEO, TEXT = 0, 1  # modality / stream embedding rows


@dataclass
class PerceiverVideoFeatures(VideoFeatures):
    """``tokens``: the video's own latents (B x N x D); ``inputs``/``input_mask``: its input
    array, kept only in single-stream mode (the joint encoder needs it per pair)."""

    inputs: torch.Tensor | None = None
    input_mask: torch.Tensor | None = None


@dataclass
class PerceiverTextFeatures(TextFeatures):
    """``tokens``/``mask``: the text's input array (B x L x D); ``latents``: its own encoding."""

    latents: torch.Tensor | None = None


class VideoTextEmbedding(nn.Module):
    """The input array: patch / token + position + temporal (video) + modality embeddings.

    ``patch_embed.proj`` (Conv2d) and ``video_pos`` follow timm's ViT (``pos_embed`` without its
    [CLS] row), so ViT weights load; the table is resampled when the frame grid differs.
    """

    def __init__(self, dim: int, patch_size: int, image_size: int, max_frames: int,
                 vocab_size: int, max_text_len: int, variant: str = "leanvl") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.official = variant == "official"
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size "
                             f"{patch_size}")
        self.dim, self.patch_size, self.grid = dim, patch_size, image_size // patch_size
        self.max_frames, self.max_text_len = max_frames, max_text_len
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch_size, patch_size)
        self.video_pos = nn.Parameter(torch.empty(1, self.grid ** 2, dim))
        self.temporal_embed = nn.Parameter(torch.empty(max_frames, dim))
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.text_pos = nn.Parameter(torch.empty(max_text_len, dim))
        if self.official:
            # the authors' input array: a [CLS] per frame (its position row folded in), no
            # modality embedding for video, BERT's embedding sum and LayerNorm for text
            self.frame_cls = nn.Parameter(torch.empty(1, dim))
            self.text_type = nn.Parameter(torch.empty(dim))
            self.text_norm = nn.LayerNorm(dim, eps=1e-12)
            nn.init.trunc_normal_(self.frame_cls, std=0.02)
            nn.init.normal_(self.text_type, std=0.02)
        else:
            self.modality_embed = nn.Embedding(2, dim)
        for table in (self.video_pos, self.temporal_embed, self.text_pos):
            nn.init.trunc_normal_(table, std=0.02)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        if not self.official:
            nn.init.trunc_normal_(self.modality_embed.weight, std=0.02)
        self._resampled: dict[tuple[int, int], torch.Tensor] = {}

    def position(self, height: int, width: int) -> torch.Tensor:
        """1 x (height*width) x D patch positions; bicubic resampling for another grid."""
        if (height, width) == (self.grid, self.grid):
            return self.video_pos
        table = self.video_pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table.float(), size=(height, width), mode="bicubic",
                              align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, height * width, -1).to(self.video_pos.dtype)

    def video(self, video: torch.Tensor, frame_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """B x T x 3 x H x W (or B x 3 x H x W) -> (B x T*P x D tokens, B x T*P mask or None);
        official variant: P + 1 tokens per frame (its [CLS] first)."""
        is_image = video.dim() == 4
        if is_image:
            video = video.unsqueeze(1)
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be B x T x 3 x H x W, got shape {tuple(video.shape)}")
        batch, frames, _, height, width = video.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"frames of {height}x{width} do not tile into {self.patch_size}-pixel "
                             "patches")
        if frames > self.max_frames:
            raise ValueError(f"{frames} frames exceed the model's temporal embedding "
                             f"({self.max_frames} frames, max_frames=)")
        x = self.patch_embed.proj(video.flatten(0, 1))  # B*T x D x h x w
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2).reshape(batch, frames, grid_h * grid_w, self.dim)
        x = x + self.position(grid_h, grid_w).unsqueeze(1)
        if self.official:
            x = torch.cat([self.frame_cls.expand(batch, frames, 1, -1), x], dim=2)
            if not is_image:  # the authors' code: every frame of a video, none for an image
                x = x + self.temporal_embed[:frames, None, :]
        else:
            if frames > 1:  # images (one-frame videos) get no temporal embedding
                x = x + self.temporal_embed[:frames, None, :]
            x = x + self.modality_embed.weight[VIDEO]
        per_frame = x.shape[2]
        mask = None
        if frame_mask is not None:
            if frame_mask.shape != (batch, frames):
                raise ValueError(f"frame mask must be B x T = ({batch}, {frames}), got "
                                 f"{tuple(frame_mask.shape)}")
            mask = frame_mask.bool().repeat_interleave(per_frame, dim=1)
        return x.reshape(batch, frames * per_frame, self.dim), mask

    def text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """B x L ids -> B x L x D tokens."""
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(f"text ids and mask must both be B x L, got {tuple(ids.shape)} and "
                             f"{tuple(mask.shape)}")
        if ids.shape[1] > self.max_text_len:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds max_text_len="
                             f"{self.max_text_len} (set data.max_text_len)")
        tokens = self.token_embed(ids) + self.text_pos[: ids.shape[1]]
        if self.official:
            return self.text_norm(tokens + self.text_type)
        return tokens + self.modality_embed.weight[TEXT]

    def no_weight_decay(self) -> set[str]:
        """Position and temporal tables (and the official per-frame [CLS]) are not decayed."""
        return {"video_pos", "temporal_embed", "text_pos"} | ({"frame_cls"} if self.official
                                                               else set())


class OfficialMatchingHead(nn.Module):
    """The authors' VTM head: ``fc(tanh(dense(cls)))`` over two classes; returns the match
    class's logit (index 1) as ... x 1, the shape of the default ``nn.Linear(dim, 1)`` head."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 2)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        """... x D -> ... x 1 match logits."""
        return self.fc(torch.tanh(self.dense(cls)))[..., 1:]


class OfficialMLMHead(nn.Module):
    """The authors' MLM head (BERT's): dense -> GELU -> LayerNorm (eps 1e-12), then an untied
    decoder without bias plus a separate bias."""

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(dim, dim)
        self.transform.norm = nn.LayerNorm(dim, eps=1e-12)
        self.decoder = nn.Linear(dim, vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """... x D -> ... x vocabulary logits."""
        x = self.transform.norm(F.gelu(self.transform.dense(x)))
        return self.decoder(x) + self.bias


@dataclass
class DecoderCache:
    """One side of the mixed-stream decoder's [CLS] attention, reduced per item and head:
    ``peak`` (max logit), ``total`` (sum of exp(logit - peak)) and ``values`` (the
    exp-weighted sum of value vectors)."""

    peak: torch.Tensor  # B x H
    total: torch.Tensor  # B x H
    values: torch.Tensor  # B x H x d


class PerceiverVL(VideoLanguageModel):
    """Perceiver-VL with single-, multi- and mixed-stream scoring (see the module docstring)."""

    def __init__(self, dim: int = 768, num_heads: int = 12, mlp_dim: int | None = None,
                 num_latents: int = 128, num_blocks: int = 3, self_per_block: int = 3,
                 patch_size: int = 32, image_size: int = 384, max_frames: int = 32,
                 vocab_size: int = 30522, max_text_len: int = 40, aggregation: str = "joint",
                 stream: str | None = None, layer_drop: float = 0.5,
                 num_cross_layers: int | None = None, losses: Sequence[str] | None = None,
                 mlm_ratio: float = 0.15, vtm_swap_prob: float = 0.5, embed_dim: int = 256,
                 temperature: float = 0.07, latent_resize: str = "new", init: str = "",
                 freeze_pretrained: bool = False, act: str = "gelu", norm_eps: float = 1e-6,
                 drop_path: float = 0.0, latent_init_std: float | None = None, seed: int = 0,
                 special_ids: dict[str, int] | None = None, pair_chunk: int = 65536,
                 text_vocab_ids: Sequence[int] | None = None, variant: str = "leanvl",
                 text_embed_init: str = "", vtm_negatives: str = "random") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        official = variant == "official"
        self.variant = variant
        # defaults that differ by variant: the authors score single-stream only and draw
        # their latents from N(0, 1)
        stream = stream or ("single" if official else "mixed")
        if latent_init_std is None:
            latent_init_std = 1.0 if official else 0.02
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {STREAMS}, got {stream!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {tuple(ACTIVATIONS)}, got {act!r}")
        if latent_resize not in ("new", "interpolate"):
            raise ValueError(f"latent_resize must be 'new' or 'interpolate', got "
                             f"{latent_resize!r}")
        if vtm_negatives not in VTM_NEGATIVES:
            raise ValueError(f"vtm_negatives must be one of {VTM_NEGATIVES}, got "
                             f"{vtm_negatives!r}")
        self.losses = tuple(losses) if losses else DEFAULT_LOSSES[stream]
        if vtm_negatives != "random" and not {"vtc", "vtm"} <= set(self.losses):
            raise ValueError(f"vtm_negatives={vtm_negatives!r} draws VTM negatives by VTC "
                             "similarity: train with losses including vtc and vtm")
        self.vtm_negatives = vtm_negatives
        bad = set(self.losses) - set(LOSSES)
        if bad:
            raise ValueError(f"unknown losses {sorted(bad)}; choose from {LOSSES}")
        if "rank" in self.losses and stream != "mixed":
            raise ValueError("losses=rank ranks the batch's pairs by their mixed-stream decoder "
                             f"scores: it needs stream='mixed', got {stream!r}")
        self.stream, self.aggregation = stream, aggregation
        self.num_cross_layers = num_cross_layers
        self.mlm_ratio, self.vtm_swap_prob = float(mlm_ratio), float(vtm_swap_prob)
        # E-ViLM's vocabulary truncation (data.vocab_keep_fraction): the token table and the
        # tied MLM head have a row per kept id (the text side starts from scratch)
        self.text_vocab_ids = [int(i) for i in text_vocab_ids] if text_vocab_ids else None
        if self.text_vocab_ids:
            vocab_size = len(self.text_vocab_ids)
        self.specials = model_specials(self.text_vocab_ids, special_ids)
        self.dim, self.num_heads, self.embed_dim = dim, num_heads, embed_dim
        self.vocab_size, self.pair_chunk = vocab_size, int(pair_chunk)
        act_layer = ACTIVATIONS[act]

        self.embed = VideoTextEmbedding(dim, patch_size, image_size, max_frames, vocab_size,
                                        max_text_len, variant)
        self.latents = LatentArray(num_latents, dim, latent_init_std, position=not official)
        self.latents.resize = latent_resize
        self.encoder = PerceiverEncoder(dim, num_heads, num_blocks, self_per_block, mlp_dim,
                                        aggregation, layer_drop, seed, drop_path, norm_eps,
                                        act_layer=act_layer, shared_context_norm=official,
                                        cross_residual_from_norm=official)
        # decoder: one cross-attention block from the query array to the latents
        self.query_cls = nn.Parameter(torch.empty(1, dim))
        self.query_pos = nn.Parameter(torch.empty(max_text_len, dim))
        self.query_mask_embed = nn.Embedding(2, dim)
        # the authors' single-stream model has no stream embedding, projections or temperature
        self.has_dual_parts = not official or stream != "single" or "vtc" in self.losses
        if self.has_dual_parts:
            self.stream_embed = nn.Embedding(2, dim)
        # the official decoder reads the latents as the encoder's final norm leaves them
        self.decoder = CrossAttentionBlock(dim, num_heads, mlp_dim=mlp_dim, norm_eps=norm_eps,
                                           act_layer=act_layer, residual_from_norm=official,
                                           context_norm=not official)
        self.decoder_norm = nn.LayerNorm(dim, eps=norm_eps)
        if official:
            self.vtm_head = OfficialMatchingHead(dim)
            self.mlm_head = OfficialMLMHead(dim, vocab_size)
        else:
            self.vtm_head = nn.Linear(dim, 1)
            self.mlm_head = nn.Linear(dim, vocab_size)
            # tied: a linear head, no new matrix
            self.mlm_head.weight = self.embed.token_embed.weight
        self.video_proj = self.text_proj = None
        if self.has_dual_parts:
            self.video_proj = nn.Linear(dim, embed_dim)
            self.text_proj = nn.Linear(dim, embed_dim)
            self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())
        for table in (self.query_cls, self.query_pos):
            nn.init.trunc_normal_(table, std=0.02)
        for module in (self.query_mask_embed, getattr(self, "stream_embed", None)):
            if module is not None:
                nn.init.trunc_normal_(module.weight, std=0.02)
        self.apply(init_vit_weights)  # the tied MLM head re-initialises the token embedding
        nn.init.zeros_(self.mlm_head.bias)
        if official:
            nn.init.normal_(self.latents.latents, std=latent_init_std)
        if text_embed_init:
            self.init_token_table(text_embed_init)
        self.fused_dim = self.video_dim = dim
        self.frozen_prefixes: tuple[str, ...] = ()
        if init:
            loaded = self.load_vit(init)
            if freeze_pretrained:
                self.frozen_prefixes = loaded
        elif freeze_pretrained:
            raise ValueError("freeze_pretrained=True needs init= (the ViT weights to freeze)")

    # ---- DDP / engine hints ---------------------------------------------------------------
    @property
    def ddp_find_unused_parameters(self) -> bool:
        """Always: LayerDrop skips cross-attentions, and every stream / loss choice leaves some
        parts idle (the projections without VTC, the decoder in multi-stream, the stream
        embedding in single-stream, ...)."""
        return True

    @property
    def temperature(self) -> torch.Tensor:
        """Learnable VTC temperature (multi-stream), clamped to [0.001, 0.5]."""
        return self.log_temperature.exp().clamp(0.001, 0.5)

    @property
    def needs_rerank(self) -> bool:
        """Only a single-stream model trained with VTC re-ranks (its dual encoder is the
        pre-filter): a single-stream ``similarity`` without VTC scores every pair jointly,
        mixed-stream ``similarity`` already is the decoder's VTM score of every pair, and
        multi-stream ``match`` equals ``similarity``."""
        return self.stream == "single" and "vtc" in self.losses

    @property
    def similarity_is_dot_product(self) -> bool:
        """Multi-stream, and single-stream trained with VTC, score with the dual encoder's dot
        product; mixed-stream scores with its decoder and single without VTC jointly."""
        return self.stream == "multi" or (self.stream == "single" and "vtc" in self.losses)

    # ---- encoding -------------------------------------------------------------------------
    def encode_inputs(self, inputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]]
                      ) -> torch.Tensor:
        """Latents B x N x D of one input array (video and/or text parts)."""
        batch = next(iter(inputs.values()))[0].shape[0]
        return self.encoder(self.latents(batch), inputs, self.num_cross_layers)

    def encode_video(self, video: torch.Tensor,
                     frame_mask: torch.Tensor | None = None) -> PerceiverVideoFeatures:
        """The video's own latents and pooled embedding (+ its input array in single-stream)."""
        inputs, mask = self.embed.video(video, frame_mask)
        latents = self.encode_inputs({"video": (inputs, mask)})
        embedding = self.pooled_embedding(latents, self.video_proj)
        keep = self.stream == "single"
        return PerceiverVideoFeatures(tokens=latents, embedding=embedding,
                                      inputs=inputs if keep else None,
                                      input_mask=mask if keep else None)

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor
                    ) -> PerceiverTextFeatures:
        """The text's input array (tokens), its own latents and pooled embedding."""
        inputs = self.embed.text(text_ids, text_mask)
        latents = self.encode_inputs({"text": (inputs, text_mask)})
        embedding = self.pooled_embedding(latents, self.text_proj)
        return PerceiverTextFeatures(tokens=inputs, mask=text_mask, embedding=embedding,
                                     latents=latents)

    @staticmethod
    def pooled_embedding(latents: torch.Tensor, projection: nn.Linear | None) -> torch.Tensor:
        """The dual-encoder embedding of an encoding: its mean latent, projected, normalised
        (not projected in a model without projections: the official single-stream one)."""
        pooled = latents.mean(dim=1)
        return F.normalize(pooled if projection is None else projection(pooled), dim=-1)

    def joint_latents(self, video: PerceiverVideoFeatures, text: PerceiverTextFeatures
                      ) -> torch.Tensor:
        """Single-stream: latents of the joint (video + text) input array of row-aligned pairs."""
        if video.inputs is None:
            raise RuntimeError("single-stream scoring needs the video input array: encode the "
                               "videos with stream='single'")
        return self.encode_inputs({"video": (video.inputs, video.input_mask),
                                   "text": (text.tokens, text.mask)})

    def mixed_context(self, video_latents: torch.Tensor, text_latents: torch.Tensor
                      ) -> torch.Tensor:
        """Mixed-stream decoder context: [video latents + e_V; text latents + e_T]."""
        return torch.cat([video_latents + self.stream_embed.weight[VIDEO],
                          text_latents + self.stream_embed.weight[TEXT]], dim=1)

    def _context(self, video: PerceiverVideoFeatures, text: PerceiverTextFeatures
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.stream == "single":
            return self.joint_latents(video, text), None
        return self.mixed_context(video.tokens, text.latents), None

    # ---- decoding -------------------------------------------------------------------------
    def mlm_queries(self, text_mask: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """B x L MLM queries: position + mask-indicator embeddings (no token identities)."""
        length = text_mask.shape[1]
        return self.query_pos[:length] + self.query_mask_embed(predicted.long())

    def decode(self, context: torch.Tensor, queries: torch.Tensor,
               context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder over ``context`` (B x N' x D) for ``queries`` (B x Q x D or Q x D)."""
        if queries.dim() == 2:  # a copy, not an expanded view of a parameter
            queries = queries.unsqueeze(0).repeat(context.shape[0], 1, 1)
        return self.decoder_norm(self.decoder(queries, context, context_mask))

    def fused_cls(self, video: PerceiverVideoFeatures, text: PerceiverTextFeatures
                  ) -> torch.Tensor:
        """The decoder's [CLS] output for row-aligned (video, text) pairs: B x D."""
        context, mask = self._context(video, text)
        return self.decode(context, self.query_cls, mask)[:, 0]

    def forward_joint(self, video: torch.Tensor, text_ids: torch.Tensor,
                      text_mask: torch.Tensor) -> torch.Tensor:
        """Single-stream VTM logits of row-aligned raw pairs: joint encoding, [CLS] decoding."""
        inputs, mask = self.embed.video(video)
        latents = self.encode_inputs({"video": (inputs, mask),
                                      "text": (self.embed.text(text_ids, text_mask), text_mask)})
        return self.vtm_logits(self.decode(latents, self.query_cls)[:, 0])

    def vtm_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """The VTM head on decoded [CLS] vectors (... x D -> ...), in float32 also under
        autocast: in bf16, the nearby scores of multiple-choice options and of re-ranked
        candidates tie, and ties count as misses."""
        with full_precision(cls.device):
            return self.vtm_head(cls.float()).squeeze(-1)

    def match(self, video: PerceiverVideoFeatures, text: PerceiverTextFeatures) -> torch.Tensor:
        """VTM logit per row-aligned pair (the dual-encoder score in multi-stream)."""
        if self.stream == "multi":
            return (video.embedding * text.embedding).sum(-1) / self.temperature
        return self.vtm_logits(self.fused_cls(video, text))

    def decoder_cache(self, latents: torch.Tensor, side: int) -> DecoderCache:
        """Per-item partial softmax of the [CLS] query over one side's decoder keys (float32,
        also under autocast: the parts are summed and divided across items)."""
        with full_precision(latents.device):
            return self._decoder_cache(latents.float(), side)

    def _decoder_cache(self, latents: torch.Tensor, side: int) -> DecoderCache:
        attn = self.decoder.attn
        context = self.decoder.norm_context(latents + self.stream_embed.weight[side])
        query = attn.q(self.decoder.norm1(self.query_cls))  # 1 x D
        heads, head_dim = attn.num_heads, attn.head_dim
        keys, values = attn.kv(context).reshape(*context.shape[:2], 2, heads, head_dim).unbind(2)
        logits = torch.einsum("bnhd,hd->bhn", keys.float(),
                              query.float().view(heads, head_dim)) * head_dim ** -0.5
        peak = logits.amax(dim=-1)
        weights = (logits - peak[..., None]).exp()
        return DecoderCache(peak, weights.sum(dim=-1),
                            torch.einsum("bhn,bnhd->bhd", weights, values.float()))

    def mixed_scores(self, video: DecoderCache, text: DecoderCache) -> torch.Tensor:
        """VTM logits of every (video, text) pair from the two sides' caches: B_v x B_t."""
        with full_precision(video.peak.device):
            return self._mixed_scores(video, text)

    def _mixed_scores(self, video: DecoderCache, text: DecoderCache) -> torch.Tensor:
        peak = torch.maximum(video.peak[:, None], text.peak[None])  # Bv x Bt x H
        scale_v = (video.peak[:, None] - peak).exp()
        scale_t = (text.peak[None] - peak).exp()
        total = scale_v * video.total[:, None] + scale_t * text.total[None]
        mixed = (scale_v[..., None] * video.values[:, None]
                 + scale_t[..., None] * text.values[None]) / total[..., None]
        attn = self.decoder.attn
        out = attn.proj(mixed.flatten(2))  # Bv x Bt x D
        cls = self.decoder.mlp_part(self.decoder.residual_input(self.query_cls) + out)
        return self.vtm_logits(self.decoder_norm(cls))

    def similarity(self, video: PerceiverVideoFeatures, text: PerceiverTextFeatures
                   ) -> torch.Tensor:
        """B_v x B_t scores: mixed-stream VTM logits of every pair (mixed); the dual encoder's
        dot product over temperature (multi, and single's pre-filter when it was trained with
        VTC); otherwise (single without VTC, whose projections never trained) the joint
        encoder on every pair, as the paper scores single-stream retrieval."""
        if self.stream == "single" and "vtc" not in self.losses:
            return self.joint_scores(video, text)
        if self.stream != "mixed":
            return super().similarity(video, text)
        text_cache = self.decoder_cache(text.latents, TEXT)
        rows = max(1, self.pair_chunk // max(1, text.latents.shape[0]))
        parts = []
        for start in range(0, video.tokens.shape[0], rows):
            cache = self.decoder_cache(video.tokens[start:start + rows], VIDEO)
            parts.append(self.mixed_scores(cache, text_cache))
        return torch.cat(parts)

    def joint_scores(self, video: PerceiverVideoFeatures, text: PerceiverTextFeatures,
                     pairs_per_pass: int = 512) -> torch.Tensor:
        """Single-stream VTM logits of every (video, text) pair: B_v x B_t, the joint encoder
        run on ``pairs_per_pass`` pairs at a time (each pair holds its whole input array)."""
        num_videos, num_texts = video.embedding.shape[0], text.embedding.shape[0]
        scores = torch.empty(num_videos * num_texts, device=video.embedding.device)
        for start in range(0, num_videos * num_texts, pairs_per_pass):
            pair = torch.arange(start, min(start + pairs_per_pass, num_videos * num_texts))
            scores[pair] = self.match(
                video.index(pair.div(num_texts, rounding_mode="floor").to(video.embedding.device)),
                text.index((pair % num_texts).to(text.embedding.device))).float()
        return scores.view(num_videos, num_texts)

    # ---- pre-training ---------------------------------------------------------------------
    def pretrain_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """VTM (visual input swapped with p=``vtm_swap_prob``), MLM through the query decoder
        and, when configured, VTC and the decoder's ranking loss: ``{vtm, mlm[, vtc][, rank]}``
        by ``self.losses``."""
        if self.stream == "multi" and "vtm" in self.losses:
            raise ValueError("a multi-stream model has no cross-encoder to train with VTM; use "
                             "losses=[vtc, mlm] or stream=mixed")
        video, ids, text_mask = batch["video"], batch["text_ids"], batch["text_mask"]
        size = ids.shape[0]
        device = ids.device
        swap = torch.zeros(size, dtype=torch.bool, device=device)
        source = torch.arange(size, device=device)
        if "vtm" in self.losses and size > 1:
            swap = torch.rand(size, device=device) < self.vtm_swap_prob
            shift = torch.randint(1, size, (size,), device=device)
            source = torch.where(swap, (source + shift) % size, source)
        labels = torch.full_like(ids, -100)
        text_ids = ids
        if "mlm" in self.losses:
            special = [self.specials[k] for k in ("pad", "cls", "sep", "mask", "unk")]
            text_ids, labels = mask_tokens(ids, text_mask, self.vocab_size,
                                           self.specials["mask"], special, self.mlm_ratio)
        predicted = labels != -100
        video_inputs, video_mask = self.embed.video(video, batch.get("frame_mask"))
        text_inputs = self.embed.text(text_ids, text_mask)
        losses: dict[str, torch.Tensor] = {}
        video_latents = text_latents = clean_text = None
        if self.stream != "single":
            video_latents = self.encode_inputs({"video": (video_inputs, video_mask)})
            text_latents = self.encode_inputs({"text": (text_inputs, text_mask)})
        if "vtc" in self.losses or "rank" in self.losses:
            # VTC and the ranking score the clean captions that retrieval will encode, not the
            # masked ones
            clean_text = text_latents
            if clean_text is None or "mlm" in self.losses:
                clean_text = self.encode_inputs({"text": (self.embed.text(ids, text_mask),
                                                          text_mask)})
        if "rank" in self.losses:
            # every (video, caption) pair of the batch through the mixed-stream decoder, from
            # the two sides' caches as retrieval scores them, but under the training's autocast:
            # the B x B pairs' MLP is the costly part, and retrieval's float32 (near ties across
            # 1,000s of items) buys nothing in a loss
            scores = self._mixed_scores(self._decoder_cache(video_latents, VIDEO),
                                        self._decoder_cache(clean_text, TEXT))
            losses["rank"] = ranking_loss(scores, batch.get("index"))
        if "vtc" in self.losses:
            vtc_video = video_latents if video_latents is not None else self.encode_inputs(
                {"video": (video_inputs, video_mask)})  # single: the pre-filter's encodings
            vtc_text = clean_text
            video_embedding = self.pooled_embedding(vtc_video, self.video_proj)
            text_embedding = self.pooled_embedding(vtc_text, self.text_proj)
            losses["vtc"] = vtc_loss(video_embedding, text_embedding, self.temperature,
                                     ids=batch.get("index"))
            hard = swap if self.vtm_negatives != "mixed" else \
                swap & (torch.rand(size, device=swap.device) < 0.5)  # half of them, at random
            if self.vtm_negatives != "random" and hard.any():
                source = self._hard_sources(hard, source, video_embedding, text_embedding,
                                            batch.get("index"))
        if self.stream == "single":
            context = self.encode_inputs({
                "video": (video_inputs[source], None if video_mask is None else
                          video_mask[source]),
                "text": (text_inputs, text_mask)})
        elif self.stream == "mixed":
            context = self.mixed_context(video_latents[source], text_latents)
        else:  # multi: MLM reads the text's own latents
            context = text_latents + self.stream_embed.weight[TEXT]
        want_vtm, want_mlm = "vtm" in self.losses, "mlm" in self.losses
        if not (want_vtm or want_mlm):
            return losses
        queries = [self.query_cls.expand(size, -1, -1)] if want_vtm else []
        if want_mlm:
            queries.append(self.mlm_queries(text_mask, predicted))
        out = self.decode(context, torch.cat(queries, dim=1))
        if want_vtm:
            logits = self.vtm_head(out[:, 0]).squeeze(-1)
            losses["vtm"] = F.binary_cross_entropy_with_logits(logits.float(),
                                                               (~swap).float())
            out = out[:, 1:]
        if want_mlm:
            # a caption is predicted from its own video only
            keep = predicted & ~swap[:, None]
            losses["mlm"] = mlm_loss(self.mlm_head(out[keep]), labels[keep])
        return losses

    def _hard_sources(self, swap: torch.Tensor, source: torch.Tensor,
                      video_embedding: torch.Tensor, text_embedding: torch.Tensor,
                      ids: torch.Tensor | None) -> torch.Tensor:
        """The swapped samples' videos drawn from softmax(VTC similarity / temperature) of their
        caption over the batch's other videos (UMT's mining) instead of uniformly; a batch in
        which some sample has no other video keeps the uniform draw."""
        from leanvl.losses import sample_hard_negatives

        if ids is not None and (ids.view(-1, 1) == ids.view(1, -1)).all(dim=1).any():
            return source
        similarity = (video_embedding @ text_embedding.t()).detach() / self.temperature.detach()
        _, negative_video = sample_hard_negatives(similarity, ids)
        return torch.where(swap, negative_video, source)

    # ---- weights --------------------------------------------------------------------------
    def load_vit(self, path: str | Path) -> tuple[str, ...]:
        """Load a timm-named ViT / CLIP-ViT checkpoint into the shared parts; returns the
        prefixes of what was loaded (frozen in the first stage of two-stage training)."""
        from leanvl.models.checkpoints import (
            CheckpointError,
            load_checkpoint_file,
            unwrap_state_dict,
        )

        state = unwrap_state_dict(load_checkpoint_file(path))
        if "pos_embed" not in state or not any(k.startswith("blocks.") for k in state):
            raise CheckpointError(f"{path}: not a timm ViT state dict (no pos_embed / blocks.*); "
                                  "OpenAI-named CLIP weights: convert them to timm naming first")
        own = self.state_dict()
        mapped: dict[str, torch.Tensor] = {}
        depth = len(self.encoder.self_layers)
        blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
        if len(blocks) < depth:
            raise CheckpointError(f"{path} has {len(blocks)} blocks; this model has {depth} "
                                  "self-attention layers")
        for key, value in state.items():
            target = None
            if key.startswith("blocks."):
                index, rest = key.split(".", 2)[1:]
                if int(index) < depth:
                    target = f"encoder.self_layers.{index}.{rest}"
            elif key.startswith("patch_embed.proj."):
                target = "embed." + key
            elif key.startswith("norm.") and f"encoder.{key}" in own:
                target = f"encoder.{key}"
            elif key == "pos_embed":
                target, value = "embed.video_pos", self._vit_positions(value)
            if target is None:
                continue
            if target not in own or own[target].shape != value.shape:
                shape = tuple(own[target].shape) if target in own else None
                raise CheckpointError(f"{path}: {key} {tuple(value.shape)} does not fit "
                                      f"{target} {shape}")
            mapped[target] = value
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        assert not unexpected, unexpected
        skipped = sorted({k.split(".")[0] for k in state} -
                         {"blocks", "patch_embed", "norm", "pos_embed"})
        if len(blocks) > depth:
            skipped.append(f"blocks.{depth}-{blocks[-1]}")
        log.info("Perceiver-VL initialised from %s: %d tensors loaded (self-attention, patch "
                 "embedding, positions, final norm); not used: %s", path, len(mapped),
                 ", ".join(skipped) or "nothing")
        return ("embed.patch_embed.", "embed.video_pos", "encoder.self_layers.",
                "encoder.norm.")

    def init_token_table(self, source: str) -> None:
        """Start the token table (and the MLM head tied to it) from the word embeddings of a
        local BERT folder or ``minilm``: the kept vocabulary's rows, PCA-reduced to the model
        width, at the scratch table's scale (std 0.02) so that positions keep their weight."""
        from leanvl.models.base import text_model_path
        from leanvl.nn.text import pretrained_word_embeddings

        table = pretrained_word_embeddings(text_model_path(source), self.dim, self.text_vocab_ids)
        weight = self.embed.token_embed.weight
        if table.shape != weight.shape:
            raise ValueError(f"text_embed_init={source!r} gives a {tuple(table.shape)} table; the "
                             f"model's token table is {tuple(weight.shape)} (vocab_size)")
        with torch.no_grad():
            weight.copy_(table * (0.02 / table.std()))
        log.info("Perceiver-VL token table initialised from %s (%d rows)", source, len(table))

    def _vit_positions(self, table: torch.Tensor) -> torch.Tensor:
        """timm's pos_embed (1 x [1 +] G^2 x D) -> this grid, without the [CLS] row."""
        table = table.reshape(-1, table.shape[-1])
        side = math.isqrt(table.shape[0])
        if side * side != table.shape[0]:
            table = table[1:]
            side = math.isqrt(table.shape[0])
        grid = self.embed.grid
        if side != grid:
            table = F.interpolate(table.t().reshape(1, -1, side, side).float(), size=(grid, grid),
                                  mode="bicubic", align_corners=False)
            table = table.reshape(-1, grid * grid).t()
        return table.reshape(1, grid * grid, -1).to(self.embed.video_pos.dtype)

    def release_config(self) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Released weights hold everything (loaded ViT parts and token table included), so the
        initialisation options are dropped from the kwargs."""
        kwargs = dict(getattr(self, "registry_kwargs", {}))
        kwargs.pop("init", None)
        kwargs.pop("freeze_pretrained", None)
        kwargs.pop("text_embed_init", None)
        return kwargs, ()

    def no_weight_decay(self) -> set[str]:
        """Latents, queries, embeddings tables and the temperature are not decayed."""
        return {"log_temperature", "latents", "query_cls", "query_pos", "query_mask_embed",
                "stream_embed"}

    @property
    def num_layers(self) -> int:
        """Self-attention depth, for layer-wise lr decay."""
        return len(self.encoder.self_layers)

    def layer_id(self, name: str) -> int:
        """0 for the input embeddings, latents and the official variant's shared input norm,
        i + 1 for self-attention layer i (a block's cross-attention shares the depth of the
        self-attention it precedes), top otherwise."""
        if name.startswith(("embed.", "latents.", "encoder.context_norm.")):
            return 0
        if name.startswith("encoder.self_layers."):
            return int(name.split(".")[2]) + 1
        if name.startswith(("encoder.cross.", "encoder.cross_text.")):
            block = int(name.split(".")[2])
            return block * self.encoder.self_per_block + 1
        return self.num_layers + 1


class JointTransformer(VideoLanguageModel):
    """The ViLT-style baseline of Perceiver-VL's Figure 4: the same input array and blocks, but
    self-attention over all (1 + M) tokens, so the cost is quadratic in M."""

    def __init__(self, dim: int = 768, num_heads: int = 12, mlp_dim: int | None = None,
                 depth: int = 12, patch_size: int = 32, image_size: int = 384,
                 max_frames: int = 32, vocab_size: int = 30522, max_text_len: int = 40,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.embed = VideoTextEmbedding(dim, patch_size, image_size, max_frames, vocab_size,
                                        max_text_len)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_dim, "qkv", 0.0, norm_eps)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.vtm_head = nn.Linear(dim, 1)
        self.video_dim = self.fused_dim = dim

    def _encode(self, parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
        tokens, mask = concat_inputs(parts)
        batch = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        if mask is not None:
            mask = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=mask.device), mask], 1)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def encode_video(self, video: torch.Tensor) -> VideoFeatures:
        """Video-only encoding (tokens after the blocks; embedding: normalised [CLS])."""
        x = self._encode([self.embed.video(video)])
        return VideoFeatures(tokens=x, embedding=F.normalize(x[:, 0], dim=-1))

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        """The text's input array (the joint encoder consumes it per pair)."""
        tokens = self.embed.text(text_ids, text_mask)
        return TextFeatures(tokens, text_mask, F.normalize(tokens.mean(1), dim=-1))

    def forward_joint(self, video: torch.Tensor, text_ids: torch.Tensor,
                      text_mask: torch.Tensor) -> torch.Tensor:
        """VTM logit of row-aligned pairs through joint self-attention over video + text."""
        x = self._encode([self.embed.video(video), (self.embed.text(text_ids, text_mask),
                                                    text_mask)])
        return self.vtm_head(x[:, 0]).squeeze(-1)


# ---- registered models -------------------------------------------------------------------
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"dim": 192, "num_heads": 3, "mlp_dim": 768, "num_latents": 32, "num_blocks": 2,
             "self_per_block": 2, "patch_size": 16, "image_size": 96, "max_frames": 16,
             "max_text_len": 64, "embed_dim": 128},
    "b32": {"dim": 768, "num_heads": 12, "mlp_dim": 3072, "num_latents": 128,
            "patch_size": 32, "image_size": 384, "max_frames": 32, "max_text_len": 40},
}


def _perceiver(size: str, layout: str | None, **kwargs: Any) -> PerceiverVL:
    config = dict(SIZES[size])
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
        config["num_blocks"], config["self_per_block"] = LAYOUTS[layout]
    return PerceiverVL(**{**config, **kwargs})


@register_model("perceiver_vl_b32")
def perceiver_vl_b32(layout: str | None = None, **kwargs: Any) -> PerceiverVL:
    """Perceiver-VL B/32 at 384x384, N=128 latents; ``layout`` paper (k=3, l=3; the default)
    or official (12 self-attentions, cross-attention before layers 1/5/9, as for ViT/CLIP
    initialisation; the default of ``variant="official"``, the authors' model)."""
    if layout is None:
        layout = "official" if kwargs.get("variant") == "official" else "paper"
    return _perceiver("b32", layout, **kwargs)


@register_model("perceiver_vl_tiny")
def perceiver_vl_tiny(layout: str | None = None, **kwargs: Any) -> PerceiverVL:
    """CPU-sized Perceiver-VL: width 192, 32 latents, 2 x (cross + 2 self), 16-pixel patches
    at 96x96."""
    return _perceiver("tiny", layout, **kwargs)


@register_model("vilt_b32")
def vilt_b32(**kwargs: Any) -> JointTransformer:
    """The joint-attention (ViLT-style) baseline at Perceiver-VL B/32's width, 12 layers."""
    config = {k: v for k, v in SIZES["b32"].items()
              if k not in ("num_latents", "embed_dim")}
    return JointTransformer(**{**config, "depth": 12, **kwargs})
