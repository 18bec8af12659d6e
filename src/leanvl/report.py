"""The demo's report folder: ``README.md`` plus PNG plots (loss curves, the teacher's semantic
mask over sample frames, top retrieved clips for a few queries)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, title: str = "", dpi: int = 100) -> Path:
    """Lay out ``fig`` (with ``title`` above it), write it to ``path`` (folders made), close it."""
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


#: what the trainer logs besides the named losses and their weighted total ``loss`` (and besides
#: ``eval/...`` and a model's step metrics, ``metric/...``)
NOT_LOSSES = {"step", "epoch", "lr", "clips_per_s", "data_time", "step_time", "skipped",
              "bad_samples", "grad_norm"}


def read_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    """The JSONL training log of one stage (empty if absent)."""
    path = stage_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(stages: list[Path], path: Path) -> Path | None:
    """One panel per stage with every logged loss against the step."""
    logs = [(stage.name, read_metrics(stage)) for stage in stages]
    logs = [(name, rows) for name, rows in logs if rows]
    if not logs:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(logs), figsize=(4.5 * len(logs), 3.4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], logs, strict=True):
        keys = sorted({k for row in rows for k, v in row.items()
                       if k not in NOT_LOSSES and not k.startswith(("eval/", "metric/"))
                       and isinstance(v, int | float) and v > 0})
        for key in keys:
            points = [(row["step"], row[key]) for row in rows if key in row and row[key] > 0]
            ax.plot(*zip(*points, strict=True), label=key,
                    linewidth=2.0 if key == "loss" else 1.0)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _frames_uint8(transform, clip: torch.Tensor) -> np.ndarray:
    return transform.denormalize(clip).permute(0, 2, 3, 1).numpy()


def plot_masking(teacher_path: str, dataset, path: Path, ratio: float = 0.8, clips: int = 3,
                 seed: int = 0) -> Path:
    """Sample frames with the patches the semantic mask drops dimmed (what the student sees)."""
    from leanvl.masking import semantic_mask
    from leanvl.models.teachers import CLIPVisionTeacher

    teacher = CLIPVisionTeacher.from_file(teacher_path)
    transform = dataset.reader.transform
    plt = _pyplot()
    frames_per = dataset.reader.num_frames
    fig, axes = plt.subplots(clips, frames_per, figsize=(1.8 * frames_per, 1.9 * clips),
                             squeeze=False)
    generator = torch.Generator().manual_seed(seed)
    for row in range(clips):
        clip = dataset[row]["video"]
        output = teacher(teacher.renormalize(clip[None], transform.mean.view(-1).div(255).tolist(),
                                             transform.std.view(-1).div(255).tolist()))
        mask = semantic_mask(output.attention, ratio, generator=generator)[0]
        frames = _frames_uint8(transform, clip).astype(np.float32)
        patch = teacher.patch_size
        grid = frames.shape[1] // patch, frames.shape[2] // patch
        mask = mask.view(frames_per, *grid).numpy()
        for t in range(frames_per):
            shade = np.kron(mask[t], np.ones((patch, patch)))[..., None]
            shown = frames[t] * (1 - 0.75 * shade)
            axes[row, t].imshow(shown.astype(np.uint8))
            axes[row, t].axis("off")
    fig.suptitle(f"semantic masking ({ratio:.0%} of patches dropped, dimmed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_top_retrievals(scores: torch.Tensor, dataset, texts: list[str], path: Path,
                        queries: int = 3, top: int = 3) -> Path:
    """For a few text queries, the middle frame of the top retrieved clips (green = correct)."""
    plt = _pyplot()
    _, owners = dataset.texts()
    fig, axes = plt.subplots(queries, top, figsize=(2.4 * top, 2.9 * queries), squeeze=False)
    transform = dataset.reader.transform
    for row in range(queries):
        query = row * max(1, len(texts) // queries)
        best = scores[query].topk(top).indices.tolist()
        for col, video in enumerate(best):
            clip = dataset[video]["video"]
            frame = _frames_uint8(transform, clip)[clip.shape[0] // 2]
            ax = axes[row, col]
            ax.imshow(frame)
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "green" if video == owners[query] else "red"
            for side in ax.spines.values():
                side.set_edgecolor(colour)
                side.set_linewidth(3)
        caption = texts[query]
        axes[row, 0].set_title(caption[:70] + ("..." if len(caption) > 70 else ""),
                               fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(folder: Path, results: dict[str, Any], timings: dict[str, float], table: str,
                 stages: list[Path], model_dir: Path, synth_root: Path, teacher: str | None,
                 cfg) -> Path:
    """Write README.md and the plots into ``folder``; returns the README path."""
    from leanvl.data.datasets import build_dataset

    folder.mkdir(parents=True, exist_ok=True)
    sections = ["# leanvl demo report", "", "```", table, "```", ""]
    losses = plot_losses(stages, folder / "losses.png")
    if losses:
        sections += ["## Training losses", "", "![losses](losses.png)", ""]
    dataset = build_dataset(synth_root / "retrieval_test.jsonl", str(synth_root), cfg.data,
                            train=False)
    if teacher and Path(teacher).is_file():
        ratio = float(cfg.model.kwargs.get("video_mask_ratio", 0.8))
        plot_masking(teacher, dataset, folder / "masking.png", ratio=ratio)
        sections += ["## Semantic masking", "", "Patches the teacher's attention leaves out "
                     "are dimmed; the student sees only the bright ones.", "",
                     "![masking](masking.png)", ""]
    scores = results["retrieval"].pop("scores", None)
    if scores is not None:
        texts, _ = dataset.texts()
        key = "rerank_t2v" if "rerank_t2v" in scores else "dual"
        plot_top_retrievals(scores[key], dataset, texts, folder / "retrieval.png")
        sections += ["## Top retrieved clips", "", "Middle frames of the three best clips for a "
                     "few test captions (green: the clip the caption describes).", "",
                     "![retrieval](retrieval.png)", ""]
    sections += ["## All numbers", "", "```json",
                 json.dumps({"results": results, "timings": timings}, indent=1, default=float),
                 "```", "", f"Model: `{model_dir}`"]
    readme = folder / "README.md"
    readme.write_text("\n".join(sections) + "\n")
    return readme
