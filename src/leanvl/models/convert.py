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
- ``umt-stage2``: UMT vision-language checkpoint (pre-training ``b16_25m.pth`` & co, or a
  retrieval fine-tune) -> a stage-2 UMT. An output folder is released weights (``config.json``
  with the sizes read from the shapes, the authors' pooling and scoring, their input settings
  and their evaluation settings), so ``leanvl eval retrieval|mc --model FOLDER`` runs their
  protocol; a ``.safetensors`` file keeps the alignment heads too, for ``model.pretrained=``.
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
    CheckpointError,
    convert_clip_visual,
    convert_umt_finetune,
    convert_umt_pretrain,
    convert_umt_stage2,
    load_checkpoint_file,
    stored_table_grid,
    umt_stage2_kwargs,
)

KINDS = ("umt-stage1", "umt-finetune", "umt-stage2", "clip-visual", "perceiver-vl")


def _save(state: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(out)


#: UMT sizes by the width of the converted student
UMT_BY_WIDTH = {768: "umt_b16", 1024: "umt_l16"}


def convert_checkpoint(kind: str, source: str | Path, out: str | Path,
                       allow_pickle: bool = False, classes: str | Path | None = None,
                       frames: int | None = None, position_frames: int = 0
                       ) -> dict[str, Any]:
    """Convert ``source`` to ``out`` (.safetensors; for ``umt-finetune`` and ``umt-stage2``
    also a folder of released weights); returns a summary.

    ``frames``: the clip length the released weights read by default (``umt-finetune``: the
    frames of a stored position table, found from the table when not given; ``umt-stage2``:
    default 4 for pre-training checkpoints, 12 for fine-tuned ones, the authors' test
    settings). ``position_frames`` (``umt-stage2``): the authors' ``ckpt_num_frame``, the frames
    the checkpoint was trained with, whose position table is then resampled in time to the
    frames evaluated (0: the 1-D table runs over all positions, their default).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown conversion {kind!r}; expected one of {', '.join(KINDS)}")
    out = Path(out)
    if kind == "perceiver-vl":
        if classes is not None or frames is not None or position_frames:
            raise ValueError("classes=, frames= and position_frames= do not apply to "
                             "perceiver-vl (its config records the authors' settings)")
        return release_perceiver_vl(source, out, allow_pickle)
    if kind == "umt-stage2":
        if classes is not None:
            raise ValueError("classes= only applies to umt-finetune")
        return _convert_umt_stage2(source, out, allow_pickle, frames, position_frames)
    if position_frames:
        raise ValueError("position_frames= only applies to umt-stage2")
    release = kind == "umt-finetune" and out.suffix != ".safetensors"
    if out.suffix != ".safetensors" and not release:
        raise ValueError(f"output must be a .safetensors file, got {out}")
    if classes is not None and kind != "umt-finetune":
        raise ValueError("classes= only applies to umt-finetune")
    if frames is not None and kind != "umt-finetune":
        raise ValueError("frames= only applies to umt-finetune and umt-stage2")
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
    table = state.get("model.video_encoder.pos_embed")
    grid = stored_table_grid(table, frames) if table is not None else None
    if grid is not None:
        summary["position_table"] = "x".join(map(str, grid))
    if release:
        summary.update(_release_classifier(state, out, classes, grid, frames))
    else:
        _save(state, out)
    return summary


def _release_classifier(state: dict[str, torch.Tensor], folder: Path,
                        classes: str | Path | None, grid: tuple[int, int, int] | None = None,
                        frames: int | None = None) -> dict[str, Any]:
    """Write a converted UMT classifier as released weights (model.safetensors + config.json):
    its stored position table (16 frames, 384 px) is used as is, and otherwise the authors'
    8 x 14 x 14 table is resampled to the clips evaluated; ImageNet normalisation, as theirs."""
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
    patch = int(state["model.video_encoder.patch_embed.proj.weight"].shape[-1])
    if grid is not None:
        vision = {"final_norm": False, "stored_table": True, "table_frames": grid[0],
                  "table_patches": grid[1]}
        data = {"num_frames": grid[0], "size": grid[1] * patch}
    else:
        from leanvl.models.checkpoints import UMT_TABLE_GRID

        vision = {"final_norm": False, "table_frames": UMT_TABLE_GRID[0],
                  "table_patches": UMT_TABLE_GRID[1]}
        data = {"num_frames": frames or UMT_TABLE_GRID[0], "size": UMT_TABLE_GRID[1] * patch}
    data["normalization"] = "imagenet"
    folder.mkdir(parents=True, exist_ok=True)
    _save(state, folder / WEIGHTS_NAME)
    write_release_config(folder, UMT_BY_WIDTH[width],
                         {"stage": 1, "mask_type": "none", "vision": vision},
                         extra={"task": "classify", "labels": labels, "data": data})
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


#: the authors' evaluation settings for their vision-language models: re-rank the top 128 by
#: the raw match logit; multiple choice 0.7 * softmax(VTM) + 0.3 * softmax over options (VTC)
UMT_EVAL_SETTINGS = {"rerank_k": 128, "mc_vtm_weight": 0.7}


def _convert_umt_stage2(source: str | Path, out: Path, allow_pickle: bool,
                        frames: int | None, position_frames: int) -> dict[str, Any]:
    """``umt-stage2``: see the module docstring."""
    from leanvl.engine.checkpoint import WEIGHTS_NAME, write_release_config

    if out.suffix not in ("", ".safetensors") and not out.is_dir():
        raise ValueError(f"output must be a folder (released weights) or a .safetensors file, "
                         f"got {out}")
    state = convert_umt_stage2(load_checkpoint_file(source, allow_pickle=allow_pickle))
    kwargs = umt_stage2_kwargs(state)
    if position_frames:
        kwargs["position_frames"] = int(position_frames)
    pretraining = kwargs["mlm_head"]
    summary = {"kind": "umt-stage2", "source": str(source), "output": str(out),
               "checkpoint": "pre-training" if pretraining else "fine-tuned",
               "tensors": len(state), "parameters": int(sum(v.numel() for v in state.values()))}
    # BERT's MLM decoder is the word-embedding matrix: stored once, named twice
    if kwargs["mlm_head"]:
        state["text_encoder.mlm_head.decoder.weight"] = \
            state["text_encoder.embeddings.word_embeddings.weight"]
    heads = [key for key in state if key.startswith("uta_heads.")]
    released = {k: v for k, v in state.items() if not k.startswith("uta_heads.")}
    name = UMT_BY_WIDTH.get(kwargs["vision"]["dim"], "umt_b16")
    _check_fits(name, kwargs, released, source)
    if out.suffix == ".safetensors":
        _save_tied(state, out)
        return {**summary, "model": name, "kwargs": kwargs}
    patch = kwargs["vision"]["patch_size"]
    data = {"num_frames": int(frames or (4 if pretraining else 12)), "size": 14 * patch,
            "max_text_len": 32, "tokenizer": "bert-base-uncased", "normalization": "imagenet"}
    if kwargs["text"]["vocab_size"] != 30522:
        raise CheckpointError(f"{source}: a text vocabulary of {kwargs['text']['vocab_size']} "
                              "tokens, not bert-base-uncased's 30522")
    out.mkdir(parents=True, exist_ok=True)
    _save_tied(released, out / WEIGHTS_NAME)
    write_release_config(out, name, kwargs, exclude_prefixes=("uta_heads.",),
                         extra={"task": "retrieval", "data": data,
                                "eval": dict(UMT_EVAL_SETTINGS), "source": str(source)})
    return {**summary, "model": name, "left_out": f"{len(heads)} alignment-head tensors "
            "(clip_decoder: pre-training only)" if heads else "nothing", "data": data}


def _check_fits(name: str, kwargs: dict[str, Any], state: dict[str, torch.Tensor],
                source: str | Path) -> None:
    """Load ``state`` strictly into the model ``kwargs`` describe, built on the meta device
    (no memory, no compute): a clear error now rather than at evaluation."""
    from leanvl.models.checkpoints import load_state_dict_strict
    from leanvl.models.registry import create_model

    with torch.device("meta"):
        model = create_model(name, **kwargs)
    load_state_dict_strict(model, state, f"{source} (converted)", assign=True)


def _save_tied(state: dict[str, torch.Tensor], out: Path) -> None:
    """Like ``_save``, storing tied tensors once (the alias metadata of released weights)."""
    import json

    from safetensors.torch import save_file

    from leanvl.engine.checkpoint import _dedupe_shared

    tensors, aliases = _dedupe_shared(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    tmp.replace(out)
