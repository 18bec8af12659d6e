"""What a demo teacher gives UMT to distil: how alike its tokens are, within a clip and across clips.

    python benchmarks/teacher_targets.py DEMO_DIR [--clips 64]

DEMO_DIR is a ``leanvl demo`` folder (its ``synth/``, ``teacher/clip_visual.safetensors`` and
``stage1/model``). On ``--clips`` pre-training clips, sampled as stage 1 samples them but without
augmentation, the script measures:

- for the teacher's UTA targets (each returned layer after ``ln_post`` and the projection, the
  tensors stage 1 aligns to), the mean cosine between two tokens of the same clip and between
  tokens of different clips;
- the entropy of its last block's [CLS] attention over the patches, as a fraction of the uniform
  distribution's (1.0 = uniform: semantic masking then samples like random masking);
- the same token cosines for the final tokens of the UMT-tiny student: randomly initialised,
  after stage 1, and (where the folder has them) after stage 2 and after the ablation's stage 2
  alone (``stage2_only``).

The demo teacher and a randomly initialised teacher of the same size are compared.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from _report import table, update_section  # noqa: E402

from leanvl.config import load_config, to_object  # noqa: E402
from leanvl.data.datasets import build_dataset  # noqa: E402
from leanvl.engine.checkpoint import load_pretrained  # noqa: E402
from leanvl.models.registry import create_model  # noqa: E402
from leanvl.models.teachers import CLIPVisionTeacher  # noqa: E402


def token_cosines(tokens: torch.Tensor) -> tuple[float, float]:
    """Mean cosine between two tokens of one clip and between tokens of different clips
    (B x N x D; a token's similarity with itself is left out)."""
    x = F.normalize(tokens.float(), dim=-1)
    batch, count = x.shape[:2]
    gram = torch.einsum("bnd,cmd->bcnm", x, x)
    same = gram[torch.arange(batch), torch.arange(batch)]  # B x N x N
    within = (same.sum() - same.diagonal(dim1=-2, dim2=-1).sum()) / (batch * count * (count - 1))
    across = (gram.sum() - same.sum()) / (batch * (batch - 1) * count * count)
    return within.item(), across.item()


def attention_entropy(attention: torch.Tensor) -> float:
    """Entropy of each frame's [CLS] attention over patches / log(patches), averaged."""
    p = attention.float().clamp_min(1e-12)
    return ((-(p * p.log()).sum(-1)).mean() / math.log(attention.shape[-1])).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo")
    parser.add_argument("--clips", type=int, default=64)
    args = parser.parse_args()
    demo = Path(args.demo)
    synth = demo / "synth"
    torch.manual_seed(0)
    cfg = to_object(load_config("demo_umt_stage1", [f"data.root={synth}"]))
    dataset = build_dataset(synth / "pretrain.jsonl", str(synth), cfg.data, train=False)
    video = torch.stack([dataset[i]["video"] for i in range(args.clips)])
    student = load_pretrained(demo / "stage1" / "model")
    layers = student.pretrained_config["kwargs"]["uta_layers"]
    teachers = [("demo teacher (trained)",
                 CLIPVisionTeacher.from_file(demo / "teacher" / "clip_visual.safetensors",
                                             return_layers=layers)),
                ("random initialisation, same size",
                 CLIPVisionTeacher.from_size("tiny", image_size=video.shape[-1],
                                             return_layers=layers))]
    rows = []
    with torch.no_grad():
        for label, teacher in teachers:
            student.teacher = teacher.eval()  # released weights leave the teacher out
            output = teacher(student.teacher_input(video))
            for index, target in enumerate(output.layers):
                within, across = token_cosines(target)
                rows.append([f"teacher: {label}", f"UTA target {index + 1} of {layers}",
                             f"{within:.3f}", f"{across:.3f}",
                             f"{attention_entropy(output.attention):.3f}"])
        fresh = create_model(student.pretrained_config["name"],
                             **student.pretrained_config.get("kwargs", {})).eval()
        students = [("student: random initialisation", fresh),
                    ("student: after demo stage 1", student)]
        for label, folder in (("student: after demo stage 2", "stage2"),
                              ("student: stage 2 alone (ablation)", "stage2_only")):
            if (demo / folder / "model" / "config.json").is_file():
                students.append((label, load_pretrained(demo / folder / "model")))
        for label, model in students:
            within, across = token_cosines(model.encode_video(video).tokens)
            rows.append([label, "final tokens", f"{within:.3f}", f"{across:.3f}", "-"])
    headers = ["model", "tokens", "cosine within a clip", "cosine across clips",
               "[CLS] attention entropy (1 = uniform)"]
    body = (f"{args.clips} pre-training clips of the demo's benchmark, {cfg.data.num_frames} "
            f"frames at {cfg.data.size}x{cfg.data.size}, without augmentation. Cosines are means "
            "over token pairs (a token with itself left out).\n\n" + table(headers, rows))
    update_section("teacher-targets", "What the demo teacher gives UMT to distil",
                   "python benchmarks/teacher_targets.py DEMO_DIR", body)


if __name__ == "__main__":
    main()
