"""SMAUG: sparse masked autoencoding for efficient video-language pre-training (REFERENCE.md,
papers/smaug.txt with its appendix B-C).

Video side: a CLIP-layout ViT (``FrameViT``, OpenAI CLIP's parameter names, so ``leanvl convert
clip-visual`` output loads as its initialisation) runs on each frame's visible patches only:
random masking for one frame, tube masking (the same positions in every frame) for several,
ratio 0.5. EViT sparsification after blocks 4, 7 and 10 keeps the top 80% of the tokens by
[CLS] attention and fuses the rest into one token. With several frames a temporal encoder Q_t
(self-attention over the concatenated frame tokens) follows; with one frame it is skipped.
An MAE decoder predicts the pixels of the masked patches (MVM).

Text side: BERT, first layers text-only, last layers with cross-attention to video (the shared
``BertTextEncoder``). Losses VTC (projected [CLS], 256-d) + VTM (hard negatives) + MLM (15%) +
MVM, weights 1.

Frame selection: a text-guided selector S picks kappa of the K frames for the cross-encoder
(Gumbel straight-through while training, top-kappa at inference). It acts wherever a (video,
text) pair meets the cross-encoder (``match``, ``fused_cls``, VTM and MLM in pre-training),
never in the dual-encoder path (``encode_video`` / ``similarity``), which stays text-agnostic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanvl.config import CLIP_MEAN, CLIP_STD
from leanvl.engine.precision import full_precision
from leanvl.losses import (
    hard_negative_vtm_loss,
    mlm_loss,
    pixel_reconstruction_loss,
    vtc_loss,
)
from leanvl.masking import random_mask, tube_mask
from leanvl.models.base import TextFeatures, VideoFeatures, VideoLanguageModel, text_model_path
from leanvl.models.checkpoints import (
    convert_clip_visual,
    load_checkpoint_file,
    load_state_dict_strict,
)
from leanvl.models.registry import register_model
from leanvl.models.teachers import CLIP_SIZES, CLIPVisionTeacher
from leanvl.nn.mae import MAEDecoder, patchify
from leanvl.nn.text import (
    TEXT_SIZES,
    BertTextEncoder,
    build_fusion_text_encoder,
    mask_tokens,
    model_specials,
)
from leanvl.nn.vit import Block
from leanvl.sparsify import CLS_POSITION, TextGuidedFrameSelector, keep_and_fuse, select_rows


class FrameViT(CLIPVisionTeacher):
    """CLIP's ViT image tower, trainable, run per frame on visible patches with EViT stages.

    Parameter names are OpenAI CLIP's (``conv1``, ``class_embedding``, ``positional_embedding``,
    ``ln_pre``, ``transformer.resblocks.N``, ``ln_post``, ``proj``), so CLIP visual weights
    (``leanvl convert clip-visual`` output, or timm names through ``load_clip``) load strictly.
    ``sparsify_after`` names 1-based blocks after whose attention ``keep_and_fuse`` runs (before
    that block's MLP, as EViT), with ``keep_rate``.
    """

    def __init__(self, sparsify_after: Sequence[int] = (4, 7, 10), keep_rate: float = 0.8,
                 **clip: Any) -> None:
        super().__init__(**clip, return_layers=1)
        self.requires_grad_(True)  # a teacher freezes itself; this tower trains
        depth = len(self.transformer.resblocks)
        bad = [b for b in sparsify_after if not 1 <= int(b) <= depth]
        if bad:
            raise ValueError(f"sparsify_after={list(sparsify_after)}: blocks {bad} are not in "
                             f"1..{depth}")
        self.sparsify_after = tuple(int(b) for b in sparsify_after)
        self.keep_rate = float(keep_rate)

    def train(self, mode: bool = True) -> FrameViT:
        return nn.Module.train(self, mode)  # undo the teacher's always-eval rule

    def load_clip(self, path: str) -> None:
        """Load CLIP visual weights (OpenAI or timm names, any file ``convert`` reads)."""
        state = convert_clip_visual(load_checkpoint_file(path))
        load_state_dict_strict(self, state, path)

    def encode_frames(self, frames: torch.Tensor, mask: torch.Tensor | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Frames F x 3 x H x W (+ mask F x P, True = masked, the same count in each frame) ->
        (tokens F x N x D after ``ln_post``, positions F x N, patches per frame P).

        ``positions`` holds each token's patch index, ``CLS_POSITION`` / ``FUSED_POSITION`` for
        [CLS] and fused tokens (first in every row).
        """
        x, (h, w) = self.tokens(frames)  # ln_pre acts per token, so masking after it is exact
        patches = h * w
        index = torch.arange(patches, device=x.device).expand(x.shape[0], -1)
        if mask is not None:
            if mask.shape != (x.shape[0], patches):
                raise ValueError(f"mask must be {x.shape[0]} x {patches}, got {tuple(mask.shape)}")
            counts = mask.sum(dim=1)
            if bool((counts != counts[0]).any()):
                raise ValueError("every frame must mask the same number of patches (random per "
                                 f"frame, or tube masks); got {counts.tolist()}")
            visible = patches - int(counts[0])
            # stable sort puts the visible patches first, in grid order
            index = mask.to(torch.uint8).argsort(dim=1, stable=True)[:, :visible]
            x = torch.cat([x[:, :1], x[:, 1:].gather(1, index[..., None].expand(-1, -1,
                                                                                  x.shape[-1]))],
                          dim=1)
        positions = torch.cat([index.new_full((x.shape[0], 1), CLS_POSITION), index], dim=1)
        for number, block in enumerate(self.transformer.resblocks, start=1):
            if number in self.sparsify_after and self.keep_rate < 1.0:
                out, weights = block.attn(block.ln_1(x), attention_rows=0)
                x = x + out
                x, positions = keep_and_fuse(x, weights[:, 0], positions, self.keep_rate)
                x = x + block.mlp(block.ln_2(x))
            else:
                x, _ = block(x)
        return self.ln_post(x), positions, patches

    #: runs frame by frame: a mask must hide the same number of patches in every frame (tube)
    frame_by_frame = True

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (t, h, w) of a clip (patches of each frame; [CLS] not counted)."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"frames {height}x{width} are not divisible into {p}-pixel patches")
        return num_frames, height // p, width // p

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """B x T x 3 x H x W (+ mask B x T*P, the same count per frame) -> B x T*N x D tokens."""
        if video.dim() == 4:
            video = video.unsqueeze(1)
        B, T = video.shape[:2]
        frame_mask = None if mask is None else mask.reshape(B * T, -1)
        tokens, _, _ = self.encode_frames(video.flatten(0, 1), frame_mask)
        return tokens.reshape(B, -1, tokens.shape[-1])

    def embedding_dim(self) -> int:
        """Width of the [CLS] feature after CLIP's projection (the width without one)."""
        return self.out_dim


class TemporalEncoder(nn.Module):
    """Q_t: pre-norm blocks over all frames' tokens concatenated, with a learned per-frame
    embedding (``num_frames`` rows, interpolated linearly for other frame counts). Its blocks'
    output projections start at zero, so a model initialised from single-frame weights starts
    from exactly the single-frame features."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, num_frames: int):
        super().__init__()
        self.frame_embedding = nn.Parameter(torch.zeros(num_frames, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_dim, qkv_bias="qkv")
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        for block in self.blocks:
            for layer in (block.attn.proj, block.mlp.fc2):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """B x T x L x D -> B x T x L x D."""
        B, T, L, D = frames.shape
        table = self.frame_embedding
        if table.shape[0] != T:
            table = F.interpolate(table.t()[None].float(), size=T, mode="linear",
                                  align_corners=False)[0].t().to(table.dtype)
        x = (frames + table[None, :, None].to(frames.dtype)).reshape(B, T * L, D)
        for block in self.blocks:
            x = block(x)
        return self.norm(x).reshape(B, T, L, D)


@dataclass
class SMAUGVideoFeatures(VideoFeatures):
    """Plus each frame's pooled feature (B x T x D: its [CLS], or its mean token with
    ``video_pool="mean"``), which the frame selector reads; ``tokens`` are the T frames' tokens
    concatenated in time order (each frame the same count)."""

    frame_cls: torch.Tensor | None = None


@dataclass
class _Encoded:
    frames: torch.Tensor  # B x T x L x D after Q_t
    frame_tokens: torch.Tensor  # B*T x L x D before Q_t (the MAE decoder's input)
    positions: torch.Tensor  # B*T x L
    patches: int


class SMAUG(VideoLanguageModel):
    """SMAUG: FrameViT (+ Q_t) + MAE decoder + frame selector + BERT text/fusion encoder."""

    def __init__(self, vision: dict[str, Any], text: dict[str, Any] | None = None,
                 text_pretrained: str = "", clip_weights: str = "", mask_ratio: float = 0.5,
                 keep_rate: float = 0.8, sparsify_after: Sequence[int] = (4, 7, 10),
                 temporal_layers: int = 2, num_frames: int = 4, mvm: bool = True,
                 decoder: dict[str, Any] | None = None, norm_pixel_target: bool = False,
                 selected_frames: int = 0, selector: dict[str, Any] | None = None,
                 embed_dim: int = 256, temperature: float = 0.07, mlm_ratio: float = 0.15,
                 video_pool: str = "cls",
                 input_mean: Sequence[float] = CLIP_MEAN, input_std: Sequence[float] = CLIP_STD,
                 special_ids: dict[str, int] | None = None,
                 text_vocab_ids: Sequence[int] | None = None):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if selected_frames < 0:
            raise ValueError(f"selected_frames must be >= 0 (0: no selection), got "
                             f"{selected_frames}")
        if video_pool not in ("cls", "mean"):
            raise ValueError(f"video_pool must be 'cls' or 'mean', got {video_pool!r}")
        self.video_pool = video_pool
        self.mask_ratio, self.mlm_ratio = float(mask_ratio), float(mlm_ratio)
        self.norm_pixel_target = bool(norm_pixel_target)
        self.selected_frames = int(selected_frames)
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.video_encoder = FrameViT(sparsify_after, keep_rate, **vision)
        if clip_weights:
            self.video_encoder.load_clip(clip_weights)
        width = self.video_encoder.width
        self.video_dim = width
        heads = self.video_encoder.transformer.resblocks[0].attn.num_heads
        self.temporal_encoder = TemporalEncoder(width, temporal_layers, heads, 4 * width,
                                                num_frames) if temporal_layers > 0 else None
        self.mae_decoder = MAEDecoder(width, patch_size=self.video_encoder.patch_size,
                                      **(decoder or {})) if mvm else None
        self.text_vocab_ids = [int(i) for i in text_vocab_ids] if text_vocab_ids else None
        self.specials = model_specials(self.text_vocab_ids, special_ids)
        self.text_encoder: BertTextEncoder = build_fusion_text_encoder(
            text, text_model_path(text_pretrained) if text_pretrained else "", width,
            self.text_vocab_ids)
        hidden = self.text_encoder.hidden_size
        self.frame_selector = TextGuidedFrameSelector(width, hidden, **(selector or {})) \
            if self.selected_frames else None
        self.vision_proj = nn.Linear(self.video_encoder.embedding_dim(), embed_dim)
        self.text_proj = nn.Linear(hidden, embed_dim)
        self.itm_head = nn.Linear(hidden, 1)
        self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())
        self.embed_dim, self.fused_dim = embed_dim, hidden

    # ---- video side -----------------------------------------------------------------------
    @property
    def temperature(self) -> torch.Tensor:
        """Learnable VTC temperature (0.07 at the start), clamped to [0.001, 0.5]."""
        return self.log_temperature.exp().clamp(0.001, 0.5)

    @staticmethod
    def _as_clip(video: torch.Tensor) -> torch.Tensor:
        if video.dim() == 4:
            video = video.unsqueeze(1)
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be B x T x 3 x H x W, got shape {tuple(video.shape)}")
        return video

    def make_mask(self, video: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor | None:
        """MAE mask B x T*P (True = masked): random for one frame, tube for several; None at
        ratio 0."""
        video = self._as_clip(video)
        if self.mask_ratio <= 0:
            return None
        B, T = video.shape[:2]
        patch = self.video_encoder.patch_size
        patches = (video.shape[-2] // patch) * (video.shape[-1] // patch)
        if T == 1:
            return random_mask(B, patches, self.mask_ratio, generator, video.device)
        return tube_mask(B, T, patches, self.mask_ratio, generator, video.device)

    def _encode(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> _Encoded:
        video = self._as_clip(video)
        B, T = video.shape[:2]
        frame_mask = None if mask is None else mask.reshape(B * T, -1)
        tokens, positions, patches = self.video_encoder.encode_frames(video.flatten(0, 1),
                                                                      frame_mask)
        frames = tokens.reshape(B, T, *tokens.shape[1:])
        if T > 1 and self.temporal_encoder is not None:
            frames = self.temporal_encoder(frames)
        return _Encoded(frames, tokens, positions, patches)

    def _video_features(self, frames: torch.Tensor) -> SMAUGVideoFeatures:
        # each frame's [CLS] (the paper), or the mean of its tokens
        frame_cls = frames[:, :, 0] if self.video_pool == "cls" else frames.mean(dim=2)
        pooled = frame_cls.mean(dim=1)
        if self.video_encoder.proj is not None:
            pooled = pooled @ self.video_encoder.proj.to(pooled.dtype)
        embedding = F.normalize(self.vision_proj(pooled), dim=-1)
        return SMAUGVideoFeatures(tokens=frames.flatten(1, 2), embedding=embedding,
                                  frame_cls=frame_cls)

    def encode_video(self, video: torch.Tensor) -> SMAUGVideoFeatures:
        """All frames' tokens (no masking; sparsification as trained) and the projected mean
        [CLS]. Any number of frames works (12 at inference, as the paper)."""
        return self._video_features(self._encode(video).frames)

    # ---- text side and the cross-encoder --------------------------------------------------
    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        """Text-only BERT layers; the embedding is the projected [CLS]."""
        tokens = self.text_encoder(text_ids, text_mask)
        embedding = F.normalize(self.text_proj(tokens[:, 0]), dim=-1)
        return TextFeatures(tokens=tokens, mask=text_mask, embedding=embedding)

    def select_frames(self, video: VideoFeatures, text: TextFeatures,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The video tokens the cross-encoder sees for each row-aligned pair: the
        ``selected_frames`` frames S picks for the pair's text (all frames when the clip has no
        more than that, or without a selector)."""
        frame_cls = getattr(video, "frame_cls", None)
        if self.frame_selector is None or frame_cls is None \
                or frame_cls.shape[1] <= self.selected_frames:
            return video.tokens
        B, T = frame_cls.shape[:2]
        frames = video.tokens.reshape(B, T, -1, video.tokens.shape[-1])
        _, rows = self.frame_selector(frame_cls, text.tokens[:, 0].to(frame_cls.dtype),
                                      self.selected_frames, generator)
        return select_rows(frames, rows).flatten(1, 2)

    def fused_cls(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """[CLS] of the fusion layers over (text, selected frames): B x hidden."""
        return self.text_encoder.fuse(text.tokens, text.mask, self.select_frames(video, text))[:, 0]

    def match(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """VTM log-odds of each row-aligned (video, text) pair: B, in float32."""
        fused = self.fused_cls(video, text)
        with full_precision(fused.device):
            return self.itm_head(fused.float()).squeeze(-1)

    # ---- pre-training ---------------------------------------------------------------------
    def pretrain_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{vtc, vtm, mlm, mvm}: mvm when frames are masked and the decoder is on (``mvm``),
        mlm when ``mlm_ratio`` > 0 (fine-tuning for retrieval sets both off, as the paper)."""
        video = self._as_clip(batch["video"])
        mask = self.make_mask(video)
        encoded = self._encode(video, mask)
        losses: dict[str, torch.Tensor] = {}
        if mask is not None and self.mae_decoder is not None:
            predicted = self.mae_decoder(encoded.frame_tokens, encoded.positions, encoded.patches)
            target = patchify(video.flatten(0, 1), self.video_encoder.patch_size)
            losses["mvm"] = pixel_reconstruction_loss(
                predicted, target, mask.reshape(predicted.shape[:2]), self.norm_pixel_target)
        ids, text_mask = batch["text_ids"], batch["text_mask"]
        video_feats = self._video_features(encoded.frames)
        text_feats = self.encode_text(ids, text_mask)
        pair_ids = batch.get("index")
        false_text = self.encode_text(batch["negative_text_ids"], batch["negative_text_mask"]) \
            if "negative_text_ids" in batch else None
        losses["vtc"] = vtc_loss(video_feats.embedding, text_feats.embedding, self.temperature,
                                 ids=pair_ids, negative_text=None if false_text is None
                                 else false_text.embedding)
        extra = () if false_text is None else \
            (self.match(video_feats.index(batch["negative_owner"]), false_text),)
        losses["vtm"] = hard_negative_vtm_loss(self.match, video_feats, text_feats, pair_ids,
                                               extra)
        if self.mlm_ratio > 0:
            special = [self.specials[k] for k in ("pad", "cls", "sep", "mask", "unk")]
            masked_ids, labels = mask_tokens(ids, text_mask, self.text_encoder.config.vocab_size,
                                             self.specials["mask"], special, self.mlm_ratio)
            masked = self.text_encoder(masked_ids, text_mask)
            fused = self.text_encoder.fuse(masked, text_mask,
                                           self.select_frames(video_feats, text_feats))
            predicted = labels != -100
            losses["mlm"] = mlm_loss(self.text_encoder.mlm_logits(fused[predicted]),
                                     labels[predicted])
        return losses

    # ---- engine hooks ---------------------------------------------------------------------
    def parameter_components(self) -> dict[str, tuple[str, ...]]:
        """Parameter-name prefixes of the paper's components, for ``leanvl profile``."""
        text = self.text_encoder
        fusion = tuple(f"text_encoder.encoder.layer.{i}." for i in
                       range(text.text_layers, text.num_layers))
        return {"frame ViT (Q_v)": ("video_encoder.",),
                "temporal encoder (Q_t)": ("temporal_encoder.",),
                "MAE decoder (D_v)": ("mae_decoder.",),
                "frame selector (S)": ("frame_selector.",),
                "fusion (Q_m, cross-attention layers)": fusion,
                "text (Q_l, embeddings + text layers)": ("text_encoder.",),
                "heads (VTC projections, VTM, MLM, temperature)":
                    ("vision_proj.", "text_proj.", "itm_head.", "log_temperature")}

    #: one-frame batches leave Q_t unused, and the selector is unused at K <= kappa
    ddp_find_unused_parameters = True

    def release_config(self) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Released weights already hold the CLIP initialisation: ``clip_weights`` is dropped."""
        kwargs = dict(getattr(self, "registry_kwargs", {}))
        kwargs.pop("clip_weights", None)
        return kwargs, ()

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides biases and norms."""
        return {"log_temperature", "video_encoder.class_embedding",
                "video_encoder.positional_embedding", "temporal_encoder.frame_embedding",
                "mae_decoder.mask_token"}

    @property
    def num_layers(self) -> int:
        """Depth of the frame ViT, for layer-wise lr decay."""
        return len(self.video_encoder.transformer.resblocks)

    def layer_id(self, name: str) -> int:
        """0 for the embeddings, i + 1 for frame-ViT block i, the top for everything else."""
        prefix = "video_encoder.transformer.resblocks."
        if name.startswith(prefix):
            return int(name[len(prefix):].split(".")[0]) + 1
        if name.startswith("video_encoder.") and not name.startswith(("video_encoder.ln_post",
                                                                       "video_encoder.proj")):
            return 0
        return self.num_layers + 1


#: the frame selector's sizes (two heads and a 2048-wide MLP in the paper; width not given)
SELECTOR_SIZES = {"tiny": {"dim": 64, "num_heads": 2, "mlp_dim": 256},
                  "base": {"dim": 512, "num_heads": 2, "mlp_dim": 2048}}
#: MAE decoder sizes (3 blocks in the paper; width and heads as VideoMAE's ViT-B decoder)
DECODER_SIZES = {"tiny": {"dim": 128, "depth": 3, "num_heads": 4},
                 "base": {"dim": 384, "depth": 3, "num_heads": 6}}


def _smaug(size: str, vision: dict | None, text: dict | None, decoder: dict | None,
           selector: dict | None, **kwargs: Any) -> SMAUG:
    # the full configuration of Table 7: with more than 2 frames S picks 2 for the cross-encoder
    kwargs.setdefault("selected_frames", 2)
    clip = "tiny" if size == "tiny" else "b16"
    vision = {**CLIP_SIZES[clip], **(vision or {})}
    text_size = "tiny" if size == "tiny" else "base"
    text = {"fusion_layers": TEXT_SIZES[text_size]["fusion_layers"], **(text or {})} \
        if kwargs.get("text_pretrained") else {**TEXT_SIZES[text_size], **(text or {})}
    return SMAUG(vision=vision, text=text, decoder={**DECODER_SIZES[text_size], **(decoder or {})},
                 selector={**SELECTOR_SIZES[text_size], **(selector or {})}, **kwargs)


@register_model("smaug_tiny")
def smaug_tiny(vision: dict | None = None, text: dict | None = None, decoder: dict | None = None,
               selector: dict | None = None, **kwargs: Any) -> SMAUG:
    """CPU-sized SMAUG: CLIP-layout ViT 192/4/3 (sparsified after blocks 2 and 3), 1-block Q_t,
    a 4-layer 128-wide BERT (2 text + 2 fusion), a 3-block 128-wide MAE decoder."""
    kwargs.setdefault("embed_dim", 128)
    kwargs.setdefault("sparsify_after", (2, 3))
    kwargs.setdefault("temporal_layers", 1)
    return _smaug("tiny", vision, text, decoder, selector, **kwargs)


@register_model("smaug_b16")
def smaug_b16(vision: dict | None = None, text: dict | None = None, decoder: dict | None = None,
              selector: dict | None = None, **kwargs: Any) -> SMAUG:
    """SMAUG-B/16 (paper sizes): CLIP ViT-B/16 frame encoder sparsified after blocks 4, 7, 10
    (keep 0.8), 2-block Q_t, BERT-base (9 text + 3 fusion), 3-block MAE decoder, selector S."""
    return _smaug("base", vision, text, decoder, selector, **kwargs)
