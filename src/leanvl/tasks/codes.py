"""Discrete visual codes of a video tokenizer: one clip's codes and a picture of them, and the
codebook usage over a dataset (``leanvl tokenize``).

Works with any model that has ``codes(video) -> B x T x h x w`` (long) and a ``quantizer``
with ``num_codes`` (``vq.VectorQuantizer``), such as E-ViLM's tokenizer; ``input_mean`` /
``input_std`` on the model give its normalisation (ImageNet's when absent).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leanvl.config import IMAGENET_MEAN, IMAGENET_STD
from leanvl.vq import code_usage


def _check_tokenizer(model) -> None:
    if not (hasattr(model, "codes") and hasattr(model, "quantizer")):
        raise TypeError(f"{type(model).__name__} is not a video tokenizer (it has no codes() "
                        "and quantizer); give released tokenizer weights, e.g. from "
                        "`leanvl pretrain evilm_tokenizer`")


def clip_codes(model, video: str | Path, num_frames: int, size: int, backend: str = "pyav"
               ) -> dict[str, Any]:
    """The codes of one clip (frames sampled at segment middles, resized and centre-cropped as
    in evaluation): {frames (T x size x size x 3 uint8), frame_indices, codes (T x h x w)}."""
    from leanvl.data.transforms import ClipTransform, to_tensor_clip
    from leanvl.data.video import read_frames

    _check_tokenizer(model)
    frames, indices = read_frames(str(video), num_frames, sampling="middle", backend=backend)
    transform = ClipTransform(size, train=False, mean=getattr(model, "input_mean", IMAGENET_MEAN),
                              std=getattr(model, "input_std", IMAGENET_STD))
    clip = transform(to_tensor_clip(frames))
    with torch.no_grad():
        codes = model.codes(clip[None].to(next(model.parameters()).device))[0].cpu()
    shown = transform.denormalize(clip).permute(0, 2, 3, 1).numpy()
    return {"frames": shown, "frame_indices": list(indices), "codes": codes}


def code_colours(codes: torch.Tensor, num_codes: int) -> np.ndarray:
    """An RGB colour per code (a fixed pseudo-random palette, so equal codes share a colour in
    every picture): codes' shape x 3, floats in [0, 1]."""
    palette = np.random.default_rng(0).uniform(0.1, 0.95, size=(num_codes, 3))
    return palette[codes.numpy()]


def codes_picture(result: dict[str, Any], num_codes: int, path: str | Path,
                  title: str = "") -> Path:
    """Frames (top row) and their codes (bottom row: one coloured cell per code, labelled
    with its index when the grid is small enough to read) as a PNG."""
    from leanvl.report import _pyplot, save_figure

    plt = _pyplot()
    frames, codes = result["frames"], result["codes"]
    count, height, width = codes.shape
    fig, axes = plt.subplots(2, count, figsize=(2.4 * count, 5.0), squeeze=False)
    colours = code_colours(codes, num_codes)
    for t in range(count):
        top, bottom = axes[0, t], axes[1, t]
        top.imshow(frames[t])
        cell_h, cell_w = frames[t].shape[0] / height, frames[t].shape[1] / width
        for row in range(1, height):
            top.axhline(row * cell_h - 0.5, color="white", lw=0.5, alpha=0.6)
        for col in range(1, width):
            top.axvline(col * cell_w - 0.5, color="white", lw=0.5, alpha=0.6)
        top.set_title(f"frame {result['frame_indices'][t]}", fontsize=8)
        bottom.imshow(colours[t], interpolation="nearest")
        if height * width <= 100:
            for row in range(height):
                for col in range(width):
                    bottom.text(col, row, str(int(codes[t, row, col])), ha="center",
                                va="center", fontsize=6 if width > 6 else 8)
        for axis in (top, bottom):
            axis.set_xticks([])
            axis.set_yticks([])
    return save_figure(fig, path, title)


def write_clip_codes(model, video: str | Path, out: str | Path, num_frames: int, size: int,
                     backend: str = "pyav") -> dict[str, Any]:
    """``leanvl tokenize VIDEO``: the picture at ``out`` and the codes as JSON beside it
    (same name, ``.json``); returns a summary."""
    result = clip_codes(model, video, num_frames, size, backend)
    codes = result["codes"]
    num_codes = int(model.quantizer.num_codes)
    picture = codes_picture(result, num_codes, out, title=f"{Path(video).name}: "
                            f"{codes.unique().numel()} distinct codes of {num_codes}")
    record = {"video": str(video), "frame_indices": result["frame_indices"],
              "grid": list(codes.shape), "num_codes": num_codes, "codes": codes.tolist()}
    json_path = picture.with_suffix(".json")
    json_path.write_text(json.dumps(record))
    return {"picture": str(picture), "codes": str(json_path), "grid": list(codes.shape),
            "distinct_codes": int(codes.unique().numel())}


@torch.no_grad()
def codebook_statistics(model, loader, device: torch.device | str = "cpu",
                        progress_bar: bool = True) -> dict[str, Any]:
    """Utilisation (share of the codebook some token of some clip chose) and perplexity of the
    codes a tokenizer gives every clip of ``loader``."""
    from leanvl.tasks.common import evaluating, progress

    _check_tokenizer(model)
    counts = torch.zeros(int(model.quantizer.num_codes), dtype=torch.long)
    clips = 0
    with evaluating(model):
        for batch in progress(loader, "codes", enabled=progress_bar):
            codes = model.codes(batch["video"].to(device)).cpu()
            counts += torch.bincount(codes.reshape(-1), minlength=counts.numel())
            clips += codes.shape[0]
    return {"clips": clips, "tokens": int(counts.sum()), "num_codes": int(counts.numel()),
            "codes_used": int((counts > 0).sum()), **code_usage(counts)}


def dataset_codebook_statistics(model, annotations: str | Path, root: str | None, data_cfg: Any,
                                batch_size: int = 32, progress_bar: bool = True
                                ) -> dict[str, Any]:
    """``codebook_statistics`` over the clips of an annotation file (evaluation transforms)."""
    from leanvl.data.datasets import Collator, build_dataset
    from leanvl.tasks.common import eval_loader

    dataset = build_dataset(annotations, root, data_cfg, train=False)
    loader = eval_loader(dataset, Collator(None), batch_size, data_cfg.num_workers)
    device = next(model.parameters()).device
    return codebook_statistics(model, loader, device, progress_bar)
