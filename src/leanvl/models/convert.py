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
- ``perceiver-vl``: the authors' Perceiver-VL checkpoint (``perceivervl_mlm_itm_vtm.ckpt``, a
  PyTorch Lightning file) -> a folder of released weights for ``perceiver_vl_b32`` with
  ``variant=official``, configured to evaluate as the authors did (single stream, the first
  cross-attention only); ``leanvl eval retrieval|mc --model FOLDER`` runs it.
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

KINDS = ("umt-stage1", "umt-finetune", "clip-visual", "perceiver-vl")


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
    if kind == "perceiver-vl":
        if classes is not None:
            raise ValueError("classes= only applies to umt-finetune")
        return release_perceiver_vl(source, out, allow_pickle)
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


#: how the authors fed their co-pre-trained checkpoint (scripts/co_pretrain.sh, config.py):
#: 8 frames at 384x384 normalised with mean = std = 0.5, BERT-uncased text of 40 tokens
PERCEIVER_VL_INPUTS = {"num_frames": 8, "tokenizer": "bert-base-uncased",
                       "normalization": "custom", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def release_perceiver_vl(source: str | Path, folder: str | Path, allow_pickle: bool = False
                         ) -> dict[str, Any]:
    """The authors' Perceiver-VL checkpoint -> released weights (model.safetensors +
    config.json) of ``perceiver_vl_b32(variant="official")``, checked by loading them.

    The file is read without running code from it (``load_tensors_only``) unless
    ``allow_pickle``. The config evaluates as the authors did: single stream (every pair
    scored by the joint encoder and VTM), only the first cross-attention (the released run
    trained with ``layer_drop=0.0``, their keep probability, so the other two never ran) and
    no LayerDrop; ``extra.data`` records their input settings.
    """
    from leanvl.engine.checkpoint import WEIGHTS_NAME, write_release_config
    from leanvl.models.checkpoints import (
        PERCEIVER_VL_UNUSED,
        convert_perceiver_vl,
        load_checkpoint_file,
        load_state_dict_strict,
        load_tensors_only,
    )
    from leanvl.models.registry import create_model

    folder = Path(folder)
    if folder.suffix == ".safetensors":
        raise ValueError(f"perceiver-vl writes a folder of released weights, got {folder}")
    checkpoint = (load_checkpoint_file(source, allow_pickle=True) if allow_pickle
                  else load_tensors_only(source))
    state, shape = convert_perceiver_vl(checkpoint)
    kwargs = {"variant": "official", "layout": "official", **shape, "stream": "single",
              "num_cross_layers": 1, "layer_drop": 0.0}
    with torch.device("meta"):  # only checks that every name and shape fits; nothing computed
        model = create_model("perceiver_vl_b32", **kwargs)
    load_state_dict_strict(model, {k: v.to("meta") for k, v in state.items()}, str(source))
    folder.mkdir(parents=True, exist_ok=True)
    _save(state, folder / WEIGHTS_NAME)
    inputs = {**PERCEIVER_VL_INPUTS, "size": shape["image_size"],
              "max_text_len": shape["max_text_len"],
              "num_frames": min(PERCEIVER_VL_INPUTS["num_frames"], shape["max_frames"])}
    write_release_config(folder, "perceiver_vl_b32", kwargs,
                         extra={"data": inputs, "source": "Perceiver-VL authors' checkpoint"})
    return {"kind": "perceiver-vl", "source": str(source), "output": str(folder),
            "model": "perceiver_vl_b32", "tensors": len(state),
            "parameters": int(sum(v.numel() for v in state.values())),
            "not used by the authors' forward (dropped)": list(PERCEIVER_VL_UNUSED) + [
                "text_embeddings.token_type_embeddings.weight[1]",
                "transformer.cls_token_decoder[:, 1:]"]}
