"""Vector quantisation for discrete visual targets (E-ViLM's semantic video tokenizer).

``VectorQuantizer`` maps continuous token features to the nearest entry of a learnable
codebook. As in E-ViLM (and ViT-VQGAN's factorised codes), features and codes are
L2-normalised before the look-up, so the nearest code by Euclidean distance is the one with the
largest cosine. Gradients pass the non-differentiable look-up straight through (the quantised
output is ``z + sg[c - z]``), and two losses train it (papers/e-vilm.txt, eq. 7):

- codebook loss ``||sg[z] - c||^2``: moves the chosen codes towards the features;
- commitment loss ``||z - sg[c]||^2``: keeps the encoder close to its codes.

Both are the squared distance summed over the code dimension and averaged over tokens.

Codebook health: ``usage`` reports utilisation (the fraction of codes chosen at least once in
the last ``dead_after`` training steps, or over what an evaluation counted) and perplexity
(``exp`` of the entropy of the code frequencies: the number of equally used codes that would
give the same entropy). Dead codes, ones no token chose in the last ``dead_after`` steps, are
re-initialised every ``restart_every`` steps from encoder outputs of the current batch (over
all ranks), the "codebook expiry" of Jukebox and SoundStream: without it most of a 9,420-code
book never gets chosen, since a code that starts far from every feature gets no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class Quantized:
    """What ``VectorQuantizer.forward`` returns."""

    quantized: torch.Tensor  # ... x D, straight-through: forward = codes, gradient -> features
    codes: torch.Tensor  # ... long, index of the nearest code per token
    codebook_loss: torch.Tensor  # scalar
    commitment_loss: torch.Tensor  # scalar


def nearest_codes(features: torch.Tensor, codebook: torch.Tensor,
                  chunk_size: int = 4096) -> torch.Tensor:
    """Index of the nearest row of ``codebook`` (K x D) for every row of ``features`` (N x D)
    by Euclidean distance, ``chunk_size`` rows at a time (N x K distances never all at once)."""
    if features.dim() != 2 or codebook.dim() != 2 or features.shape[1] != codebook.shape[1]:
        raise ValueError(f"features N x D and codebook K x D expected, got "
                         f"{tuple(features.shape)} and {tuple(codebook.shape)}")
    codebook = codebook.float()
    code_norms = codebook.pow(2).sum(dim=1)
    out = []
    for start in range(0, features.shape[0], chunk_size):
        part = features[start:start + chunk_size].float()
        # ||x||^2 is the same for every code, so argmin ||x - c||^2 = argmin ||c||^2 - 2 x.c
        distance = code_norms[None, :] - 2 * part @ codebook.t()
        out.append(distance.argmin(dim=1))
    if not out:
        return torch.empty(0, dtype=torch.long, device=features.device)
    return torch.cat(out)


def codebook_losses(features: torch.Tensor, codes: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook loss ||sg[z] - c||^2, commitment loss ||z - sg[c]||^2) between features ``z``
    and their chosen code vectors ``c`` (same shape), summed over the last dim, averaged over
    the rest."""
    codebook = (features.detach().float() - codes.float()).pow(2).sum(dim=-1).mean()
    commitment = (features.float() - codes.detach().float()).pow(2).sum(dim=-1).mean()
    return codebook, commitment


def code_usage(counts: torch.Tensor) -> dict[str, float]:
    """Utilisation (fraction of codes with a non-zero count) and perplexity (exp of the entropy
    of the count distribution) of a histogram over the codebook."""
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return {"utilisation": 0.0, "perplexity": 0.0}
    probability = counts / total
    entropy = -(probability[probability > 0] * probability[probability > 0].log()).sum()
    return {"utilisation": float((counts > 0).double().mean()),
            "perplexity": float(entropy.exp())}


class VectorQuantizer(nn.Module):
    """Nearest-code look-up in a ``num_codes x dim`` codebook with straight-through gradients,
    codebook / commitment losses, usage tracking and dead-code restarts (see the module doc).

    ``normalize``: L2-normalise features and codes before the look-up (E-ViLM). ``dead_after``
    / ``restart_every``: steps (training forwards) without use after which a code counts as
    dead, and how often dead codes are re-initialised; ``restart_every=0`` turns restarts off.
    """

    def __init__(self, num_codes: int = 9420, dim: int = 32, normalize: bool = True,
                 dead_after: int = 100, restart_every: int = 10):
        super().__init__()
        if num_codes < 1 or dim < 1:
            raise ValueError(f"num_codes and dim must be positive, got {num_codes}, {dim}")
        self.num_codes, self.dim, self.normalize = int(num_codes), int(dim), bool(normalize)
        self.dead_after, self.restart_every = int(dead_after), int(restart_every)
        self.codebook = nn.Parameter(torch.randn(num_codes, dim))
        # training steps seen, and the step each code was last chosen (-1: never); buffers, so
        # they are checkpointed and a resumed run restarts the same codes
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.full((num_codes,), -1, dtype=torch.long))
        # the step each code was last restarted (-1: never): a fresh code gets dead_after steps
        # to be chosen before it counts as dead again, without counting as used
        self.register_buffer("last_restart", torch.full((num_codes,), -1, dtype=torch.long))
        #: codes re-initialised so far (a plain attribute: logged, not checkpointed)
        self.restarted = 0
        self.last_batch_counts: torch.Tensor | None = None

    def code_vectors(self) -> torch.Tensor:
        """The codebook as used in the look-up (L2-normalised when ``normalize``)."""
        return F.normalize(self.codebook, dim=-1) if self.normalize else self.codebook

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """Features as compared with the codes (L2-normalised when ``normalize``)."""
        return F.normalize(features, dim=-1) if self.normalize else features

    @torch.no_grad()
    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """Code indices of ``... x dim`` features: ``...`` long."""
        flat = self.prepare(features.float()).reshape(-1, self.dim)
        return nearest_codes(flat, self.code_vectors().float()).reshape(features.shape[:-1])

    def forward(self, features: torch.Tensor) -> Quantized:
        """Quantise ``... x dim`` features; in training also track usage and restart dead
        codes (after computing this batch's output, so the losses see the old codes)."""
        if features.shape[-1] != self.dim:
            raise ValueError(f"features must end in dim {self.dim}, got {tuple(features.shape)}")
        z = self.prepare(features)
        codes = self.encode(features)
        chosen = F.embedding(codes, self.code_vectors()).to(z.dtype)
        codebook_loss, commitment_loss = codebook_losses(z, chosen)
        quantized = z + (chosen - z).detach()  # straight-through
        if self.training and torch.is_grad_enabled():
            self._track(codes, z.detach())
        return Quantized(quantized, codes, codebook_loss, commitment_loss)

    @torch.no_grad()
    def _track(self, codes: torch.Tensor, features: torch.Tensor) -> None:
        counts = torch.bincount(codes.reshape(-1), minlength=self.num_codes)
        if _distributed():
            dist.all_reduce(counts)
        self.last_batch_counts = counts
        self.last_used[counts > 0] = self.steps
        self.steps += 1
        if self.restart_every > 0 and int(self.steps) % self.restart_every == 0:
            self.restart_dead(features.reshape(-1, self.dim))

    def dead_codes(self) -> torch.Tensor:
        """Bool mask of the codes no token chose in the last ``dead_after`` steps (a code
        never chosen counts from step 0)."""
        since = torch.maximum(self.last_used, self.last_restart).clamp_min(0)
        return (self.steps - since) > self.dead_after

    @torch.no_grad()
    def restart_dead(self, features: torch.Tensor) -> int:
        """Re-initialise dead codes from ``features`` (N x dim, this batch's encoder outputs,
        gathered over ranks; the same rows on every rank, so replicas stay identical), with a
        little noise so that codes drawn from one feature do not stay identical. Returns how
        many codes were restarted."""
        dead = self.dead_codes().nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        pool = _gather(features.float())
        generator = torch.Generator(device="cpu").manual_seed(int(self.steps))
        rows = torch.randint(pool.shape[0], (dead.numel(),), generator=generator)
        noise = torch.randn(dead.numel(), self.dim, generator=generator) * 0.01
        new = pool[rows.to(pool.device)] + noise.to(pool.device)
        self.codebook.data[dead] = new.to(self.codebook.dtype)
        self.last_restart[dead] = self.steps
        self.restarted += int(dead.numel())
        return int(dead.numel())

    def training_usage(self) -> dict[str, float]:
        """Utilisation (codes some token chose in the last ``dead_after`` steps; restarted
        codes count only once chosen) and this batch's code perplexity."""
        window = self.last_used >= max(int(self.steps) - self.dead_after, 0)
        usage = {"utilisation": float(((self.last_used >= 0) & window).double().mean())}
        if self.last_batch_counts is not None:
            usage["perplexity"] = code_usage(self.last_batch_counts)["perplexity"]
        return usage

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, normalize={self.normalize}, "
                f"dead_after={self.dead_after}, restart_every={self.restart_every}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(features: torch.Tensor) -> torch.Tensor:
    """Rows of every rank (ranks may hold different counts), in rank order."""
    if not _distributed():
        return features
    size = torch.tensor([features.shape[0]], device=features.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    largest = int(max(s.item() for s in sizes))
    padded = F.pad(features, (0, 0, 0, largest - features.shape[0]))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes, strict=True)])

