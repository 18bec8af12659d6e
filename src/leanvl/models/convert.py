"""``leanvl convert``: official checkpoints to leanvl weight files (safetensors).

- ``umt-stage1``: UMT stage-1 checkpoint -> ``video_encoder.*`` + ``uta_heads.*``, for
  ``model.pretrained=`` of a UMT model (stage 1 to continue distilling, stage 2 to start
  vision-language pre-training; the text side then starts from scratch or ``text_pretrained``).
- ``umt-finetune``: UMT action-classifier checkpoint -> ``video_encoder.*`` + ``classifier.*``
  (``PooledClassifier`` naming: ``norm``, ``head``).
- ``clip-visual``: OpenAI CLIP (full model or visual tower, TorchScript or state dict) or timm
  CLIP visual weights -> a file ``CLIPVisionTeacher.from_file`` loads (``teacher=`` of UMT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from leanvl.models.checkpoints import (
    convert_clip_visual,
    convert_umt_finetune,
    convert_umt_pretrain,
    load_checkpoint_file,
)

KINDS = ("umt-stage1", "umt-finetune", "clip-visual")


def _save(state: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out)


def convert_checkpoint(kind: str, source: str | Path, out: str | Path,
                       allow_pickle: bool = False) -> dict[str, Any]:
    """Convert ``source`` to ``out`` (.safetensors); returns a summary."""
    if kind not in KINDS:
        raise ValueError(f"unknown conversion {kind!r}; expected one of {', '.join(KINDS)}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"output must be a .safetensors file, got {out}")
    checkpoint = load_checkpoint_file(source, allow_pickle=allow_pickle)
    if kind == "umt-stage1":
        student, heads = convert_umt_pretrain(checkpoint)
        state = {**{f"video_encoder.{k}": v for k, v in student.items()},
                 **{f"uta_heads.{k}": v for k, v in heads.items()}}
    elif kind == "umt-finetune":
        student, classifier = convert_umt_finetune(checkpoint)
        state = {**{f"video_encoder.{k}": v for k, v in student.items()},
                 **{f"classifier.{k}": v for k, v in classifier.items()}}
    else:
        state = convert_clip_visual(checkpoint)
    _save(state, out)
    return {"kind": kind, "source": str(source), "output": str(out), "tensors": len(state),
            "parameters": int(sum(v.numel() for v in state.values()))}
