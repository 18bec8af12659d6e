"""Unmasked Teacher (UMT): masked video distillation from a frozen CLIP, then vision-language
pre-training (REFERENCE.md, papers/unmasked-teacher.txt).

Stage 1 (``stage=1``): the student ``VideoViT`` sees only the tokens kept by the teacher's
semantic mask; its last K layers, through per-layer alignment heads, are aligned with the
teacher's last K layers at those unmasked positions (UTA).
Stage 2 (``stage=2``): plus a BERT text encoder whose last layers cross-attend to the (masked)
video tokens; losses VTC + VTM (hard negatives) + MLM + UTA. Images are one-frame videos.

As in the authors' code, each returned student layer gets the fixed sine-cosine table (the
student's width, over all T*h*w positions, the visible ones kept) added before its alignment
head, whose LayerNorm uses eps 1e-6 in stage 1 and 1e-5 in stage 2. Options that the released
vision-language checkpoints need (``leanvl convert umt-stage2``): ``pool_norm`` (a LayerNorm on
the pooled tokens before ``vision_proj``), ``keep_temporal`` (one pooled vector per frame, see
``_video_features``), ``itm_logits=2`` (a 2-way matching head), ``position_frames`` (the
authors' ``ckpt_num_frame``) and ``mlm_head=False`` (fine-tuned checkpoints have none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanvl.config import CLIP_MEAN, CLIP_STD
from leanvl.engine.precision import full_precision
from leanvl.losses import hard_negative_vtm_loss, mlm_loss, uta_loss, vtc_loss
from leanvl.masking import random_mask, reverse_mask, semantic_mask, tube_mask
from leanvl.models.base import TextFeatures, VideoFeatures, VideoLanguageModel, text_model_path
from leanvl.models.registry import register_model
from leanvl.models.teachers import CLIP_SIZES, CLIPVisionTeacher
from leanvl.nn.text import (
    TEXT_SIZES,
    BertTextEncoder,
    build_fusion_text_encoder,
    mask_tokens,
    model_specials,
)
from leanvl.nn.vit import VIT_SIZES, AlignmentHead, VideoViT

MASK_TYPES = ("semantic", "random", "tube", "none")


def build_teacher(teacher: str, return_layers: int, **kwargs: Any) -> CLIPVisionTeacher:
    """A CLIP teacher from a size name (random weights: tests, profiling) or a weights file."""
    if teacher in CLIP_SIZES:
        return CLIPVisionTeacher.from_size(teacher, return_layers=return_layers, **kwargs)
    return CLIPVisionTeacher.from_file(teacher, return_layers=return_layers, **kwargs)


class UMT(VideoLanguageModel):
    """UMT student (+ text side in stage 2) with an optional frozen teacher."""

    frozen_prefixes = ("teacher.",)

    def __init__(self, vision: dict[str, Any], text: dict[str, Any] | None = None,
                 stage: int = 2, teacher: str = "", teacher_kwargs: dict[str, Any] | None = None,
                 uta_layers: int = 6, embed_dim: int = 256, video_mask_ratio: float = 0.8,
                 image_mask_ratio: float = 0.5, mask_type: str = "semantic",
                 mlm_ratio: float = 0.5, temperature: float = 0.07,
                 input_mean: Sequence[float] = CLIP_MEAN, input_std: Sequence[float] = CLIP_STD,
                 text_pretrained: str = "", special_ids: dict[str, int] | None = None,
                 text_vocab_ids: Sequence[int] | None = None, uta_center: bool = False,
                 pool_norm: bool = False, keep_temporal: bool = False, itm_logits: int = 1,
                 position_frames: int = 0, mlm_head: bool = True,
                 uta_norm_eps: float | None = None):
        super().__init__()
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        self.stage, self.mask_type = stage, mask_type
        self.video_mask_ratio, self.image_mask_ratio = video_mask_ratio, image_mask_ratio
        self.mlm_ratio = mlm_ratio
        # UTA targets minus each clip's mean target token: off in UMT; for a weak teacher whose
        # tokens share one dominant direction (the CPU demo's stand-in, see docs/umt.md)
        self.uta_center = bool(uta_center)
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        if itm_logits not in (1, 2):
            raise ValueError(f"itm_logits must be 1 (log-odds) or 2 (UMT's head), got {itm_logits}")
        self.keep_temporal = bool(keep_temporal)
        vision = dict(vision)
        if position_frames:  # UMT's ckpt_num_frame: the table of the trained frames, resampled
            vision.setdefault("table_frames", int(position_frames))
        self.video_encoder = VideoViT(**vision)
        self.video_dim = self.video_encoder.dim
        self.teacher: CLIPVisionTeacher | None = None
        self.uta_layers = 0
        if teacher:
            layers = min(uta_layers, self.video_encoder.depth)
            self.teacher = build_teacher(teacher, layers, **(teacher_kwargs or {}))
            self.uta_layers = layers
            # the authors' heads: LayerNorm eps 1e-6 in stage 1, torch's default in stage 2
            eps = uta_norm_eps if uta_norm_eps is not None else (1e-6 if stage == 1 else 1e-5)
            self.uta_heads = nn.ModuleList(
                AlignmentHead(self.video_dim, self.teacher.out_dim, norm_eps=eps)
                for _ in range(layers))
        self.text_vocab_ids = [int(i) for i in text_vocab_ids] if text_vocab_ids else None
        self.specials = model_specials(self.text_vocab_ids, special_ids)
        self.text_encoder: BertTextEncoder | None = None
        if stage == 2:
            self.text_encoder = build_fusion_text_encoder(
                text, text_model_path(text_pretrained) if text_pretrained else "",
                self.video_dim, self.text_vocab_ids, mlm_head=mlm_head)
            hidden = self.text_encoder.hidden_size
            # UMT's vision side: mean -> LayerNorm (the student's eps) -> vision_proj
            self.pool_norm = nn.LayerNorm(self.video_dim, eps=1e-6) if pool_norm else nn.Identity()
            self.vision_proj = nn.Linear(self.video_dim, embed_dim)
            self.text_proj = nn.Linear(hidden, embed_dim)
            self.itm_head = nn.Linear(hidden, itm_logits)
            self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())
            self.fused_dim = hidden
        self.embed_dim = embed_dim

    # ---- contract -------------------------------------------------------------------------
    @property
    def temperature(self) -> torch.Tensor:
        """Learnable VTC temperature, clamped to [0.001, 0.5] as in UMT's code."""
        return self.log_temperature.exp().clamp(0.001, 0.5)

    def _require_text(self) -> BertTextEncoder:
        if self.text_encoder is None:
            raise RuntimeError("this UMT is a stage-1 (video-only) model: it has no text side; "
                               "build it with stage=2")
        return self.text_encoder

    def _video_features(self, tokens: torch.Tensor, steps: int = 1,
                        per_frame: bool = False) -> VideoFeatures:
        """Tokens and the pooled embedding. With ``per_frame`` (``keep_temporal``) the tokens of
        each of the ``steps`` time steps are pooled, normed, projected and normalised on their
        own and the embedding is the mean of those unit vectors, not re-normalised: its dot
        product with a unit text vector is the mean over frames of the per-frame cosines, the
        authors' clip-text score (their ``get_sim``)."""
        if self.text_encoder is None:
            return VideoFeatures(tokens=tokens, embedding=F.normalize(tokens.mean(dim=1), dim=-1))
        if per_frame and steps > 1:
            pooled = tokens.reshape(tokens.shape[0], steps, -1, tokens.shape[-1]).mean(dim=2)
        else:
            pooled = tokens.mean(dim=1, keepdim=True)
        frames = F.normalize(self.vision_proj(self.pool_norm(pooled)), dim=-1)  # B x T x E
        return VideoFeatures(tokens=tokens, embedding=frames.mean(dim=1))

    def _steps(self, video: torch.Tensor) -> int:
        """Token steps in time of a clip (frames / tubelet); 1 for an image."""
        if video.dim() != 5:
            return 1
        return self.video_encoder.patch_embed.grid(video.shape[1], *video.shape[-2:])[0]

    def _per_frame(self, mask: torch.Tensor | None) -> bool:
        """Whether to pool per frame: ``keep_temporal``, unless a mask leaves frames with
        different token counts (the authors switch it off for all but tube masks)."""
        return self.keep_temporal and (mask is None or self.mask_type == "tube")

    def encode_video(self, video: torch.Tensor) -> VideoFeatures:
        """All tokens of the student (no masking at inference) and the pooled embedding."""
        return self._video_features(self.video_encoder(video), self._steps(video),
                                    self._per_frame(None))

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        """Text-only BERT layers; the embedding is the projected [CLS]."""
        tokens = self._require_text()(text_ids, text_mask)
        embedding = F.normalize(self.text_proj(tokens[:, 0]), dim=-1)
        return TextFeatures(tokens=tokens, mask=text_mask, embedding=embedding)

    def fused_cls(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """[CLS] of the fusion layers over (text, video): B x hidden."""
        return self._require_text().fuse(text.tokens, text.mask, video.tokens, video.mask)[:, 0]

    def _itm(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """The matching head's logits, B x itm_logits, in float32 (under bf16 autocast, nearby
        scores of multiple-choice options would tie)."""
        fused = self.fused_cls(video, text)
        with full_precision(fused.device):
            return self.itm_head(fused.float())

    def match(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """VTM log-odds of each row-aligned (video, text) pair: B (a 2-way head: the match
        logit minus the no-match one, so sigmoid gives the head's softmax)."""
        logits = self._itm(video, text)
        return logits[:, 1] - logits[:, 0] if logits.shape[1] == 2 else logits.squeeze(-1)

    def rerank_logit(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """The score retrieval re-ranks by: UMT's code takes the raw match logit of its
        2-way head (``itm_head(...)[:, 1]``); a 1-logit head's log-odds otherwise."""
        logits = self._itm(video, text)
        return logits[:, 1] if logits.shape[1] == 2 else logits.squeeze(-1)

    # ---- pre-training ---------------------------------------------------------------------
    def make_mask(self, video: torch.Tensor, attention: torch.Tensor | None,
                  generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The student's token mask (True = dropped) for this batch, or None when unmasked."""
        frames = video.shape[1] if video.dim() == 5 else 1
        ratio = self.image_mask_ratio if frames == 1 else self.video_mask_ratio
        if self.mask_type == "none" or ratio <= 0:
            return None
        # token steps in time (frames / tubelet) and patches per step
        steps, height, width = self.video_encoder.patch_embed.grid(frames, *video.shape[-2:])
        patches = height * width
        if self.mask_type == "semantic":
            if attention is None:
                raise ValueError("semantic masking needs a teacher: set teacher= to a CLIP "
                                   "weights file, or mask_type=random/tube/none")
            if steps != frames:
                raise ValueError("semantic masking samples each frame's tokens from the "
                                 "teacher's attention, which needs tubelet_size=1 (UMT's "
                                 f"student); got {frames} frames in {steps} token steps")
            return semantic_mask(attention, ratio, generator=generator)
        if self.mask_type == "tube":
            return tube_mask(video.shape[0], steps, patches, ratio, generator, video.device)
        return random_mask(video.shape[0], steps * patches, ratio, generator, video.device)

    def _distill(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                      torch.Tensor | None]:
        """Student tokens on the visible positions and the UTA loss (None without a teacher)."""
        targets = attention = None
        if self.teacher is not None:
            output = self.teacher(self.teacher_input(video))
            targets, attention = output.layers, output.attention
        mask = self.make_mask(video, attention)
        tokens, layers = self.video_encoder.forward_features(video, mask,
                                                             return_layers=self.uta_layers)
        if targets is None:
            return tokens, mask, None
        if self.uta_center:
            targets = [t - t.mean(dim=1, keepdim=True) for t in targets]
        if mask is not None:
            keep = ~mask
            targets = [t[keep].reshape(t.shape[0], -1, t.shape[-1]) for t in targets]
        aligned = self.align(layers, video, mask)
        return tokens, mask, uta_loss(aligned, targets)

    def align(self, layers: Sequence[torch.Tensor], video: torch.Tensor,
              mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The alignment heads' outputs (before L2 normalisation) for the student's returned
        layers (after its final norm) on the visible tokens of ``video``: each layer plus the
        fixed position table at the visible positions, through its head, as the authors'
        ``clip_decoder`` (their ``clip_pos_embed``: the student's own sine-cosine table)."""
        frames = video.shape[1] if video.dim() == 5 else 1
        grid = self.video_encoder.patch_embed.grid(frames, *video.shape[-2:])
        first = layers[0]
        table = self.video_encoder.position_table(grid, first.device, first.dtype)
        table = table.expand(first.shape[0], -1, -1)
        if mask is not None:
            table = table[~mask].reshape(first.shape[0], -1, first.shape[-1])
        return [head(layer + table) for head, layer in zip(self.uta_heads, layers, strict=True)]

    def _reversed_clips(self, video: torch.Tensor, mask: torch.Tensor | None,
                        flags: torch.Tensor | None
                        ) -> tuple[torch.Tensor | None, VideoFeatures | None]:
        """The flagged clips of the batch played backwards, through the student with the same
        visible patches (the step's mask reversed in time): (their batch positions, features),
        or (None, None) when no clip is flagged or the batch is of images."""
        if flags is None or video.dim() != 5 or video.shape[1] < 2:
            return None, None
        owner = flags.to(video.device).nonzero().squeeze(1)
        if owner.numel() == 0:
            return None, None
        backwards = video.index_select(0, owner).flip(1)
        if mask is not None:
            time = self.video_encoder.patch_embed.grid(video.shape[1], *video.shape[-2:])[0]
            mask = reverse_mask(mask.index_select(0, owner), time)
        return owner, self._video_features(self.video_encoder(backwards, mask),
                                           self._steps(video), self._per_frame(mask))

    def teacher_input(self, video: torch.Tensor) -> torch.Tensor:
        """Frames for the teacher: its normalisation, resized so that its token grid equals the
        student's (a CLIP-L/14 teacher of a 16-pixel-patch student sees 224 -> 196 pixels)."""
        video = self.teacher.renormalize(video, self.input_mean, self.input_std)
        student, teacher = self.video_encoder.patch_embed.patch_size, self.teacher.patch_size
        if student == teacher:
            return video
        height, width = (video.shape[-2] // student) * teacher, (video.shape[-1] // student) * teacher
        frames = video.reshape(-1, *video.shape[-3:])
        frames = F.interpolate(frames.float(), size=(height, width), mode="bicubic",
                               align_corners=False).to(video.dtype)
        return frames.reshape(*video.shape[:-2], height, width)

    def pretrain_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Stage 1: {uta}; stage 2: {vtc, vtm, mlm} (+ uta when a teacher is set)."""
        if self.stage == 1 and self.teacher is None:
            raise ValueError("UMT stage 1 pre-training distils from a teacher: set teacher= to a "
                             "CLIP weights file (or a size name for random weights)")
        video = batch["video"]
        tokens, mask, uta = self._distill(video)
        losses: dict[str, torch.Tensor] = {}
        if uta is not None:
            losses["uta"] = uta
        if self.stage == 1:
            return losses
        text_encoder = self._require_text()
        ids, text_mask = batch["text_ids"], batch["text_mask"]
        video_feats = self._video_features(tokens, self._steps(video), self._per_frame(mask))
        text_feats = self.encode_text(ids, text_mask)
        pair_ids = batch.get("index")
        # captions the records mark as false for their clip (e.g. of the time-reversed clip)
        false_text = self.encode_text(batch["negative_text_ids"], batch["negative_text_mask"]) \
            if "negative_text_ids" in batch else None
        # clips the records mark as false for their captions when played backwards
        reversed_owner, reversed_feats = self._reversed_clips(video, mask,
                                                              batch.get("reversal_negative"))
        losses["vtc"] = vtc_loss(
            video_feats.embedding, text_feats.embedding, self.temperature, ids=pair_ids,
            negative_text=None if false_text is None else false_text.embedding,
            negative_video=None if reversed_feats is None else reversed_feats.embedding)
        # VTM: B positives, B (video, hard text) and B (hard video, text) negatives, plus each
        # record's own false captions and its caption with the clip played backwards.
        extra = []
        if false_text is not None:
            extra.append(self.match(video_feats.index(batch["negative_owner"]), false_text))
        if reversed_feats is not None:
            extra.append(self.match(reversed_feats, text_feats.index(reversed_owner)))
        losses["vtm"] = hard_negative_vtm_loss(self.match, video_feats, text_feats, pair_ids,
                                               tuple(extra))
        if text_encoder.mlm_head is None:  # weights fine-tuned without MLM (mlm_head=False)
            return losses
        # MLM: masked caption tokens predicted from the fused (text, video) features.
        special = [self.specials[k] for k in ("pad", "cls", "sep", "mask", "unk")]
        masked_ids, labels = mask_tokens(ids, text_mask, text_encoder.config.vocab_size,
                                         self.specials["mask"], special, self.mlm_ratio)
        masked_tokens = text_encoder(masked_ids, text_mask)
        fused = text_encoder.fuse(masked_tokens, text_mask, tokens)
        # vocabulary logits only where there is a label: the 30k-way softmax dominates otherwise
        predicted = labels != -100
        losses["mlm"] = mlm_loss(text_encoder.mlm_logits(fused[predicted]), labels[predicted])
        return losses

    # ---- engine hooks ---------------------------------------------------------------------
    def release_config(self) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Released weights leave out the teacher and the UTA heads (pre-training only).

        Continuing distillation from released weights means passing ``teacher=`` again.
        """
        kwargs = dict(getattr(self, "registry_kwargs", {}))
        if self.teacher is None:
            return kwargs, ()
        kwargs.pop("teacher", None)
        kwargs.pop("teacher_kwargs", None)
        if self.mask_type == "semantic":
            kwargs["mask_type"] = "random"
        return kwargs, ("teacher.", "uta_heads.")

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides biases and norms."""
        return {"log_temperature"}

    @property
    def num_layers(self) -> int:
        """Depth of the video encoder, for layer-wise lr decay."""
        return self.video_encoder.depth

    def layer_id(self, name: str) -> int:
        """0 for the patch embedding, i + 1 for video block i, the top for everything else."""
        if name.startswith("video_encoder.patch_embed"):
            return 0
        if name.startswith("video_encoder.blocks."):
            return int(name.split(".")[2]) + 1
        return self.num_layers + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the video encoder's blocks."""
        self.video_encoder.activation_checkpointing = enable


def _umt(vision_size: str, text_size: str, drop_path: float, vision: dict | None,
         text: dict | None, **kwargs) -> UMT:
    vision = {**VIT_SIZES[vision_size], "drop_path_rate": drop_path, **(vision or {})}
    # a pretrained text model brings its own sizes; only the layer split is taken from `text`
    # (the size's fusion layers, the rest of the pretrained model's layers for text)
    text = {"fusion_layers": TEXT_SIZES[text_size]["fusion_layers"], **(text or {})} \
        if kwargs.get("text_pretrained") else {**TEXT_SIZES[text_size], **(text or {})}
    return UMT(vision=vision, text=text, **kwargs)


@register_model("umt_tiny")
def umt_tiny(vision: dict | None = None, text: dict | None = None, **kwargs) -> UMT:
    """CPU-sized UMT: ViT 192/4/3 and a 4-layer 128-wide BERT (2 text + 2 fusion layers)."""
    kwargs.setdefault("embed_dim", 128)
    kwargs.setdefault("uta_layers", 2)
    return _umt("tiny", "tiny", 0.0, vision, text, **kwargs)


@register_model("umt_b16")
def umt_b16(vision: dict | None = None, text: dict | None = None, **kwargs) -> UMT:
    """UMT-B/16: ViT-B/16 student, BERT-base (9 text + 3 fusion); teacher: CLIP-ViT-B/16 file."""
    return _umt("b16", "base", 0.1, vision, text, **kwargs)


@register_model("umt_l16")
def umt_l16(vision: dict | None = None, text: dict | None = None, **kwargs) -> UMT:
    """UMT-L/16: ViT-L/16 student, BERT-large (19 text + 5 fusion); teacher: CLIP-ViT-L/14 file."""
    return _umt("l16", "large", 0.2, vision, text, **kwargs)
