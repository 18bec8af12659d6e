"""Perceiver building blocks: cross-attention blocks, a latent array, and an encoder that
alternates cross-attention (latents -> input array) with self-attention over the latents,
with LayerDrop on the cross-attentions.

The encoder is a list of ``k`` blocks; block ``b`` is one cross-attention from the latents to the
input array followed by ``l`` self-attention blocks over the latents (Perceiver, Perceiver-VL).
Cost: O(k*M*N + k*l*N^2) for M inputs and N latents, instead of O(L*M^2) for L self-attention
layers over the inputs.

Modality aggregation (Perceiver-VL, Fig. 3) for inputs made of two modalities:

- ``joint``: one cross-attention per block over the concatenated input array;
- ``separate``: two cross-attentions per block, one per modality, one after the other, then the
  block's self-attentions;
- ``separate_plus``: as ``separate`` with the block's self-attentions split between them
  (cross-attention to video, the first ceil(l/2) self-attentions, cross-attention to text,
  the rest), so the total depth stays the same.

A modality that is absent from an input (a video-only or text-only encoding) simply has its
cross-attentions skipped.

LayerDrop: during training the cross-attention(s) of every block but the first are skipped with
probability ``layer_drop``; the first is never dropped so the latents always see the input. The
decisions come from a generator seeded with ``(layer_drop_seed, call counter)``, not from the
global RNG, so every DDP rank (whose global RNGs differ) makes the same decisions in the same
step; the counter is a buffer, so a resumed run continues the same sequence. At inference
nothing is dropped; ``num_cross_layers`` keeps only the first n blocks' cross-attentions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from leanvl.nn.attention import CrossAttention, DropPath, Mlp
from leanvl.nn.vit import Block

AGGREGATIONS = ("joint", "separate", "separate_plus")


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention block: x + attn(norm1(x), norm_context(c)), x + mlp(norm2(x)).

    ``residual_from_norm=True`` adds the attention output to ``norm1(x)`` instead of ``x`` (the
    Perceiver-VL authors' code); ``context_norm=False`` leaves the context as it comes (a caller
    that normalises it once, or a context that is already normalised).
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None,
                 mlp_dim: int | None = None, qkv_bias: bool = True, drop_path: float = 0.0,
                 norm_eps: float = 1e-6, act_layer: Callable[[], nn.Module] = nn.GELU,
                 residual_from_norm: bool = False, context_norm: bool = True) -> None:
        super().__init__()
        context_dim = context_dim or dim
        self.residual_from_norm = bool(residual_from_norm)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.norm_context = (nn.LayerNorm(context_dim, eps=norm_eps) if context_norm
                             else nn.Identity())
        self.attn = CrossAttention(dim, num_heads, context_dim, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim or 4 * dim, act_layer=act_layer)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """B x Nq x D queries attend to B x Nk x Dc context (mask: True = valid)."""
        queries = self.norm1(x)
        x = self.residual_input(x, queries)
        x = x + self.drop_path(self.attn(queries, self.norm_context(context), context_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def residual_input(self, x: torch.Tensor, normed: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """What the attention output is added to: ``x``, or ``norm1(x)`` with
        ``residual_from_norm`` (``normed`` spares recomputing it)."""
        if not self.residual_from_norm:
            return x
        return self.norm1(x) if normed is None else normed

    def mlp_part(self, x: torch.Tensor) -> torch.Tensor:
        """The block after its attention: x + mlp(norm2(x)) (for callers that attend themselves)."""
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LatentArray(nn.Module):
    """N learned latent vectors plus a learned position embedding, expanded over the batch
    (``position=False``: the latents alone, as in the Perceiver-VL authors' code)."""

    def __init__(self, num_latents: int, dim: int, init_std: float = 0.02,
                 position: bool = True) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.empty(num_latents, dim))
        self.position = nn.Parameter(torch.empty(num_latents, dim)) if position else None
        nn.init.trunc_normal_(self.latents, std=init_std)
        if self.position is not None:
            nn.init.trunc_normal_(self.position, std=0.02)

    @property
    def num_latents(self) -> int:
        """N."""
        return int(self.latents.shape[0])

    def forward(self, batch_size: int) -> torch.Tensor:
        """B x N x D initial latents."""
        latents = self.latents if self.position is None else self.latents + self.position
        return latents.unsqueeze(0).expand(batch_size, -1, -1)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint with another latent count: keep this array ("new", the paper's choice
        # when changing N at fine-tuning) or interpolate the stored one (the official code's).
        mode = getattr(self, "resize", "new")
        for name in ("latents", "position"):
            key = prefix + name
            stored = state_dict.get(key)
            own = getattr(self, name)
            if stored is None or own is None or stored.shape == own.shape:
                continue
            if stored.shape[1:] != own.shape[1:]:
                continue  # a width mismatch is a real error; let the default loader report it
            if mode == "interpolate":
                state_dict[key] = interpolate_rows(stored, own.shape[0]).to(own.dtype)
            else:
                state_dict[key] = own.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def interpolate_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """Linear interpolation of an R x D table to ``rows`` x D (align_corners, float32)."""
    out = torch.nn.functional.interpolate(table.float().t()[None], size=rows, mode="linear",
                                          align_corners=True)
    return out[0].t()


class PerceiverEncoder(nn.Module):
    """``num_blocks`` x (cross-attention(s) -> ``self_per_block`` self-attentions) over latents.

    ``forward(latents, inputs)`` takes ``inputs`` as a dict ``{modality: (tokens B x M x D,
    mask B x M or None)}`` with modalities ``video`` and/or ``text``. Self-attention layers are
    ``self_layers.{i}`` (timm ViT block names, so ViT weights load into them); cross-attentions are
    ``cross.{b}`` (joint, or the video side of separate modes) and ``cross_text.{b}``.

    ``shared_context_norm=True`` normalises the input array once (``context_norm``, the
    authors' ``co_norm``) instead of in every cross-attention; ``cross_residual_from_norm``
    is ``CrossAttentionBlock``'s ``residual_from_norm`` for every cross-attention.
    """

    def __init__(self, dim: int, num_heads: int, num_blocks: int = 3, self_per_block: int = 3,
                 mlp_dim: int | None = None, aggregation: str = "joint", layer_drop: float = 0.0,
                 layer_drop_seed: int = 0, drop_path_rate: float = 0.0, norm_eps: float = 1e-6,
                 qkv_bias: str | bool = "qkv", act_layer: Callable[[], nn.Module] = nn.GELU,
                 shared_context_norm: bool = False, cross_residual_from_norm: bool = False
                 ) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if num_blocks < 1 or self_per_block < 0:
            raise ValueError(f"need num_blocks >= 1 and self_per_block >= 0, got {num_blocks}, "
                             f"{self_per_block}")
        if not 0.0 <= layer_drop < 1.0:
            raise ValueError(f"layer_drop must be in [0, 1), got {layer_drop}")
        self.dim, self.num_blocks, self.self_per_block = dim, num_blocks, self_per_block
        self.aggregation, self.layer_drop = aggregation, float(layer_drop)
        self.layer_drop_seed = int(layer_drop_seed)
        depth = num_blocks * self_per_block
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.self_layers = nn.ModuleList(
            Block(dim, num_heads, mlp_dim, qkv_bias, rates[i], norm_eps, act_layer=act_layer)
            for i in range(depth))

        def cross() -> nn.ModuleList:
            return nn.ModuleList(CrossAttentionBlock(dim, num_heads, mlp_dim=mlp_dim,
                                                     norm_eps=norm_eps, act_layer=act_layer,
                                                     residual_from_norm=cross_residual_from_norm,
                                                     context_norm=not shared_context_norm)
                                 for _ in range(num_blocks))

        self.cross = cross()
        self.cross_text = cross() if aggregation != "joint" else None
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.context_norm = nn.LayerNorm(dim, eps=norm_eps) if shared_context_norm else None
        # Counts training forward passes: seeds LayerDrop identically on every rank.
        self.register_buffer("layer_drop_calls", torch.zeros((), dtype=torch.long))

    @property
    def num_cross_attentions(self) -> int:
        """Cross-attention layers (two per block in the separate modes)."""
        return self.num_blocks * (1 if self.cross_text is None else 2)

    def cross_layer_ids(self) -> list[int]:
        """Index of the self-attention layer each block's (first) cross-attention precedes."""
        return [b * self.self_per_block for b in range(self.num_blocks)]

    def active_blocks(self, num_cross_layers: int | None = None) -> list[bool]:
        """Which blocks run their cross-attention this call (advances the LayerDrop counter).

        Training with ``layer_drop > 0``: block 0 always, others with probability 1 - p, drawn
        from ``(layer_drop_seed, counter)``. Otherwise the first ``num_cross_layers`` blocks
        (default: all).
        """
        if self.training and self.layer_drop > 0:
            generator = torch.Generator().manual_seed(
                self.layer_drop_seed * 1_000_003 + int(self.layer_drop_calls))
            self.layer_drop_calls += 1
            keep = torch.rand(self.num_blocks, generator=generator) >= self.layer_drop
            keep[0] = True
            return keep.tolist()
        count = self.num_blocks if num_cross_layers is None else int(num_cross_layers)
        if not 1 <= count <= self.num_blocks:
            raise ValueError(f"num_cross_layers must be in [1, {self.num_blocks}], got "
                             f"{num_cross_layers}")
        return [b < count for b in range(self.num_blocks)]

    def _attend(self, layer: CrossAttentionBlock, latents: torch.Tensor,
                inputs: tuple[torch.Tensor, torch.Tensor | None] | None) -> torch.Tensor:
        if inputs is None:
            return latents
        tokens, mask = inputs
        return layer(latents, tokens, mask)

    def forward(self, latents: torch.Tensor,
                inputs: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
                num_cross_layers: int | None = None) -> torch.Tensor:
        """Encode ``inputs`` into B x N x D latents (final LayerNorm applied)."""
        unknown = set(inputs) - {"video", "text"}
        if unknown or not inputs:
            raise ValueError(f"inputs must have 'video' and/or 'text', got {sorted(inputs)}")
        active = self.active_blocks(num_cross_layers)
        if self.context_norm is not None:  # once here, not in every cross-attention
            inputs = {name: (self.context_norm(tokens), mask)
                      for name, (tokens, mask) in inputs.items()}
        joint = None
        if self.cross_text is None:
            parts = [inputs[m] for m in ("video", "text") if m in inputs]
            joint = concat_inputs(parts)
        x = latents
        split = math.ceil(self.self_per_block / 2) if self.aggregation == "separate_plus" \
            else self.self_per_block
        for b in range(self.num_blocks):
            layers = self.self_layers[b * self.self_per_block:(b + 1) * self.self_per_block]
            if joint is not None:
                if active[b]:
                    x = self._attend(self.cross[b], x, joint)
                for layer in layers:
                    x = layer(x)
                continue
            if active[b]:
                x = self._attend(self.cross[b], x, inputs.get("video"))
            for layer in layers[:split]:
                x = layer(x)
            if active[b]:
                x = self._attend(self.cross_text[b], x, inputs.get("text"))
            for layer in layers[split:]:
                x = layer(x)
        return self.norm(x)


def concat_inputs(parts: Sequence[tuple[torch.Tensor, torch.Tensor | None]]
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate (tokens, mask) pairs along the token axis; None masks mean all valid."""
    if len(parts) == 1:
        return parts[0]
    tokens = torch.cat([t for t, _ in parts], dim=1)
    if all(m is None for _, m in parts):
        return tokens, None
    masks = [m.bool() if m is not None else
             torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) for t, m in parts]
    return tokens, torch.cat(masks, dim=1)
