"""E-ViLM: a 16M-parameter video-language model and its semantic VQ video tokenizer
(REFERENCE.md, papers/e-vilm.txt).

Tokenizer (``EViLMTokenizer``, trained first): a ViT (the shared ``VideoViT``) over the frames
-> Linear to the code dimension -> L2-normalised nearest-code look-up in a 9,420 x 32 codebook
with straight-through gradients (``vq.VectorQuantizer``) -> a transformer decoder over the
quantised tokens -> mean over tokens -> a multi-label head over the caption vocabulary, trained
with focal loss on which words the clip's caption contains, plus the codebook and commitment
losses (eq. 6-7). After training only the encoder and the codebook are used: ``codes(video)``.

Model (``EViLM``): EdgeNeXt per frame (timm), its frame grids flattened and concatenated over T
-> Linear to the decoder width; a small BERT over a truncated vocabulary -> Linear to the
decoder width; a decoder of transformer blocks over ``[CLS; text + t_L; video + t_V]``; a
pooler (Linear + tanh on the [CLS] output); heads for VTM, MLM and MVM. MVM masks 40% of each
frame's grid cells block-wise (BEiT), sets their pixels to zero (black) before EdgeNeXt and
predicts the frozen tokenizer's code of each masked cell from the decoder output there.

Retrieval takes the paper's fast path: ``encode_video`` / ``encode_text`` run the decoder on one
modality alone (``[CLS; video + t_V]``, ``[CLS; text + t_L]``) and their pooled, normalised
outputs are the dual-encoder embeddings; ``match`` runs the joint decoder, so the retrieval
task re-ranks the top-k by VTM. The paper fine-tunes retrieval that way and does not pre-train
the unimodal path; ``losses`` may add ``vtc`` (contrastive loss on the unimodal embeddings) for
retrieval fine-tuning and for zero-shot retrieval.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanvl.config import IMAGENET_MEAN, IMAGENET_STD
from leanvl.engine.precision import full_precision
from leanvl.losses import focal_loss, mlm_loss, sample_hard_negatives, vtc_loss, vtm_loss
from leanvl.masking import block_mask
from leanvl.models.base import TextFeatures, VideoFeatures, VideoLanguageModel, text_model_path
from leanvl.models.registry import register_model
from leanvl.models.teachers import renormalize
from leanvl.nn.frames import FrameGridEncoder
from leanvl.nn.text import BertMLMHead, BertTextEncoder, mask_tokens, model_specials
from leanvl.nn.vit import VIT_SIZES, Block, VideoViT, init_vit_weights, sincos_table
from leanvl.vq import VectorQuantizer

log = logging.getLogger(__name__)

LOSSES = ("vtm", "mlm", "mvm", "vtc")
#: BERT-uncased WordPiece vocabulary size, and the size E-ViLM's 30% truncation keeps
BERT_VOCAB = 30522
TRUNCATED_VOCAB = round(0.3 * BERT_VOCAB)
TEXT, VIDEO = 0, 1  # token-type rows


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
class EViLMTokenizer(VideoLanguageModel):
    """Semantic VQ video tokenizer: ViT -> codes -> decoder -> caption-word presence.

    ``vocab_size`` (or ``text_vocab_ids``, a truncated vocabulary) sets the multi-label head;
    the targets are the caption's token ids minus the special tokens. ``decoder=False`` builds
    only what ``codes`` needs (encoder and codebook).
    """

    def __init__(self, vision: dict[str, Any], num_codes: int = 9420, code_dim: int = 32,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 8,
                 decoder: bool = True, vocab_size: int = BERT_VOCAB,
                 text_vocab_ids: Sequence[int] | None = None,
                 special_ids: dict[str, int] | None = None, gamma_pos: float = 0.0,
                 gamma_neg: float = 1.0, dead_after: int = 100, restart_every: int = 10,
                 input_mean: Sequence[float] = IMAGENET_MEAN,
                 input_std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.encoder = VideoViT(**vision)
        self.to_code = nn.Linear(self.encoder.dim, code_dim)
        self.quantizer = VectorQuantizer(num_codes, code_dim, normalize=True,
                                         dead_after=dead_after, restart_every=restart_every)
        self.text_vocab_ids = [int(i) for i in text_vocab_ids] if text_vocab_ids else None
        self.vocab_size = len(self.text_vocab_ids) if self.text_vocab_ids else int(vocab_size)
        self.specials = model_specials(self.text_vocab_ids, special_ids)
        self.gamma_pos, self.gamma_neg = float(gamma_pos), float(gamma_neg)
        self.has_decoder = bool(decoder)
        if decoder:
            self.decoder_embed = nn.Linear(code_dim, decoder_dim)
            self.decoder = nn.ModuleList(Block(decoder_dim, decoder_heads, qkv_bias="qkv")
                                         for _ in range(decoder_depth))
            self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
            self.word_head = nn.Linear(decoder_dim, self.vocab_size)
            for module in (self.decoder_embed, self.decoder, self.decoder_norm, self.word_head):
                module.apply(init_vit_weights)

    @property
    def patch_size(self) -> int:
        """Pixels per token side: one code per patch."""
        return self.encoder.patch_embed.patch_size

    def features(self, video: torch.Tensor) -> torch.Tensor:
        """Continuous token features before the look-up: B x T*h*w x code_dim."""
        return self.to_code(self.encoder(video))

    @torch.no_grad()
    def codes(self, video: torch.Tensor) -> torch.Tensor:
        """Code index of every patch: B x T x h x w (long)."""
        if video.dim() == 4:
            video = video.unsqueeze(1)
        _, height, width = self.encoder.patch_embed.grid(video.shape[1], *video.shape[-2:])
        codes = self.quantizer.encode(self.features(video))
        return codes.reshape(video.shape[0], video.shape[1], height, width)

    def word_logits(self, quantized: torch.Tensor) -> torch.Tensor:
        """B x N x code_dim quantised tokens -> B x vocabulary logits (decoder, mean, head)."""
        if not self.has_decoder:
            raise RuntimeError("this tokenizer was built without its decoder (decoder=False)")
        x = self.decoder_embed(quantized)
        if x.device.type != "meta":
            x = x + sincos_table(x.shape[1], x.shape[2]).to(x.device, x.dtype)[None]
        for block in self.decoder:
            x = block(x)
        return self.word_head(self.decoder_norm(x).mean(dim=1))

    def word_targets(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Multi-hot caption-word presence, B x vocabulary (special tokens never count)."""
        targets = torch.zeros(text_ids.shape[0], self.vocab_size, device=text_ids.device)
        valid = text_mask.bool() & (text_ids >= 0) & (text_ids < self.vocab_size)
        special = torch.tensor(sorted(set(self.specials.values())), device=text_ids.device)
        valid &= ~torch.isin(text_ids, special)
        rows = torch.arange(text_ids.shape[0], device=text_ids.device)[:, None].expand_as(text_ids)
        targets[rows[valid], text_ids[valid]] = 1.0
        return targets

    def pretrain_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """{token (focal), codebook, commitment} (eq. 7, weights 1 unless configured)."""
        quantized = self.quantizer(self.features(batch["video"]))
        logits = self.word_logits(quantized.quantized)
        targets = self.word_targets(batch["text_ids"], batch["text_mask"])
        return {"token": focal_loss(logits, targets, self.gamma_pos, self.gamma_neg),
                "codebook": quantized.codebook_loss, "commitment": quantized.commitment_loss}

    def step_metrics(self) -> dict[str, float]:
        """Codebook utilisation (last ``dead_after`` steps), this batch's code perplexity and
        the codes restarted so far, logged by the trainer next to the losses."""
        usage = self.quantizer.training_usage()
        return {f"codebook_{key}": value for key, value in usage.items()} | {
            "codebook_restarted": float(self.quantizer.restarted)}

    def no_weight_decay(self) -> set[str]:
        """The codebook: weight decay would shrink codes that L2 normalisation ignores."""
        return {"quantizer.codebook"}


TOKENIZER_SIZES: dict[str, dict[str, Any]] = {
    # a ViT-B/32 encoder (patch 32: at 256 px one code per EdgeNeXt cell), 9,420 x 32 codes,
    # an 8-block decoder (width not given by the paper: 512)
    "paper": {"vision": {**VIT_SIZES["b16"], "patch_size": 32}, "num_codes": 9420,
              "code_dim": 32, "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 8},
    "tiny": {"vision": {**VIT_SIZES["tiny"], "patch_size": 32}, "num_codes": 512,
             "code_dim": 32, "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4},
}


def _tokenizer(size: str, vision: dict | None, **kwargs: Any) -> EViLMTokenizer:
    spec = {**TOKENIZER_SIZES[size], **kwargs}
    spec["vision"] = {**spec["vision"], **(vision or {})}
    return EViLMTokenizer(**spec)


@register_model("evilm_tokenizer")
def evilm_tokenizer(vision: dict | None = None, **kwargs: Any) -> EViLMTokenizer:
    """E-ViLM's semantic VQ tokenizer at paper size: ViT-B/32, 9,420 x 32 codes, 8-block decoder."""
    return _tokenizer("paper", vision, **kwargs)


@register_model("evilm_tokenizer_tiny")
def evilm_tokenizer_tiny(vision: dict | None = None, **kwargs: Any) -> EViLMTokenizer:
    """CPU-sized tokenizer: ViT 192/4/3 with 32-pixel patches, 512 x 32 codes, 2-block decoder."""
    return _tokenizer("tiny", vision, **kwargs)


def build_tokenizer(tokenizer: str, **kwargs: Any) -> EViLMTokenizer:
    """A frozen tokenizer: a size name (``tiny`` / ``paper``: random weights, for tests and
    profiling) or released tokenizer weights (a folder written by ``leanvl pretrain``)."""
    if tokenizer in TOKENIZER_SIZES:
        return _tokenizer(tokenizer, None, decoder=False, **kwargs)
    from leanvl.engine.checkpoint import load_pretrained

    model = load_pretrained(tokenizer)
    if not isinstance(model, EViLMTokenizer):
        raise ValueError(f"{tokenizer} holds a {type(model).__name__}, not an E-ViLM tokenizer")
    return model


# ---------------------------------------------------------------------------------------------
# E-ViLM
# ---------------------------------------------------------------------------------------------
class TokenTypes(nn.Module):
    """The decoder's [CLS] vector and the text / video token-type embeddings (t_L, t_V)."""

    def __init__(self, dim: int):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.types = nn.Embedding(2, dim)
        nn.init.trunc_normal_(self.cls, std=0.02)
        nn.init.trunc_normal_(self.types.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, kind: int) -> torch.Tensor:
        """``tokens`` plus the type embedding of ``kind`` (TEXT or VIDEO)."""
        return tokens + self.types.weight[kind].to(tokens.dtype)


class EViLM(VideoLanguageModel):
    """E-ViLM (see the module docstring); the tokenizer, when given, is frozen."""

    frozen_prefixes = ("tokenizer.",)
    #: ``leanvl profile`` costs one (video, text) pair through the cross-encoder by default
    profile_part = "pair"

    def __init__(self, vision: dict[str, Any] | None = None, text: dict[str, Any] | None = None,
                 dim: int = 384, depth: int = 4, num_heads: int = 6, mlp_ratio: float = 4.0,
                 frame_embedding: bool = False, max_frames: int = 16,
                 losses: Sequence[str] = ("vtm", "mlm", "mvm"), mlm_ratio: float = 0.15,
                 mvm_ratio: float = 0.4, mvm_min_patches: int = 16, tokenizer: str = "",
                 tokenizer_kwargs: dict[str, Any] | None = None, temperature: float = 0.07,
                 input_mean: Sequence[float] = IMAGENET_MEAN,
                 input_std: Sequence[float] = IMAGENET_STD, text_pretrained: str = "",
                 vocab_size: int = TRUNCATED_VOCAB, special_ids: dict[str, int] | None = None,
                 text_vocab_ids: Sequence[int] | None = None):
        super().__init__()
        self.losses = tuple(losses)
        unknown = set(self.losses) - set(LOSSES)
        if unknown or not self.losses:
            raise ValueError(f"losses must be a non-empty subset of {LOSSES}, got {losses}")
        self.mlm_ratio, self.mvm_ratio, self.mvm_min_patches = mlm_ratio, mvm_ratio, mvm_min_patches
        self.input_mean, self.input_std = tuple(input_mean), tuple(input_std)
        self.dim = self.video_dim = self.fused_dim = self.embed_dim = int(dim)
        vision = dict(vision or {})
        self.video_encoder = FrameGridEncoder(**vision)
        self.video_proj = nn.Linear(self.video_encoder.dim, dim)
        self.text_vocab_ids = [int(i) for i in text_vocab_ids] if text_vocab_ids else None
        self.specials = model_specials(self.text_vocab_ids, special_ids)
        self.text_encoder = self._build_text(dict(text or {}), text_pretrained, vocab_size)
        self.text_proj = nn.Linear(self.text_encoder.hidden_size, dim)
        self.token_types = TokenTypes(dim)
        self.frame_embed = nn.Parameter(torch.zeros(max_frames, dim)) if frame_embedding else None
        self.decoder = nn.ModuleList(Block(dim, num_heads, int(dim * mlp_ratio), qkv_bias="qkv")
                                     for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.pooler = nn.Linear(dim, dim)
        self.vtm_head = nn.Linear(dim, 1)
        # MLM: down to the text width, then BERT's head tied to the (truncated) word embeddings
        self.mlm_head = nn.Sequential(nn.Linear(dim, self.text_encoder.hidden_size),
                                      BertMLMHead(self.text_encoder.embeddings.word_embeddings))
        for module in (self.video_proj, self.text_proj, self.decoder, self.decoder_norm,
                       self.pooler, self.vtm_head, self.mlm_head[0]):
            module.apply(init_vit_weights)
        if self.frame_embed is not None:
            nn.init.trunc_normal_(self.frame_embed, std=0.02)
        self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log()) \
            if "vtc" in self.losses else None
        self.tokenizer: EViLMTokenizer | None = None
        if tokenizer:
            self.tokenizer = build_tokenizer(tokenizer, **(tokenizer_kwargs or {}))
            self.tokenizer.requires_grad_(False)
        if "mvm" in self.losses:
            num_codes = self.tokenizer.quantizer.num_codes if self.tokenizer is not None else \
                int((tokenizer_kwargs or {}).get("num_codes", 9420))
            self.mvm_head = nn.Linear(dim, num_codes)
            self.mvm_head.apply(init_vit_weights)

    def _build_text(self, text: dict[str, Any], pretrained: str, vocab_size: int
                    ) -> BertTextEncoder:
        """The text encoder: a local BERT folder (its first ``text_layers`` layers), or a BERT
        of the given sizes from scratch over the (truncated) vocabulary."""
        if pretrained:
            encoder = BertTextEncoder.from_pretrained(
                text_model_path(pretrained), fusion_layers=0,
                text_layers=text.pop("text_layers", None))
            if text:
                raise ValueError(f"text={sorted(text)}: a pretrained text model ({pretrained}) "
                                 "brings its own sizes; only text_layers can be set")
            if self.text_vocab_ids:
                encoder.keep_tokens(self.text_vocab_ids)
            return encoder.train()
        text["vocab_size"] = len(self.text_vocab_ids) if self.text_vocab_ids else vocab_size
        text.setdefault("fusion_layers", 0)
        return BertTextEncoder(**text)

    # ---- building blocks ------------------------------------------------------------------
    @property
    def temperature(self) -> torch.Tensor | float:
        """VTC temperature (learnable when VTC is trained; 1 otherwise: plain cosine)."""
        if self.log_temperature is None:
            return 1.0
        return self.log_temperature.exp().clamp(0.001, 0.5)

    def video_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """Frame grids through EdgeNeXt, projected: B x T*h*w x dim (+ frame embedding)."""
        if video.dim() == 4:
            video = video.unsqueeze(1)
        tokens = self.video_proj(self.video_encoder(video))
        if self.frame_embed is not None:
            frames = video.shape[1]
            if frames > self.frame_embed.shape[0]:
                raise ValueError(f"{frames} frames; this model's frame embedding has "
                                 f"max_frames={self.frame_embed.shape[0]}")
            per_frame = tokens.shape[1] // frames
            tokens = tokens + self.frame_embed[:frames].repeat_interleave(per_frame, dim=0)
        return tokens

    def text_tokens(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Caption through the small BERT, projected: B x L x dim."""
        return self.text_proj(self.text_encoder(text_ids, text_mask))

    def decode(self, text: torch.Tensor | None, text_mask: torch.Tensor | None,
               video: torch.Tensor | None) -> torch.Tensor:
        """The decoder over ``[CLS; text + t_L; video + t_V]`` (either part may be None):
        B x (1 + L + N) x dim, normed."""
        parts, masks = [], []
        batch = (text if text is not None else video).shape[0]
        reference = text if text is not None else video
        parts.append(self.token_types.cls.to(reference.dtype).expand(batch, -1, -1))
        masks.append(torch.ones(batch, 1, dtype=torch.bool, device=reference.device))
        if text is not None:
            parts.append(self.token_types(text, TEXT))
            masks.append(text_mask.bool())
        if video is not None:
            parts.append(self.token_types(video.to(reference.dtype), VIDEO))
            masks.append(torch.ones(video.shape[:2], dtype=torch.bool, device=video.device))
        x = torch.cat(parts, dim=1)
        key_mask = torch.cat(masks, dim=1) if text is not None else None
        for block in self.decoder:
            x = block(x, key_mask)
        return self.decoder_norm(x)

    def pool(self, decoded: torch.Tensor) -> torch.Tensor:
        """The pooler: tanh(Linear([CLS] output)), B x dim."""
        return torch.tanh(self.pooler(decoded[:, 0]))

    # ---- contract -------------------------------------------------------------------------
    def encode_video(self, video: torch.Tensor) -> VideoFeatures:
        """Projected EdgeNeXt tokens, and the pooled video-only decoder pass as embedding."""
        tokens = self.video_tokens(video)
        embedding = F.normalize(self.pool(self.decode(None, None, tokens)), dim=-1)
        return VideoFeatures(tokens=tokens, embedding=embedding)

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        """Projected BERT tokens, and the pooled text-only decoder pass as embedding."""
        tokens = self.text_tokens(text_ids, text_mask)
        embedding = F.normalize(self.pool(self.decode(tokens, text_mask, None)), dim=-1)
        return TextFeatures(tokens=tokens, mask=text_mask, embedding=embedding)

    def fused_cls(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """Pooled output of the joint decoder pass: B x dim (what VTM and a QA head read)."""
        return self.pool(self.decode(text.tokens, text.mask, video.tokens))

    def match(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """VTM log-odds of each row-aligned pair: B, float32."""
        fused = self.fused_cls(video, text)
        with full_precision(fused.device):
            return self.vtm_head(fused.float()).squeeze(-1)

    def forward_joint(self, video: torch.Tensor, text_ids: torch.Tensor,
                      text_mask: torch.Tensor) -> torch.Tensor:
        """One pass over (clip, caption) pairs, as the paper costs a pair: VTM logits, B."""
        tokens = self.text_tokens(text_ids, text_mask)
        fused = self.pool(self.decode(tokens, text_mask, self.video_tokens(video)))
        return self.vtm_head(fused).squeeze(-1)

    # ---- pre-training ---------------------------------------------------------------------
    def mvm_mask(self, video: torch.Tensor, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """Block-wise mask of each frame's grid cells: B x T*h*w bool (True = masked)."""
        height, width = self.video_encoder.grid(*video.shape[-2:])
        return block_mask(video.shape[0], video.shape[1], (height, width), self.mvm_ratio,
                          min_patches=self.mvm_min_patches, generator=generator,
                          device=video.device)

    def mask_pixels(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``video`` with the pixels of masked grid cells set to zero (black, in the model's
        normalisation)."""
        B, T, C, H, W = video.shape
        height, width = self.video_encoder.grid(H, W)
        cells = mask.reshape(B * T, 1, height, width).to(video.dtype)
        pixels = F.interpolate(cells, size=(H, W), mode="nearest").reshape(B, T, 1, H, W)
        black = renormalize(torch.zeros(1, 1, C, 1, 1, dtype=video.dtype, device=video.device),
                            (0.0,) * C, (1.0,) * C, self.input_mean, self.input_std)
        return video * (1 - pixels) + black * pixels

    def tokenizer_codes(self, video: torch.Tensor) -> torch.Tensor:
        """The frozen tokenizer's code of every grid cell: B x T*h*w (its frames resized so
        that its patch grid equals EdgeNeXt's cell grid, and re-normalised for it)."""
        if self.tokenizer is None:
            raise ValueError("MVM needs the tokenizer's codes: set tokenizer= to released "
                             "tokenizer weights (leanvl pretrain evilm_tokenizer), or leave "
                             "mvm out of losses")
        height, width = self.video_encoder.grid(*video.shape[-2:])
        patch = self.tokenizer.patch_size
        frames = renormalize(video, self.input_mean, self.input_std, self.tokenizer.input_mean,
                             self.tokenizer.input_std)
        if frames.shape[-2:] != (height * patch, width * patch):
            flat = F.interpolate(frames.flatten(0, 1).float(), size=(height * patch, width * patch),
                                 mode="bicubic", align_corners=False)
            frames = flat.reshape(*video.shape[:3], height * patch, width * patch)
        return self.tokenizer.codes(frames.to(video.dtype)).flatten(1)

    def pretrain_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{vtm, mlm, mvm}`` (and ``vtc``) by ``self.losses`` (eq. 8, weights 1 unless
        configured). VTM and MLM see the clip MVM masked: one EdgeNeXt pass per step."""
        video = batch["video"]
        if video.dim() == 4:
            video = video.unsqueeze(1)
        ids, text_mask = batch["text_ids"], batch["text_mask"]
        losses: dict[str, torch.Tensor] = {}
        mask = None
        if "mvm" in self.losses:
            targets = self.tokenizer_codes(video)
            mask = self.mvm_mask(video)
            video = self.mask_pixels(video, mask)
        video_tokens = self.video_tokens(video)
        text_tokens = self.text_tokens(ids, text_mask)
        video_feats = VideoFeatures(tokens=video_tokens, embedding=video_tokens[:, 0])
        text_feats = TextFeatures(tokens=text_tokens, mask=text_mask, embedding=text_tokens[:, 0])
        pair_ids = batch.get("index")
        similarity = None
        if "vtc" in self.losses:
            video_embedding = F.normalize(self.pool(self.decode(None, None, video_tokens)), dim=-1)
            text_embedding = F.normalize(self.pool(self.decode(text_tokens, text_mask, None)),
                                         dim=-1)
            losses["vtc"] = vtc_loss(video_embedding, text_embedding, self.temperature,
                                     ids=pair_ids)
            similarity = (video_embedding @ text_embedding.t()).detach()
        if "vtm" in self.losses or "mvm" in self.losses:
            joint = self.decode(text_tokens, text_mask, video_tokens)
            if "mvm" in self.losses:
                video_out = joint[:, 1 + text_tokens.shape[1]:]
                logits = self.mvm_head(video_out[mask])
                losses["mvm"] = F.cross_entropy(logits.float(), targets[mask])
            if "vtm" in self.losses:
                size = video_tokens.shape[0]
                # negatives by the unimodal similarity when VTC trains it (hard), else uniform
                scores = similarity if similarity is not None else \
                    torch.zeros(size, size, device=video_tokens.device)
                negative_text, negative_video = sample_hard_negatives(scores, ids=pair_ids)
                positive = self.vtm_head(self.pool(joint).float()).squeeze(-1)
                # one negative per positive (balanced classes, one more decoder pass): the
                # first half of the batch gets a wrong caption, the second half a wrong clip
                rows = torch.arange(size, device=video_tokens.device)
                first = rows < size // 2
                video_rows = torch.where(first, rows, negative_video)
                text_rows = torch.where(first, negative_text, rows)
                negatives = self.match(video_feats.index(video_rows), text_feats.index(text_rows))
                losses["vtm"] = vtm_loss(positive, negatives)
        if "mlm" in self.losses:
            special = [self.specials[k] for k in ("pad", "cls", "sep", "mask", "unk")]
            masked_ids, labels = mask_tokens(ids, text_mask, self.text_encoder.config.vocab_size,
                                             self.specials["mask"], special, self.mlm_ratio)
            masked_text = self.text_tokens(masked_ids, text_mask)
            out = self.decode(masked_text, text_mask, video_tokens)[:, 1:1 + ids.shape[1]]
            predicted = labels != -100
            losses["mlm"] = mlm_loss(self.mlm_head(out[predicted]), labels[predicted])
        return losses

    # ---- engine hooks ---------------------------------------------------------------------
    def release_config(self) -> tuple[dict[str, Any], tuple[str, ...]]:
        """Released weights leave out the tokenizer and the MVM head (pre-training only);
        continuing MVM pre-training from them means passing ``tokenizer=`` again."""
        kwargs = dict(getattr(self, "registry_kwargs", {}))
        excluded: tuple[str, ...] = ()
        if self.tokenizer is not None or "mvm" in self.losses:
            kwargs.pop("tokenizer", None)
            kwargs.pop("tokenizer_kwargs", None)
            kwargs["losses"] = [name for name in self.losses if name != "mvm"]
            excluded = ("tokenizer.", "mvm_head.")
        return kwargs, excluded

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay besides biases and norms."""
        names = {"token_types.cls", "token_types.types.weight"}
        if self.frame_embed is not None:
            names.add("frame_embed")
        if self.log_temperature is not None:
            names.add("log_temperature")
        return names

    def parameter_table(self) -> dict[str, int]:
        """Parameters by the rows of the paper's Table 8 (pre-training heads apart)."""
        def count(*modules: nn.Module | nn.Parameter | None) -> int:
            total = 0
            for module in modules:
                if isinstance(module, nn.Parameter):
                    total += module.numel()
                elif module is not None:
                    total += sum(p.numel() for p in module.parameters())
            return total

        rows = {
            "text embedding": count(self.text_encoder.embeddings),
            "text encoder": count(self.text_encoder.encoder),
            "text MLP": count(self.text_proj),
            "token type": count(self.token_types, self.frame_embed),
            "visual encoder": count(self.video_encoder),
            "visual MLP": count(self.video_proj),
            "decoder": count(self.decoder, self.decoder_norm),
            "pooler": count(self.pooler),
        }
        rows["total"] = sum(rows.values())
        heads = [self.vtm_head, getattr(self, "mvm_head", None), self.log_temperature]
        # the MLM head's decoder is the word-embedding matrix itself: count what it adds
        mlm_own = count(self.mlm_head) - self.text_encoder.embeddings.word_embeddings.weight.numel()
        rows["pre-training heads (VTM, MLM, MVM, not in total)"] = count(*heads) + mlm_own
        return rows

    def layer_id(self, name: str) -> int:
        """Depth for layer-wise lr decay: EdgeNeXt stage i -> i + 1, decoder block j -> 5 + j."""
        if name.startswith("video_encoder.backbone.stem"):
            return 0
        if name.startswith("video_encoder.backbone.stages."):
            return int(name.split(".")[3]) + 1
        if name.startswith("decoder."):
            return 5 + int(name.split(".")[1])
        return self.num_layers + 1

    @property
    def num_layers(self) -> int:
        """Layers counted by ``layer_id``: 4 EdgeNeXt stages and the decoder blocks."""
        return 4 + len(self.decoder)


EVILM_SIZES: dict[str, dict[str, Any]] = {
    # Table 8: EdgeNeXt-small, BERT 128-wide / 4 heads / 12 layers (2.4M), decoder 4 x 384
    "paper": {"vision": {"name": "edgenext_small"},
              "text": {"hidden_size": 128, "text_layers": 12, "num_heads": 4,
                       "intermediate_size": 512, "max_positions": 512},
              "dim": 384, "depth": 4, "num_heads": 6, "frame_embedding": False},
    # EdgeNeXt-xx-small with one block per stage but the third (3 instead of 2, 2, 6, 2): on
    # 2 CPU cores its 7 x 7 depthwise convolutions make the full model's step ~4x slower
    "tiny": {"vision": {"name": "edgenext_xx_small", "depths": [1, 1, 3, 1]},
             "text": {"hidden_size": 128, "text_layers": 2, "num_heads": 4,
                      "intermediate_size": 512, "max_positions": 64},
             "dim": 192, "depth": 2, "num_heads": 3, "frame_embedding": True},
}


def _evilm(size: str, vision: dict | None, text: dict | None, **kwargs: Any) -> EViLM:
    spec = {**EVILM_SIZES[size], **kwargs}
    spec["vision"] = {**spec["vision"], **(vision or {})}
    spec["text"] = {**spec["text"], **(text or {})} if not kwargs.get("text_pretrained") \
        else dict(text or {})
    return EViLM(**spec)


@register_model("evilm")
def evilm(vision: dict | None = None, text: dict | None = None, **kwargs: Any) -> EViLM:
    """E-ViLM at paper size (16.3M parameters, Table 8): EdgeNeXt-small, 12-layer 128-wide
    BERT over 30% of the WordPiece vocabulary, 4-block 384-wide decoder."""
    return _evilm("paper", vision, text, **kwargs)


@register_model("evilm_tiny")
def evilm_tiny(vision: dict | None = None, text: dict | None = None, **kwargs: Any) -> EViLM:
    """CPU-sized E-ViLM: a shallower EdgeNeXt-xx-small, 2-layer 128-wide BERT, 2-block
    192-wide decoder, with a learned frame embedding."""
    return _evilm("tiny", vision, text, **kwargs)
