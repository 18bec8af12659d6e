"""MAE pieces: patch-pixel targets and a light pixel decoder (He et al.; SMAUG's ``D_v``).

``MAEDecoder`` is linear -> ``depth`` transformer blocks -> linear. It takes what the encoder
returned for one frame (or image): the tokens, and for each token its patch index on the grid
(``positions``; negative for tokens that are not patches, such as [CLS] and the fused tokens of
``sparsify.keep_and_fuse``, which must come first). Every grid position the encoder did not
return (masked, or removed by sparsification) gets the learned mask token; the grid gets a
fixed sine-cosine table; the non-patch tokens go along as extra context without a position.
The output is a prediction of every patch's pixels; the loss (``losses.pixel_reconstruction_loss``)
decides which patches count.
"""

from __future__ import annotations

import torch
from torch import nn

from leanvl.nn.vit import Block, init_vit_weights, sincos_table


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """B x C x H x W -> B x (H/p * W/p) x (p * p * C): each patch's pixels, patches row-major as
    a patch convolution flattens them, pixels in (row, column, channel) order within a patch."""
    if images.dim() != 4:
        raise ValueError(f"images must be B x C x H x W, got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image {H}x{W} is not divisible into {patch_size}-pixel patches")
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, C, h, patch_size, w, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, patch_size * patch_size * C)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int,
               channels: int = 3) -> torch.Tensor:
    """The inverse of ``patchify``: B x P x (p * p * C) -> B x C x H x W."""
    B = patches.shape[0]
    h, w = height // patch_size, width // patch_size
    x = patches.reshape(B, h, w, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, height, width)


class MAEDecoder(nn.Module):
    """Linear ``embed`` -> ``depth`` pre-norm blocks over (extras + patch grid) -> ``norm`` ->
    linear ``head`` to ``patch_size^2 * in_chans`` pixels per patch."""

    def __init__(self, in_dim: int, dim: int = 384, depth: int = 3, num_heads: int = 6,
                 mlp_dim: int | None = None, patch_size: int = 16, in_chans: int = 3,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.patch_size, self.in_chans = dim, patch_size, in_chans
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_dim, qkv_bias="qkv",
                                          norm_eps=norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, patch_size * patch_size * in_chans)
        self.apply(init_vit_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        self._tables: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def _table(self, patches: int, like: torch.Tensor) -> torch.Tensor:
        key = (patches, like.device, like.dtype)
        if like.device.type == "meta":
            return like.new_empty(1, patches, self.dim)
        if key not in self._tables:
            self._tables[key] = sincos_table(patches, self.dim).to(like.device, like.dtype)[None]
        return self._tables[key]

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                num_patches: int) -> torch.Tensor:
        """Encoder tokens B x N x D_in with positions B x N -> pixels B x num_patches x p*p*C."""
        if positions.shape != tokens.shape[:2]:
            raise ValueError(f"positions {tuple(positions.shape)} do not match tokens "
                             f"{tuple(tokens.shape)}")
        x = self.embed(tokens)
        B = x.shape[0]
        extras = int((positions[0] < 0).sum()) if positions.device.type != "meta" else 1
        patch_tokens, patch_positions = x[:, extras:], positions[:, extras:]
        grid = self.mask_token.to(x.dtype).expand(B, num_patches, self.dim)
        index = patch_positions[..., None].expand(-1, -1, self.dim)
        grid = torch.scatter(grid, 1, index, patch_tokens)
        grid = grid + self._table(num_patches, grid)
        x = torch.cat([x[:, :extras], grid], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, extras:]))
