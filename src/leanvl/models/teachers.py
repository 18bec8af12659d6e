"""Frozen image teachers for masked video modelling (UMT's unmasked teacher).

A teacher takes a video B x T x 3 x H x W normalised with *its* ``mean`` / ``std`` and returns
a ``TeacherOutput``: the alignment targets of its last K blocks (each B x T*P x D_out, token
order t-major like ``VideoViT``; UMT's targets ``proj(ln_post(x))`` per layer, not
L2-normalised: the loss does that) and the last block's head-averaged [CLS] -> patch attention,
B x T x P (the input of ``masking.semantic_mask``). It runs frame by frame (T folded into the
batch), without gradients, always in eval mode.

``CLIPVisionTeacher`` is OpenAI CLIP's image tower under OpenAI's parameter names, so official
weights load directly; timm's ``vit_*_clip_*`` names are mapped on load.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from leanvl.config import CLIP_MEAN, CLIP_STD
from leanvl.models.checkpoints import (
    CheckpointError,
    convert_clip_visual,
    load_checkpoint_file,
    load_state_dict_strict,
)
from leanvl.nn.attention import AttentionRows, QuickGELU, multi_head_attention

#: named sizes: tiny for CPU tests, CLIP ViT-B/16 (UMT-B's teacher) and ViT-L/14 (UMT-L's)
CLIP_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"width": 192, "layers": 4, "heads": 3, "output_dim": 128, "patch_size": 16,
             "image_size": 224},
    "b16": {"width": 768, "layers": 12, "heads": 12, "output_dim": 512, "patch_size": 16,
            "image_size": 224},
    "l14": {"width": 1024, "layers": 24, "heads": 16, "output_dim": 768, "patch_size": 14,
            "image_size": 224},
}


def renormalize(video: torch.Tensor, from_mean: Sequence[float], from_std: Sequence[float],
                to_mean: Sequence[float], to_std: Sequence[float]) -> torch.Tensor:
    """A video normalised with (from_mean, from_std) re-normalised to (to_mean, to_std)."""
    if tuple(from_mean) == tuple(to_mean) and tuple(from_std) == tuple(to_std):
        return video

    def column(values: Sequence[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=video.dtype, device=video.device)[:, None, None]

    # x_raw = v * s1 + m1; out = (x_raw - m2) / s2 = v * (s1/s2) + (m1 - m2)/s2
    scale = column(from_std) / column(to_std)
    shift = (column(from_mean) - column(to_mean)) / column(to_std)
    return video * scale + shift


@dataclass
class TeacherOutput:
    """Alignment targets of the teacher's last K blocks and its last block's [CLS] attention."""

    layers: list[torch.Tensor]  # K tensors, each B x T*P x D_out, in block order
    attention: torch.Tensor  # B x T x P, head-averaged [CLS] -> patch weights


class VideoTeacher(nn.Module):
    """Interface of a frozen image teacher applied frame by frame; subclasses build the network."""

    #: input normalisation the teacher expects (RGB, 0-1 scale)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    #: dimension of the alignment targets, patch size and default number of returned layers
    out_dim: int
    patch_size: int
    return_layers: int

    def freeze(self) -> VideoTeacher:
        """No gradients, eval mode; ``train()`` is a no-op from then on."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> VideoTeacher:
        # A teacher never trains: its dropout / norm statistics must not change with the
        # student's ``model.train()``.
        return super().train(False)

    def renormalize(self, video: torch.Tensor, from_mean: Sequence[float],
                    from_std: Sequence[float]) -> torch.Tensor:
        """A video normalised with (from_mean, from_std) re-normalised for this teacher."""
        return renormalize(video, from_mean, from_std, self.mean, self.std)

    def forward(self, video: torch.Tensor, return_layers: int | None = None) -> TeacherOutput:
        raise NotImplementedError


class CLIPAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameter layout (in_proj_*, out_proj) computed through SDPA."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, attention_rows: AttentionRows = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out, weights = multi_head_attention(q, k, v, attention_rows=attention_rows)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D)), weights


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's pre-norm block: ln_1 / attn / ln_2 / mlp.{c_fc, c_proj}."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, act: str = "quick_gelu",
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = CLIPAttention(dim, num_heads)
        self.ln_2 = nn.LayerNorm(dim, eps=norm_eps)
        activation = {"quick_gelu": QuickGELU, "gelu": nn.GELU}[act]
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(dim, mlp_dim)), ("gelu", activation()),
            ("c_proj", nn.Linear(mlp_dim, dim))]))

    def forward(self, x: torch.Tensor, attention_rows: AttentionRows = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, weights = self.attn(self.ln_1(x), attention_rows)
        x = x + out
        return x + self.mlp(self.ln_2(x)), weights


class CLIPTransformer(nn.Module):
    """Holds ``resblocks`` so parameter names match OpenAI's ``transformer.resblocks.N``."""

    def __init__(self, blocks: list[ResidualAttentionBlock]) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(blocks)


class CLIPVisionTeacher(VideoTeacher):
    """OpenAI CLIP ViT image tower as a frozen, frame-by-frame teacher (UMT).

    ``act`` is ``quick_gelu`` for OpenAI's weights (``gelu`` for timm / open_clip towers trained
    with exact GELU). ``output_dim=None`` means no visual projection (targets = ln_post(x)).
    Other input sizes than ``image_size`` interpolate the position embedding bicubically (as
    UMT does for its L/14 teacher at 196 px).
    """

    def __init__(self, width: int = 768, layers: int = 12, heads: int = 12,
                 output_dim: int | None = 512, patch_size: int = 16, image_size: int = 224,
                 mlp_dim: int | None = None, return_layers: int | None = None,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 act: str = "quick_gelu", norm_eps: float = 1e-5) -> None:
        super().__init__()
        # UMT aligns the last 6 layers; smaller (test) teachers return all of theirs.
        return_layers = min(6, layers) if return_layers is None else return_layers
        if not 1 <= return_layers <= layers:
            raise ValueError(f"return_layers must be in [1, {layers}], got {return_layers}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch_size}")
        self.width = width
        self.patch_size = patch_size
        self.image_size = image_size
        self.return_layers = return_layers
        self.out_dim = output_dim or width
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.act = act
        grid = image_size // patch_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width, eps=norm_eps)
        self.transformer = CLIPTransformer([
            ResidualAttentionBlock(width, heads, mlp_dim or 4 * width, act, norm_eps)
            for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width, eps=norm_eps)
        if output_dim:
            self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        else:
            self.register_parameter("proj", None)
        self.freeze()

    @classmethod
    def from_size(cls, size: str, **overrides: Any) -> CLIPVisionTeacher:
        """A randomly initialised teacher of a named size (``tiny``, ``b16``, ``l14``)."""
        if size not in CLIP_SIZES:
            raise ValueError(f"unknown CLIP size '{size}' (sizes: {', '.join(CLIP_SIZES)})")
        return cls(**{**CLIP_SIZES[size], **overrides})

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], source: str = "state dict",
                        **overrides: Any) -> CLIPVisionTeacher:
        """Build a teacher whose size is read off the weights (OpenAI or timm names), then load."""
        state = convert_clip_visual(state_dict)
        try:
            conv = state["conv1.weight"]
            layers = 1 + max(int(key.split(".")[2]) for key in state
                             if key.startswith("transformer.resblocks."))
            width, patch = conv.shape[0], conv.shape[-1]
            grid = round((state["positional_embedding"].shape[0] - 1) ** 0.5)
            mlp_dim = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{source}: not a CLIP visual tower (missing {error})") from None
        proj = state.get("proj")
        # CLIP's towers all use 64-dim heads; pass heads= for one that does not.
        config = {"width": width, "layers": layers, "heads": max(width // 64, 1),
                  "output_dim": None if proj is None else proj.shape[1], "patch_size": patch,
                  "image_size": grid * patch, "mlp_dim": mlp_dim}
        teacher = cls(**{**config, **overrides})
        load_state_dict_strict(teacher, state, source)
        return teacher

    @classmethod
    def from_file(cls, path: str | Path, allow_pickle: bool = False,
                  **overrides: Any) -> CLIPVisionTeacher:
        """Load a teacher from .pt/.pth/.bin/.safetensors (OpenAI, full CLIP or timm names)."""
        checkpoint = load_checkpoint_file(path, allow_pickle=allow_pickle)
        return cls.from_state_dict(checkpoint, source=str(path), **overrides)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # Accept UMT's inflated 1 x p x p patch conv as well as OpenAI's 2-D one.
        key = prefix + "conv1.weight"
        weight = state_dict.get(key)
        if weight is not None and weight.dim() == 5 and weight.shape[2] == 1:
            state_dict[key] = weight[:, :, 0]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """(1 + h*w) x D position embedding for an h x w patch grid (bicubic if resized)."""
        pos = self.positional_embedding
        grid = self.image_size // self.patch_size
        if (height, width) == (grid, grid):
            return pos
        patches = pos[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2).float()
        patches = F.interpolate(patches, size=(height, width), mode="bicubic",
                                align_corners=False)
        patches = patches.permute(0, 2, 3, 1).reshape(height * width, -1).to(pos.dtype)
        return torch.cat([pos[:1], patches])

    def tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[CLS] + patch tokens after ln_pre (B x (1 + h*w) x D) and the patch grid (h, w)."""
        x = self.conv1(images.to(self.conv1.weight.dtype))
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding(h, w).to(x.dtype)
        return self.ln_pre(x), (h, w)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding ``ln_post(x[CLS]) @ proj`` (B x out_dim), with gradients.

        Used to train a small CLIP when no pretrained weights are at hand (the demo).
        """
        x, _ = self.tokens(images)
        for block in self.transformer.resblocks:
            x, _ = block(x)
        x = self.ln_post(x[:, 0])
        return x @ self.proj if self.proj is not None else x

    @torch.no_grad()
    def forward(self, video: torch.Tensor, return_layers: int | None = None) -> TeacherOutput:
        """Video B x T x 3 x H x W (or an image batch B x 3 x H x W) -> targets and attention."""
        if video.dim() == 4:
            video = video.unsqueeze(1)
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be B x T x 3 x H x W, got shape {tuple(video.shape)}")
        count = return_layers or self.return_layers
        blocks = self.transformer.resblocks
        if not 1 <= count <= len(blocks):
            raise ValueError(f"return_layers must be in [1, {len(blocks)}], got {count}")
        B, T = video.shape[:2]
        x, (h, w) = self.tokens(video.flatten(0, 1))
        outputs = []
        weights = None
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1
            # Only the last block's [CLS] row of attention is computed explicitly.
            x, block_weights = block(x, attention_rows=0 if last else None)
            if last:
                weights = block_weights
            if i >= len(blocks) - count:
                outputs.append(x[:, 1:])
        targets = self.ln_post(torch.stack(outputs))
        if self.proj is not None:
            targets = targets @ self.proj.to(targets.dtype)
        targets = targets.reshape(count, B, T * h * w, -1)
        attention = weights[:, 0, 1:].reshape(B, T, h * w)
        return TeacherOutput(list(targets.unbind(0)), attention)
