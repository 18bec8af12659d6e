"""``leanvl convert``: official checkpoints to leanvl weight files (safetensors).

- ``umt-stage1``: UMT stage-1 checkpoint -> ``video_encoder.*`` + ``uta_heads.*``, for
  ``model.pretrained=`` of a UMT model (stage 1 to continue distilling, stage 2 to start
  vision-language pre-training; the text side then starts from scratch or ``text_pretrained``).
- ``umt-finetune``: UMT action-classifier checkpoint -> a ``VideoClassifier`` around a
  teacher-less stage-1 UMT (``model.video_encoder.*`` without the final norm, ``head.fc_norm.*``,
  ``head.head.*``). With an output folder instead of a ``.safetensors`` file, the folder is
  released weights (``config.json`` naming ``umt_b16`` / ``umt_l16`` by width, task
  ``classify``, the class list from ``classes`` or the class indices), so
  ``leanvl eval classify --model FOLDER`` runs it.
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


#: UMT sizes by the width of the converted student
UMT_BY_WIDTH = {768: "umt_b16", 1024: "umt_l16"}


def convert_checkpoint(kind: str, source: str | Path, out: str | Path,
                       allow_pickle: bool = False, classes: str | Path | None = None
                       ) -> dict[str, Any]:
    """Convert ``source`` to ``out`` (.safetensors; for ``umt-finetune`` also a folder of
    released weights); returns a summary."""
    if kind not in KINDS:
        raise ValueError(f"unknown conversion {kind!r}; expected one of {', '.join(KINDS)}")
    out = Path(out)
    release = kind == "umt-finetune" and out.suffix != ".safetensors"
    if out.suffix != ".safetensors" and not release:
        raise ValueError(f"output must be a .safetensors file, got {out}")
    if classes is not None and kind != "umt-finetune":
        raise ValueError("classes= only applies to umt-finetune")
    checkpoint = load_checkpoint_file(source, allow_pickle=allow_pickle)
    if kind == "umt-stage1":
        student, heads = convert_umt_pretrain(checkpoint)
        state = {**{f"video_encoder.{k}": v for k, v in student.items()},
                 **{f"uta_heads.{k}": v for k, v in heads.items()}}
    elif kind == "umt-finetune":
        student, classifier = convert_umt_finetune(checkpoint)
        state = {**{f"model.video_encoder.{k}": v for k, v in student.items()},
                 **{f"head.{'fc_norm' if k.startswith('norm.') else 'head'}.{k.split('.')[-1]}":
                    v for k, v in classifier.items()}}
    else:
        state = convert_clip_visual(checkpoint)
    summary = {"kind": kind, "source": str(source), "output": str(out), "tensors": len(state),
               "parameters": int(sum(v.numel() for v in state.values()))}
    if release:
        summary.update(_release_classifier(state, out, classes))
    else:
        _save(state, out)
    return summary


def _release_classifier(state: dict[str, torch.Tensor], folder: Path,
                        classes: str | Path | None) -> dict[str, Any]:
    """Write a converted UMT classifier as released weights (model.safetensors + config.json)."""
    import json

    from leanvl.engine.checkpoint import WEIGHTS_NAME, write_release_config

    width = int(state["head.fc_norm.weight"].shape[0])
    num_classes = int(state["head.head.weight"].shape[0])
    if width not in UMT_BY_WIDTH:
        raise ValueError(f"no UMT size of width {width} (known: {sorted(UMT_BY_WIDTH)})")
    labels: list = list(range(num_classes))
    if classes is not None:
        labels = json.loads(Path(classes).read_text())
        if not isinstance(labels, list) or len(labels) != num_classes:
            raise ValueError(f"{classes}: expected a JSON list of {num_classes} class names")
    folder.mkdir(parents=True, exist_ok=True)
    _save(state, folder / WEIGHTS_NAME)
    write_release_config(folder, UMT_BY_WIDTH[width],
                         {"stage": 1, "mask_type": "none", "vision": {"final_norm": False}},
                         extra={"task": "classify", "labels": labels})
    return {"model": UMT_BY_WIDTH[width], "classes": num_classes}
