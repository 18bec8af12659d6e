"""A small image-text CLIP trained with VTC on single frames.

No CLIP weights exist offline, so the demo first trains this model on frames of the synthetic
benchmark and exports its image tower in OpenAI CLIP naming; UMT then loads that file as its
teacher exactly as it would load OpenAI's ViT-B/16. With real CLIP weights this step is skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanvl.losses import vtc_loss
from leanvl.models.base import TextFeatures, VideoFeatures, VideoLanguageModel, text_model_path
from leanvl.models.registry import register_model
from leanvl.models.teachers import CLIP_SIZES, CLIPVisionTeacher
from leanvl.nn.text import BertTextEncoder


class ImageTextCLIP(VideoLanguageModel):
    """CLIP image tower (OpenAI layout) + BERT text tower, contrastive over single frames.

    A video's embedding is the mean of its frame embeddings; ``match`` is the dual-encoder
    score (CLIP has no cross-encoder), so re-ranking leaves the order unchanged.
    """

    def __init__(self, vision: dict[str, Any], text: dict[str, Any], embed_dim: int = 128,
                 temperature: float = 0.07, text_pretrained: str = "",
                 text_vocab_ids: list[int] | None = None):
        super().__init__()
        self.visual = CLIPVisionTeacher(**vision, output_dim=embed_dim)
        self.visual.requires_grad_(True)  # a teacher freezes itself; here it is being trained
        self.text_vocab_ids = [int(i) for i in text_vocab_ids] if text_vocab_ids else None
        if text_pretrained:  # a local BERT folder, or "minilm" (offline)
            self.text_encoder = BertTextEncoder.from_pretrained(
                text_model_path(text_pretrained), fusion_layers=0,
                text_layers=text.get("text_layers") if text else None)
            if self.text_vocab_ids:
                self.text_encoder.keep_tokens(self.text_vocab_ids)
        else:
            vocab = {"vocab_size": len(self.text_vocab_ids)} if self.text_vocab_ids else {}
            self.text_encoder = BertTextEncoder(**{**text, **vocab}, fusion_layers=0)
        self.text_proj = nn.Linear(self.text_encoder.hidden_size, embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(float(temperature)).log())
        self.embed_dim = embed_dim

    @property
    def temperature(self) -> torch.Tensor:
        """Learnable temperature, clamped to [0.001, 0.5]."""
        return self.log_temperature.exp().clamp(0.001, 0.5)

    def encode_video(self, video: torch.Tensor) -> VideoFeatures:
        """Per-frame CLIP embeddings (tokens, B x T x E) and their normalised mean."""
        if video.dim() == 4:
            video = video.unsqueeze(1)
        frames = self.visual.encode_image(video.flatten(0, 1)).view(video.shape[0], video.shape[1], -1)
        frames = F.normalize(frames, dim=-1)
        return VideoFeatures(tokens=frames, embedding=F.normalize(frames.mean(dim=1), dim=-1))

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> TextFeatures:
        """Projected, normalised [CLS] of the text tower."""
        tokens = self.text_encoder(text_ids, text_mask)
        return TextFeatures(tokens, text_mask, F.normalize(self.text_proj(tokens[:, 0]), dim=-1))

    def match(self, video: VideoFeatures, text: TextFeatures) -> torch.Tensor:
        """The dual-encoder score of row-aligned pairs (no cross-encoder in CLIP)."""
        return (video.embedding * text.embedding).sum(-1) / self.temperature

    def pretrain_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """VTC between one frame of each clip and its caption (frames are images to CLIP)."""
        video = batch["video"]
        if video.dim() == 5 and video.shape[1] > 1:
            # one random frame per clip per step: images, as CLIP was trained
            pick = torch.randint(video.shape[1], (video.shape[0],), device=video.device)
            video = video[torch.arange(video.shape[0], device=video.device), pick]
        image = F.normalize(self.visual.encode_image(video.reshape(-1, *video.shape[-3:])), dim=-1)
        text = self.encode_text(batch["text_ids"], batch["text_mask"])
        return {"vtc": vtc_loss(image, text.embedding, self.temperature, ids=batch.get("index"))}

    def no_weight_decay(self) -> set[str]:
        """CLIP's embeddings and temperature are not decayed."""
        return {"log_temperature", "visual.class_embedding", "visual.positional_embedding"}

    def export_teacher(self, path: str | Path) -> Path:
        """Write the image tower in OpenAI CLIP naming (.safetensors) for ``teacher=path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.visual.state_dict().items()}
        save_file(state, str(path))
        return path


@register_model("clip_tiny")
def clip_tiny(vision: dict | None = None, text: dict | None = None, **kwargs) -> ImageTextCLIP:
    """CPU-sized CLIP: ViT 192/4/3 image tower, 2-layer 128-wide BERT text tower."""
    vision = {**{k: v for k, v in CLIP_SIZES["tiny"].items() if k != "output_dim"}, **(vision or {})}
    text = dict(text or {}) if kwargs.get("text_pretrained") else {
        "hidden_size": 128, "text_layers": 2, "num_heads": 2, "intermediate_size": 512,
        "max_positions": 64, **(text or {})}
    return ImageTextCLIP(vision, text, **kwargs)
