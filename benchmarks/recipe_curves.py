"""Learning curves of pre-training recipes on the synthetic benchmark, from decoded clips in memory.

    python benchmarks/recipe_curves.py SYNTH_DIR RECIPE [RECIPE ...] [--steps N] [--evals A,B,..]
                                       [--name NAME]

For tuning the CPU demo's recipes quickly on a GPU: every clip of the pretrain, retrieval-test
and MC-test splits is decoded once into (GPU) memory, so a step costs only the model, and each
recipe runs the library's models, losses, optimizer groups and cosine schedule (bf16 autocast on
a GPU). There is no crop augmentation and no checkpointing; ``benchmarks/learning_curve.py``
runs the real training loop instead.

Evaluation after the steps named by ``--evals``: dual-encoder t2v R@1 / R@10 on the 1,000-clip
retrieval split, and for models with a cross-encoder the MC accuracy on temporal and static items
scored as ``leanvl eval mc`` scores them (``option_scores``): by VTM alone, by the dual encoder
alone, and by 0.7 VTM + 0.3 VTC. Recipes are the
``RECIPES`` below; several can run side by side on one GPU as separate processes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _report import table, update_section  # noqa: E402

from leanvl.config import CLIP_MEAN, CLIP_STD  # noqa: E402
from leanvl.data.annotations import captions_of  # noqa: E402
from leanvl.data.text import TextEncoder  # noqa: E402
from leanvl.data.video import read_all_frames, sample_frame_indices  # noqa: E402
from leanvl.engine.optim import cosine_lr, param_groups  # noqa: E402
from leanvl.metrics import rank_summary, text_to_video_ranks  # noqa: E402
from leanvl.models.registry import create_model  # noqa: E402
from leanvl.tasks.mc import option_scores  # noqa: E402

MINILM = {"text_pretrained": "minilm", "text": {"text_layers": 2, "fusion_layers": 1},
          "mlm_ratio": 0.15}
STAGE2 = {"stage": 2, "uta_layers": 2, "video_mask_ratio": 0.5, "mask_type": "random",
          "mlm_ratio": 0.5}
# name: (model, model kwargs, lr, weight decay, lr scales (0 = frozen))
RECIPES: dict[str, tuple[str, dict, float, float, dict]] = {
    "stage2": ("umt_tiny", STAGE2, 5e-4, 0.02, {}),
    "stage2_lr1e-3": ("umt_tiny", STAGE2, 1e-3, 0.02, {}),
    "stage2_minilm": ("umt_tiny", {**STAGE2, **MINILM}, 5e-4, 0.02, {}),
    "stage2_minilm_lr1e-3": ("umt_tiny", {**STAGE2, **MINILM}, 1e-3, 0.02, {}),
    "stage2_minilm_unmasked": ("umt_tiny", {**STAGE2, **MINILM, "video_mask_ratio": 0.0},
                               5e-4, 0.02, {}),
    "stage2_minilm_text_frozen": ("umt_tiny", {**STAGE2, **MINILM}, 5e-4, 0.02,
                                  {"text_encoder.embeddings": 0.0,
                                   "text_encoder.encoder.layer.0": 0.0,
                                   "text_encoder.encoder.layer.1": 0.0}),
    "clip_minilm": ("clip_tiny", {"vision": {"image_size": 96}, "text_pretrained": "minilm",
                                  "text": {"text_layers": 3}}, 1e-3, 0.05, {}),
    "clip_minilm_text_frozen": ("clip_tiny", {"vision": {"image_size": 96},
                                              "text_pretrained": "minilm",
                                              "text": {"text_layers": 3}},
                                1e-3, 0.05, {"text_encoder": 0.0}),
}


def _decode(path: str) -> np.ndarray:
    return read_all_frames(path)


class InMemorySplits:
    """Decoded clips (N x T x H x W x 3 uint8) and tokenised captions of three splits."""

    def __init__(self, root: Path, device: torch.device, frames: int = 4, workers: int = 8):
        self.device, self.frames = device, frames
        self.text = TextEncoder("bert-base-uncased", 64)
        records = {split: [json.loads(line) for line in open(root / f"{split}.jsonl")]
                   for split in ("pretrain", "retrieval_test", "mc_test")}
        with Pool(workers) as pool:
            clips = {split: torch.from_numpy(np.stack(pool.map(
                _decode, [str(root / r["video"]) for r in recs], chunksize=16))).to(device)
                for split, recs in records.items()}
        self.train, self.test, self.mc = clips["pretrain"], clips["retrieval_test"], clips["mc_test"]
        captions = [captions_of(r) for r in records["pretrain"]]
        self.per_clip = min(len(c) for c in captions)
        self.ids, self.mask = self._tokens([c for cs in captions for c in cs[:self.per_clip]])
        self.ids = self.ids.view(len(captions), self.per_clip, -1)
        self.mask = self.mask.view(len(captions), self.per_clip, -1)
        self.test_ids, self.test_mask = self._tokens([captions_of(r)[0]
                                                      for r in records["retrieval_test"]])
        mc = records["mc_test"]
        self.options = len(captions_of(mc[0]))
        self.mc_ids, self.mc_mask = self._tokens([c for r in mc for c in captions_of(r)])
        self.mc_answer = torch.tensor([r["answer"] for r in mc], device=device)
        self.mc_temporal = torch.tensor([r["kind"] == "temporal" for r in mc], device=device)
        total = self.train.shape[1]
        self.eval_frames = sample_frame_indices(frames, total, "middle")
        self.mean = torch.tensor(CLIP_MEAN, device=device).view(1, 1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, device=device).view(1, 1, 3, 1, 1)

    def _tokens(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = self.text(texts)
        return encoded["text_ids"].to(self.device), encoded["text_mask"].to(self.device)

    def video(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 B x T x H x W x 3 -> CLIP-normalised float B x T x 3 x H x W."""
        video = clips.permute(0, 1, 4, 2, 3).float() / 255
        return (video - self.mean) / self.std

    def batch(self, size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Random clips, one random frame per segment, one random caption each."""
        index = torch.randint(len(self.train), (size,), generator=generator)
        total = self.train.shape[1]
        frames = torch.tensor([sample_frame_indices(self.frames, total, "rand",
                                                    rng=np.random.default_rng(int(seed)))
                               for seed in torch.randint(2**31, (size,), generator=generator)])
        caption = torch.randint(self.per_clip, (size,), generator=generator)
        index, frames, caption = (x.to(self.device) for x in (index, frames, caption))
        ids, mask = self.ids[index, caption], self.mask[index, caption]
        length = int(mask.sum(dim=1).max())
        return {"video": self.video(self.train[index[:, None], frames]),
                "text_ids": ids[:, :length], "text_mask": mask[:, :length], "index": index}


@torch.no_grad()
def evaluate(model, data: InMemorySplits, chunk: int = 200) -> dict[str, float]:
    """Dual t2v R@1/R@10 (one caption per clip) and MC accuracy by VTM / dual / 0.7-0.3 mix."""
    model.eval()
    device_type = data.device.type
    with torch.autocast(device_type, torch.bfloat16, enabled=device_type == "cuda"):
        videos = torch.cat([model.encode_video(data.video(data.test[i:i + chunk, data.eval_frames])
                                               ).embedding.float()
                            for i in range(0, len(data.test), chunk)])
        texts = torch.cat([model.encode_text(data.test_ids[i:i + chunk],
                                             data.test_mask[i:i + chunk]).embedding.float()
                           for i in range(0, len(data.test), chunk)])
    ranks = text_to_video_ranks(texts @ videos.t(), torch.arange(len(texts)))
    summary = rank_summary(ranks, ks=(1, 10))
    out = {"R@1": summary["R@1"], "R@10": summary["R@10"]}
    if getattr(model, "needs_rerank", True) and type(model).__name__ != "ImageTextCLIP":
        k, vtm, dual = data.options, [], []
        with torch.autocast(device_type, torch.bfloat16, enabled=device_type == "cuda"):
            for i in range(0, len(data.mc), chunk):
                video = model.encode_video(data.video(data.mc[i:i + chunk, data.eval_frames]))
                n = video.embedding.shape[0]
                text = model.encode_text(data.mc_ids[i * k:(i + n) * k],
                                         data.mc_mask[i * k:(i + n) * k])
                # the library's MC scores: weight 1 is VTM alone, 0 the dual encoder alone
                vtm.append(option_scores(model, video, text, k, vtm_weight=1.0))
                dual.append(option_scores(model, video, text, k, vtm_weight=0.0))
        vtm, dual = torch.cat(vtm), torch.cat(dual)
        for name, scores in (("VTM", vtm), ("dual", dual), ("mix", 0.7 * vtm + 0.3 * dual)):
            right = (scores.argmax(dim=1) == data.mc_answer).float()
            out[f"MC temporal ({name})"] = right[data.mc_temporal].mean().item() * 100
            out[f"MC static ({name})"] = right[~data.mc_temporal].mean().item() * 100
    model.train()
    return out


def run_recipe(name: str, data: InMemorySplits, steps: int, evals: list[int],
               batch_size: int = 64, warmup: float = 0.05, seed: int = 0) -> list[dict]:
    """Train recipe ``name`` for ``steps`` steps; one result row per evaluation step."""
    model_name, kwargs, lr, weight_decay, lr_scales = RECIPES[name]
    torch.manual_seed(seed)
    model = create_model(model_name, **kwargs).to(data.device)
    frozen = [p for n, p in model.named_parameters()
              if any(n.startswith(prefix) for prefix, s in lr_scales.items() if s == 0)]
    for param in frozen:
        param.requires_grad_(False)
    groups = param_groups(model, weight_decay, lr)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(seed)
    warmup_steps, rows, start = int(warmup * steps), [], time.time()
    model.train()
    for step in range(steps):
        factor = cosine_lr(step, lr, 0.01 * lr, warmup_steps, steps) / lr
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] * factor
        with torch.autocast(data.device.type, torch.bfloat16,
                            enabled=data.device.type == "cuda"):
            losses = model.pretrain_losses(data.batch(batch_size, generator))
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if step + 1 in evals:
            row = {"recipe": name, "step": step + 1, **evaluate(model, data),
                   **{f"loss {k}": v.item() for k, v in losses.items()},
                   "seconds": time.time() - start}
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
                  flush=True)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("synth")
    parser.add_argument("recipes", nargs="+", choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--evals", default="250,500,1000,1500")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--name", default="", help="write a docs/benchmarks.md section")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    evals = [int(x) for x in args.evals.split(",") if int(x) <= args.steps]
    data = InMemorySplits(Path(args.synth), device)
    rows = [row for recipe in args.recipes
            for row in run_recipe(recipe, data, args.steps, evals, args.batch_size)]
    if args.name:
        keys = ["R@1", "R@10", "MC temporal (mix)", "MC static (mix)"]
        body = table(["recipe", "step", *keys],
                     [[r["recipe"], r["step"], *(f"{r[k]:.1f}" if k in r else "-" for k in keys)]
                      for r in rows])
        command = " ".join(["python benchmarks/recipe_curves.py SYNTH", *args.recipes,
                            f"--steps {args.steps}", f"--evals {args.evals}"])
        update_section(f"recipes-{args.name}", f"Recipe curves: {args.name}", command, body)


if __name__ == "__main__":
    main()
