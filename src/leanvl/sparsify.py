"""Token and frame sparsification: EViT keep-and-fuse (SMAUG appendix B) and a Gumbel top-k
selector (SMAUG's text-guided frame selection).

``keep_and_fuse`` ranks a sequence's tokens by the head-averaged attention of its [CLS] row
(``nn.attention`` computes that one row explicitly, also under SDPA and autocast), keeps the top
``ceil(keep_rate * n)`` and appends one token, the attention-weighted sum of the rest
(``X_fused = sum_i a_i X_i``, eq. 8, weights not renormalised). Tokens carried from earlier
stages (the [CLS] and earlier fused tokens) are never ranked, so every sequence of a batch keeps
the same number of patch tokens at their known ``positions``, which an MAE decoder needs to put
them back on the patch grid.

``gumbel_top_k`` picks ``k`` of ``K`` items per row: with Gumbel noise and straight-through
rows during training (one-hot in the forward pass, gradients of the successive softmaxes to the
scores), plain top-k at inference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: ``positions`` value of tokens that are not patches: the [CLS] token and fused tokens
CLS_POSITION, FUSED_POSITION = -1, -2


def kept_count(num_tokens: int, keep_rate: float) -> int:
    """How many of ``num_tokens`` rankable tokens a keep rate keeps: ``ceil(rate * n)`` (EViT)."""
    if not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep rate must be in (0, 1], got {keep_rate}")
    return min(num_tokens, math.ceil(keep_rate * num_tokens - 1e-9))


def keep_and_fuse(tokens: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                  keep_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT: keep the top-``keep_rate`` patch tokens by [CLS] attention, fuse the rest into one.

    ``tokens`` B x N x D; ``attention`` B x N, the [CLS] row of head-averaged attention over the
    same N tokens; ``positions`` B x N long, a patch index (>= 0) for patch tokens and a negative
    value for carried tokens (``CLS_POSITION``, ``FUSED_POSITION``), which must come first in
    every row. Returns ``(carried + fused + kept (by descending attention), positions)``, the
    fused token at position ``FUSED_POSITION``, so it is carried by later stages. ``keep_rate`` 1 returns the inputs.
    """
    if tokens.dim() != 3 or attention.shape != tokens.shape[:2] or positions.shape != attention.shape:
        raise ValueError(f"tokens B x N x D, attention and positions B x N expected, got "
                         f"{tuple(tokens.shape)}, {tuple(attention.shape)}, "
                         f"{tuple(positions.shape)}")
    carried = int((positions[0] < 0).sum())
    if bool((positions[:, :carried] >= 0).any()) or bool((positions[:, carried:] < 0).any()):
        raise ValueError("carried tokens ([CLS], fused) must come first in every row")
    rankable = tokens.shape[1] - carried
    keep = kept_count(rankable, keep_rate)
    if keep == rankable:
        return tokens, positions
    scores = attention[:, carried:]
    order = scores.argsort(dim=1, descending=True)
    top, rest = order[:, :keep], order[:, keep:]
    patches = tokens[:, carried:]

    def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])) if x.dim() == 3 \
            else x.gather(1, index)

    weights = scores.gather(1, rest)  # the inattentive tokens' attention values
    fused = (take(patches, rest).float() * weights[..., None].float()).sum(dim=1, keepdim=True)
    kept = torch.cat([tokens[:, :carried], fused.to(tokens.dtype), take(patches, top)], dim=1)
    fused_position = positions.new_full((positions.shape[0], 1), FUSED_POSITION)
    kept_positions = torch.cat([positions[:, :carried], fused_position,
                                take(positions[:, carried:], top)], dim=1)
    return kept, kept_positions


def sparsified_length(num_patches: int, keep_rates: list[float] | tuple[float, ...]) -> int:
    """Tokens per sequence after [CLS] + ``num_patches`` go through ``keep_and_fuse`` stages."""
    length, carried = num_patches, 1
    for rate in keep_rates:
        kept = kept_count(length, rate)
        if kept < length:
            length, carried = kept, carried + 1
    return carried + length


def gumbel_top_k(scores: torch.Tensor, k: int, training: bool, tau: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``k`` distinct items of each row of ``scores`` (B x K); returns (indices B x k in
    ascending item order, selection rows B x k x K).

    Training: Gumbel(0, 1) noise is added to ``scores / tau``, the top-k of the perturbed
    scores are taken one after another, and row j is straight-through:
    ``hard_j + soft_j - soft_j.detach()``, where ``soft_j`` is the softmax of the perturbed
    scores over the items not yet taken (Gumbel top-k = sampling without replacement), so rows
    are exactly one-hot in the forward pass and the scores get gradients. Inference: plain top-k
    of ``scores``, rows one-hot without gradients, deterministic.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be B x K, got shape {tuple(scores.shape)}")
    items = scores.shape[1]
    if not 1 <= k <= items:
        raise ValueError(f"cannot pick {k} of {items} items")
    if not training:
        index = scores.topk(k, dim=1).indices.sort(dim=1).values
        return index, F.one_hot(index, items).to(scores.dtype)
    where = generator.device if generator is not None else scores.device
    uniform = torch.rand(scores.shape, generator=generator, device=where).to(scores.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))
    logits = scores.float() / tau + gumbel
    taken = torch.zeros_like(logits, dtype=torch.bool)
    rows, picks = [], []
    for _ in range(k):
        soft = logits.masked_fill(taken, float("-inf")).softmax(dim=1)
        pick = soft.argmax(dim=1)
        hard = F.one_hot(pick, items).to(soft.dtype)
        rows.append(hard + (soft - soft.detach()))  # exactly one-hot forward, soft backward
        picks.append(pick)
        taken = taken | hard.bool()
    index = torch.stack(picks, dim=1)
    order = index.argsort(dim=1)  # keep the frames in time order
    index = index.gather(1, order)
    selection = torch.stack(rows, dim=1).gather(1, order[..., None].expand(-1, -1, items))
    return index, selection.to(scores.dtype)


def select_rows(items: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """``items`` B x K x ... picked by selection rows B x k x K: B x k x ... (the rows' matmul,
    so straight-through gradients reach the scores)."""
    flat = items.reshape(items.shape[0], items.shape[1], -1)
    picked = torch.bmm(selection.to(flat.dtype), flat)
    return picked.reshape(items.shape[0], selection.shape[1], *items.shape[2:])


class TextGuidedFrameSelector(nn.Module):
    """SMAUG's frame selector S: two linear layers (frames, text) into a small transformer
    (two blocks) over [text; frame_1..frame_K]; a frame's score is its output's dot product
    with the text's output. ``forward`` picks ``k`` frames with ``gumbel_top_k`` (Gumbel
    straight-through while training, top-k at inference)."""

    def __init__(self, video_dim: int, text_dim: int, dim: int = 512, depth: int = 2,
                 num_heads: int = 2, mlp_dim: int = 2048, tau: float = 1.0) -> None:
        super().__init__()
        from leanvl.nn.vit import Block, init_vit_weights

        self.dim, self.tau = dim, tau
        self.video_in = nn.Linear(video_dim, dim)
        self.text_in = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_dim, qkv_bias="qkv")
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.apply(init_vit_weights)

    def scores(self, frames: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Frame features B x K x D_v and a text feature B x D_t -> relevance scores B x K."""
        x = torch.cat([self.text_in(text)[:, None], self.video_in(frames)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return (x[:, 1:] * x[:, :1]).sum(dim=-1) * self.dim ** -0.5

    def forward(self, frames: torch.Tensor, text: torch.Tensor, k: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices B x k in time order, selection rows B x k x K) of the ``k`` chosen frames."""
        return gumbel_top_k(self.scores(frames, text), k, self.training, self.tau, generator)
