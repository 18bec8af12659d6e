"""A timm image backbone applied to every frame of a clip: frame grids flattened over time.

``FrameGridEncoder`` runs a timm CNN / hybrid (E-ViLM: ``edgenext_small``) on the B*T frames
and returns each frame's last-stage feature grid, flattened and concatenated over the T frames
in t-major order (B x T*h*w x C), the token order of ``masking.py``. Weights come from a local
file only (timm's own state-dict names; a classifier's ``head.fc`` is left out).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class FrameGridEncoder(nn.Module):
    """A timm backbone per frame -> B x T*h*w x C grid tokens (``head.norm`` applied when the
    model has one, as timm's classifier would before pooling). ``timm_kwargs`` go to
    ``timm.create_model`` (architecture changes such as fewer blocks per stage)."""

    def __init__(self, name: str = "edgenext_small", pretrained_file: str = "",
                 drop_path_rate: float = 0.0, **timm_kwargs):
        super().__init__()
        import timm

        self.name = name
        # timm_kwargs change the architecture (e.g. depths), for CPU-sized variants
        self.backbone = timm.create_model(name, pretrained=False, num_classes=0,
                                          drop_path_rate=drop_path_rate, **timm_kwargs)
        self.dim = int(self.backbone.num_features)
        self.stride = int(self.backbone.feature_info[-1]["reduction"])
        if pretrained_file:
            self.load_file(pretrained_file)

    def load_file(self, path: str | Path) -> None:
        """Load timm weights for this backbone from a local file (.safetensors / .pth / .bin);
        a classifier head in the file is ignored, anything else must match."""
        from leanvl.models.checkpoints import (
            CheckpointError,
            load_checkpoint_file,
            load_state_dict_strict,
            unwrap_state_dict,
        )

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{self.name} weights not found: {path} (loading is local "
                                    "only; give a timm state dict file)")
        state = unwrap_state_dict(load_checkpoint_file(path))
        dropped = [key for key in state if key.startswith(("head.fc.", "fc.", "classifier."))]
        state = {key: value for key, value in state.items() if key not in dropped}
        try:
            load_state_dict_strict(self.backbone, state, source=str(path))
        except CheckpointError as error:
            raise CheckpointError(f"{error} (expected timm's {self.name})") from None
        log.info("loaded %s weights from %s (left out: %s)", self.name, path,
                 ", ".join(dropped) or "nothing")

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Feature grid (h, w) of one frame; raises unless the frame tiles by the stride."""
        if height % self.stride or width % self.stride:
            raise ValueError(f"frames of {height}x{width} pixels do not tile into "
                             f"{self.stride}-pixel cells ({self.name})")
        return height // self.stride, width // self.stride

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """B x T x 3 x H x W (or B x 3 x H x W) -> B x T*h*w x C."""
        if video.dim() == 4:
            video = video.unsqueeze(1)
        if video.dim() != 5:
            raise ValueError(f"video must be B x T x C x H x W, got shape {tuple(video.shape)}")
        B, T = video.shape[:2]
        self.grid(*video.shape[-2:])
        grid = self.backbone.forward_features(video.flatten(0, 1))
        norm = getattr(getattr(self.backbone, "head", None), "norm", None)
        if norm is not None:
            grid = norm(grid)
        tokens = grid.flatten(2).transpose(1, 2)  # (B*T) x h*w x C
        return tokens.reshape(B, T * tokens.shape[1], tokens.shape[2])
