"""Vision Transformer pieces for video: 3D patch embedding, sine-cosine table, blocks, VideoViT.

``VideoViT`` is UMT's student backbone: a vanilla ViT without [CLS], patch 1 x 16 x 16 (no
temporal downsampling), joint space-time attention over T*(H/16)*(W/16) tokens and a fixed
1-D sine-cosine table over the flattened (t, h, w) index. Masked tokens are dropped before
the blocks, so the cost scales with the visible tokens only.

Parameter names follow UMT's official ``encoder.*`` keys one to one (without the prefix):
``patch_embed.proj``, ``blocks.N.{norm1, attn.q_bias, attn.v_bias, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2}``, ``norm``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from leanvl.nn.attention import Attention, AttentionRows, DropPath, Mlp

#: named sizes: tiny for CPU tests, B/16 and L/16 as in the UMT paper
VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"dim": 192, "depth": 4, "num_heads": 3, "mlp_dim": 768},
    "b16": {"dim": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072},
    "l16": {"dim": 1024, "depth": 24, "num_heads": 16, "mlp_dim": 4096},
}


def sincos_table(num_positions: int, dim: int) -> torch.Tensor:
    """Fixed 1-D sine-cosine table, ``num_positions x dim``; column 2i = sin, 2i+1 = cos.

    Entry (p, j) is sin / cos of p / 10000^(2*(j//2)/dim), as the Transformer paper and UMT's
    ``get_sinusoid_encoding_table``. Computed in float64 (as UMT does in numpy) so that large
    positions keep their precision, then returned as float32.
    """
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim
    angles = position / torch.pow(10000.0, exponent)[None, :]
    table = torch.empty(num_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float()


def resample_position_table(table: torch.Tensor, grid: Sequence[int],
                            new_grid: Sequence[int]) -> torch.Tensor:
    """A position table over a (t, h, w) token grid resampled to another grid, as UMT's code
    does: bicubic in space first, then linear in time (both ``align_corners=False``), in
    float32. ``table`` is N x D or 1 x N x D (t-major); returns 1 x N' x D."""
    t, h, w = (int(v) for v in grid)
    new_t, new_h, new_w = (int(v) for v in new_grid)
    dim = table.shape[-1]
    if table.numel() != t * h * w * dim:
        raise ValueError(f"a position table of shape {tuple(table.shape)} is not over a "
                         f"{t}x{h}x{w} grid")
    x = table.reshape(t, h, w, dim).float()
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(new_h, new_w), mode="bicubic",
                          align_corners=False).permute(0, 2, 3, 1)
    if new_t != t:
        x = x.permute(1, 2, 3, 0).reshape(new_h * new_w, dim, t)
        x = F.interpolate(x, size=new_t, mode="linear", align_corners=False)
        x = x.reshape(new_h, new_w, dim, new_t).permute(3, 0, 1, 2)
    return x.reshape(1, new_t * new_h * new_w, dim)


def init_vit_weights(module: nn.Module) -> None:
    """ViT / VideoMAE / UMT initialisation, for ``model.apply``: truncated normal (std 0.02)
    Linear and patch-conv weights with zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear | nn.Conv2d | nn.Conv3d):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class PatchEmbed3D(nn.Module):
    """Conv3d patchify with kernel = stride = (tubelet, patch, patch): video -> B x N x D."""

    def __init__(self, patch_size: int = 16, tubelet_size: int = 1, in_chans: int = 3,
                 dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=kernel)

    def grid(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid (t, h, w) for a clip of this size; raises if it does not tile exactly."""
        p, q = self.patch_size, self.tubelet_size
        if height % p or width % p or num_frames % q:
            raise ValueError(f"clip {num_frames}x{height}x{width} is not divisible into "
                             f"{q}x{p}x{p} patches")
        return num_frames // q, height // p, width // p

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """B x T x C x H x W (the project's layout) -> B x (t*h*w) x D, t-major order."""
        self.grid(video.shape[1], video.shape[3], video.shape[4])
        x = self.proj(video.transpose(1, 2))  # Conv3d wants B x C x T x H x W
        return x.flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), with drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int | None = None,
                 qkv_bias: str | bool = "qv", drop_path: float = 0.0, norm_eps: float = 1e-6,
                 attn_drop: float = 0.0, proj_drop: float = 0.0,
                 act_layer: Callable[[], nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim or 4 * dim, act_layer=act_layer, drop=proj_drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                attention_rows: AttentionRows = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """B x N x D -> B x N x D; with ``attention_rows`` also the head-mean attention rows."""
        out = self.attn(self.norm1(x), key_mask, attention_rows)
        weights = None
        if attention_rows is not None:
            out, weights = out
        x = x + self.drop_path(out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x if weights is None else (x, weights)


class VideoViT(nn.Module):
    """UMT's student ViT: no [CLS], 1x16x16 patches, joint space-time attention, sincos table.

    ``forward(video, mask)`` takes B x T x 3 x H x W (or B x 3 x H x W, a one-frame video) and an
    optional bool mask B x N (True = masked, N = T*(H/p)*(W/p), t-major as ``masking.py``) with
    the same number of masked tokens in every sample; masked tokens are removed before the
    first block.

    Position table (``position_table``), three ways, as UMT's code has them:

    - default: the 1-D table simply runs over the actual T*h*w tokens (pre-training, and
      stage 2's ``ckpt_num_frame=-1``); other frame counts and sizes just index further.
    - ``table_frames`` / ``table_patches`` set: the table is built for that grid (time steps,
      patches per side; an unset one follows the input) and resampled to the input's grid,
      bicubic in space and linear in time (UMT's classifiers: 8 x 14 x 14; stage 2's
      ``ckpt_num_frame``).
    - ``stored_table``: a ``pos_embed`` buffer over the ``table_frames`` x ``table_patches``
      grid (from a checkpoint, e.g. UMT's 16-frame or 384 px classifiers) is used as is on
      that grid and resampled the same way on another one.

    A one-frame input (an image) takes the first time step of the table, as UMT's
    ``img_pos_embed``; it is never resampled in time.
    """

    def __init__(self, dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_dim: int | None = None, patch_size: int = 16, tubelet_size: int = 1,
                 in_chans: int = 3, qkv_bias: str | bool = "qv", drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6, final_norm: bool = True,
                 activation_checkpointing: bool = False, table_frames: int | None = None,
                 table_patches: int | Sequence[int] | None = None,
                 stored_table: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.table_frames = int(table_frames) if table_frames else None
        if isinstance(table_patches, int):
            table_patches = (table_patches, table_patches)
        self.table_patches = tuple(int(v) for v in table_patches) if table_patches else None
        if stored_table and (self.table_frames is None or self.table_patches is None):
            raise ValueError("stored_table needs the grid it was made for: table_frames and "
                             "table_patches")
        self.depth = depth
        self.num_heads = num_heads
        self.activation_checkpointing = activation_checkpointing
        self.patch_embed = PatchEmbed3D(patch_size, tubelet_size, in_chans, dim)
        # Stochastic depth grows linearly with depth, as in DeiT / VideoMAE / UMT.
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_dim, qkv_bias, rates[i], norm_eps) for i in range(depth))
        # UMT's fine-tuned classifiers drop the final norm for a mean-pooled fc_norm.
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if final_norm else nn.Identity()
        self._tables: dict[tuple, torch.Tensor] = {}
        self.apply(init_vit_weights)
        if stored_table:
            # a buffer, not a parameter: UMT's classifiers add it detached, so it never trains
            grid = (self.table_frames, *self.table_patches)
            self.register_buffer("pos_embed", self._sincos(grid))
        else:
            self.pos_embed = None

    @classmethod
    def from_size(cls, size: str, **overrides) -> VideoViT:
        """A VideoViT of a named size (``tiny``, ``b16``, ``l16``), with keyword overrides."""
        if size not in VIT_SIZES:
            raise ValueError(f"unknown VideoViT size '{size}' (sizes: {', '.join(VIT_SIZES)})")
        return cls(**{**VIT_SIZES[size], **overrides})

    def _sincos(self, grid: Sequence[int]) -> torch.Tensor:
        """The 1-D table over a grid's tokens, 1 x N x D."""
        return sincos_table(int(grid[0]) * int(grid[1]) * int(grid[2]), self.dim)[None]

    def table_grid(self, grid: Sequence[int]) -> tuple[int, int, int]:
        """The grid the position table is made for, given an input's token grid."""
        t, h, w = grid
        return (self.table_frames or t, *(self.table_patches or (h, w)))

    def position_table(self, grid: Sequence[int], device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor:
        """The 1 x N x D position table for an input's token grid (t, h, w); see the class
        docstring. Sine-cosine tables are cached per (grid, device, dtype)."""
        grid = tuple(int(v) for v in grid)
        if device.type == "meta":
            return torch.empty(1, grid[0] * grid[1] * grid[2], self.dim, device=device,
                               dtype=dtype)
        source = self.table_grid(grid)
        if grid[0] == 1 and source[0] != 1:  # images: the first time step, as img_pos_embed
            source = (1, *source[1:])
        if self.pos_embed is not None:
            stored = self.pos_embed[:, : source[0] * source[1] * source[2]]
            if source == grid:
                return stored.to(device, dtype)
            return resample_position_table(stored, source, grid).to(device, dtype)
        key = (grid, device, dtype)
        if key not in self._tables:
            table = self._sincos(source)
            if source != grid:
                table = resample_position_table(table, source, grid)
            self._tables[key] = table.to(device, dtype)
        return self._tables[key]

    def embed(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Patchify, add the position table and drop masked tokens: B x N_visible x D."""
        if video.dim() == 4:
            video = video.unsqueeze(1)
        if video.dim() != 5:
            raise ValueError(f"video must be B x T x C x H x W, got shape {tuple(video.shape)}")
        x = self.patch_embed(video)
        B, N, D = x.shape
        grid = self.patch_embed.grid(video.shape[1], video.shape[3], video.shape[4])
        x = x + self.position_table(grid, x.device, x.dtype)
        if mask is None:
            return x
        if mask.shape != (B, N) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape ({B}, {N}), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        visible = (~mask).sum(dim=1)
        if x.device.type != "meta" and bool((visible != visible[0]).any()):
            raise ValueError(f"every sample must keep the same number of tokens, got "
                             f"{visible.tolist()}")
        return x[~mask].reshape(B, -1, D)

    def _run_block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def forward_features(self, video: torch.Tensor, mask: torch.Tensor | None = None,
                         return_layers: int = 0, norm_layers: bool = True,
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final (normed) tokens and the outputs of the last ``return_layers`` blocks, in order.

        With ``norm_layers`` the block outputs go through the shared final ``norm`` too, as UMT's
        student does before its per-layer alignment heads.
        """
        if not 0 <= return_layers <= self.depth:
            raise ValueError(f"return_layers must be in [0, {self.depth}], got {return_layers}")
        x = self.embed(video, mask)
        layers = []
        for i, block in enumerate(self.blocks):
            x = self._run_block(block, x)
            if i >= self.depth - return_layers:
                layers.append(x)
        if norm_layers:
            layers = [self.norm(layer) for layer in layers]
        return self.norm(x), layers

    def forward(self, video: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """B x T x C x H x W (+ mask B x N) -> B x N_visible x D final tokens."""
        return self.forward_features(video, mask)[0]


class AlignmentHead(nn.Module):
    """Linear to a teacher's dimension, then LayerNorm there: one of UMT's ``clip_decoder``s.

    The official checkpoint stores ``clip_decoder.i.head`` (D -> teacher dim) and
    ``clip_decoder.i.norm`` over the teacher dim, so the norm comes after the Linear.
    """

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.head = nn.Linear(dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.head(x))


class PooledClassifier(nn.Module):
    """Mean over tokens -> LayerNorm (UMT's ``fc_norm``) -> dropout -> Linear ``head``."""

    def __init__(self, dim: int, num_classes: int, norm_eps: float = 1e-6,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """B x N x D tokens -> B x num_classes logits."""
        return self.head(self.dropout(self.norm(tokens.mean(dim=1))))


def num_tokens(num_frames: int, image_size: int, patch_size: int = 16,
               tubelet_size: int = 1) -> int:
    """Tokens of a VideoViT input: (T / tubelet) * (size / patch)^2."""
    return (num_frames // tubelet_size) * (image_size // patch_size) ** 2

