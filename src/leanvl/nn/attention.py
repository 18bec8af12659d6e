"""Attention building blocks shared by every method: self/cross-attention, MLP, drop path.

Attention runs through ``F.scaled_dot_product_attention`` (fused kernels on GPU, no N x N
matrix kept for backward). SDPA does not return attention weights, so when a caller needs
them (UMT's semantic masking, SMAUG's EViT sparsification) it names the query rows it wants
(``attention_rows``, e.g. ``slice(0, 1)`` for the [CLS] row) and only those rows are
computed explicitly: R x N extra work instead of N x N.

Masks follow the project's convention: ``key_mask`` is B x N with True / 1 = a valid token
that may be attended to (as ``text_mask``), the opposite of ``nn.MultiheadAttention``'s
``key_padding_mask``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

#: qkv bias modes: no bias, one bias for q, k and v, or BEiT/UMT's q and v biases without k bias
QKV_BIAS_MODES = ("none", "qkv", "qv")

AttentionRows = slice | int | torch.Tensor | None


def _qkv_bias_mode(qkv_bias: str | bool) -> str:
    if qkv_bias is True:
        return "qkv"
    if qkv_bias is False:
        return "none"
    if qkv_bias not in QKV_BIAS_MODES:
        raise ValueError(f"qkv_bias must be one of {QKV_BIAS_MODES} or a bool, got {qkv_bias!r}")
    return qkv_bias


def _sdpa_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """B x N valid-token mask -> a boolean SDPA mask broadcast over heads and queries."""
    if key_mask is None:
        return None
    if key_mask.dim() != 2:
        raise ValueError(f"key_mask must be B x N, got shape {tuple(key_mask.shape)}")
    return key_mask.bool()[:, None, None, :]


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         key_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                         attention_rows: AttentionRows = None,
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA over B x H x N x d heads; optionally also the head-averaged weights of some query rows.

    Returns ``(out B x H x Nq x d, weights B x R x Nk or None)``. The weights are those of the
    softmax (before attention dropout), averaged over heads, as ``nn.MultiheadAttention``
    returns with ``need_weights=True``.
    """
    mask = _sdpa_mask(key_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if attention_rows is None:
        return out, None
    rows = attention_rows
    if isinstance(rows, int):
        rows = slice(rows, rows + 1)
    q_rows = q[:, :, rows] if isinstance(rows, slice) else q.index_select(2, rows.to(q.device))
    # Softmax in float32: bf16 logits over thousands of keys lose the small probabilities that
    # multinomial sampling and token ranking depend on.
    logits = (q_rows.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = logits.softmax(dim=-1).mean(dim=1)
    return out, weights


class Attention(nn.Module):
    """Multi-head self-attention (``qkv`` + ``proj``) with none / full / q-and-v-only biases.

    With ``qkv_bias="qv"`` the layout is BEiT's and UMT's: a bias-less ``qkv`` Linear plus
    ``q_bias`` and ``v_bias`` parameters (the k bias is fixed at zero: it would cancel in the
    softmax anyway).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: str | bool = "qkv",
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.bias_mode = _qkv_bias_mode(qkv_bias)
        self.qkv = nn.Linear(dim, 3 * dim, bias=self.bias_mode == "qkv")
        if self.bias_mode == "qv":
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv_bias(self) -> torch.Tensor | None:
        if self.bias_mode != "qv":
            return self.qkv.bias
        return torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                attention_rows: AttentionRows = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """B x N x D -> B x N x D; with ``attention_rows`` also the B x R x N head-mean weights."""
        B, N, D = x.shape
        qkv = F.linear(x, self.qkv.weight, self._qkv_bias())
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out, weights = multi_head_attention(
            q, k, v, key_mask, self.attn_drop if self.training else 0.0, attention_rows)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))
        return out if weights is None else (out, weights)


class CrossAttention(nn.Module):
    """Multi-head attention from queries ``x`` to a context (``q`` + ``kv`` + ``proj``)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None, attention_rows: AttentionRows = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """B x Nq x D queries over B x Nk x Dc context (``context_mask``: True = valid)."""
        B, Nq, D = x.shape
        Nk = context.shape[1]
        q = self.q(x).reshape(B, Nq, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(context).reshape(B, Nk, 2, self.num_heads, self.head_dim).permute(
            2, 0, 3, 1, 4)
        out, weights = multi_head_attention(
            q, k, v, context_mask, self.attn_drop if self.training else 0.0, attention_rows)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, Nq, D)))
        return out if weights is None else (out, weights)


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, x * sigmoid(1.702 x); its checkpoints were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    """Transformer feed-forward: fc1 -> activation (exact GELU by default) -> fc2."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None,
                 act_layer: Callable[[], nn.Module] = nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def drop_path(x: torch.Tensor, prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples' residual branch with ``prob``, rescale the rest."""
    if prob == 0.0 or not training:
        return x
    keep = 1.0 - prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    """Stochastic depth as a module; the identity in eval mode."""

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.prob, self.training)

    def extra_repr(self) -> str:
        return f"prob={self.prob}"
