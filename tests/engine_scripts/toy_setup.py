"""A tiny model and dataset implementing the engine's contract, shared by tests/test_engine.py
and the torchrun script beside this file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from leanvl.config import load_config


class ToyDataset(Dataset):
    """``n`` random feature vectors with a linear target; ``bad`` indices report a skipped file."""

    def __init__(self, n: int = 24, dim: int = 6, seed: int = 0, bad: tuple[int, ...] = ()):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=generator)
        weight = 0.3 * torch.randn(dim, 2, generator=generator)
        self.y = self.x @ weight + 0.1 * torch.randn(n, 2, generator=generator)
        self.bad = set(bad)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"video": self.x[index], "target": self.y[index], "index": index,
                "caption": f"item {index}",
                "skipped": [f"broken_{index}.mp4"] if index in self.bad else []}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Dict batches like the real Collator: stacked tensors, lists kept as lists."""
    return {"video": torch.stack([s["video"] for s in samples]),
            "target": torch.stack([s["target"] for s in samples]),
            "index": torch.tensor([s["index"] for s in samples]),
            "caption": [s["caption"] for s in samples],
            "skipped": [name for s in samples for name in s["skipped"]]}


class ToyModel(nn.Module):
    """An MLP regressor with dropout, a frozen 'teacher' and a position-like parameter."""

    frozen_prefixes = ("teacher.",)

    def __init__(self, dim: int = 6, hidden: int = 16, dropout: float = 0.2):
        super().__init__()
        self.embed = nn.Linear(dim, hidden)
        self.pos = nn.Parameter(torch.zeros(1, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 2)
        self.teacher = nn.Linear(dim, 2)
        self.register_buffer("teacher_scale", torch.ones(2))
        self.calls = 0

    def no_weight_decay(self) -> set[str]:
        return {"pos"}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(F.gelu(self.norm(self.embed(video) + self.pos))))

    def pretrain_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        assert isinstance(batch["caption"], list)  # lists travel untouched
        self.calls += 1
        prediction = self(batch["video"])
        with torch.no_grad():
            teacher = self.teacher(batch["video"]) * self.teacher_scale
        return {"regression": F.mse_loss(prediction, batch["target"]),
                "distill": F.mse_loss(prediction, teacher)}


def toy_config(out: str | Path, overrides: list[str] = ()) -> Any:
    """A fast fp32 recipe writing to ``out``."""
    base = [f"out={out}", "seed=3", "train.epochs=3", "train.lr=0.02", "train.min_lr=0.001",
            "train.warmup_steps=2", "train.weight_decay=0.05", "train.log_every=1",
            "train.precision=fp32", "train.loss_weights={distill: 0.5}",
            "data.max_bad_fraction=0.5"]
    return load_config(None, base + list(overrides))


def run_ddp_toy(out: str | Path, global_batch: int = 8) -> dict[str, Any] | None:
    """Train the dropout-free toy with ``global_batch`` split over the ranks; rank 0 returns
    (and writes to ``out/result.json``) the losses and final parameters."""
    from leanvl.engine import distributed
    from leanvl.engine.trainer import Trainer

    distributed.init_distributed("gloo")
    world, rank = distributed.world_size(), distributed.rank()
    torch.manual_seed(0)
    model = ToyModel(dropout=0.0)
    dataset = ToyDataset(n=32)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=global_batch // world, sampler=sampler,
                        collate_fn=collate, drop_last=True)
    cfg = toy_config(out, ["train.epochs=2", "train.clip_grad=1.0"])
    result = Trainer(cfg, model, loader, device="cpu", progress=False).fit()
    summary = None
    if rank == 0:
        summary = {"world_size": world,
                   "losses": [h["loss"] for h in result["history"]],
                   "regression": [h["regression"] for h in result["history"]],
                   "params": {k: v.tolist() for k, v in model.state_dict().items()}}
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "result.json").write_text(json.dumps(summary))
    distributed.cleanup()
    return summary


# -- sharded evaluation ------------------------------------------------------------------------

def toy_tokenize(texts: list[str]) -> dict[str, torch.Tensor]:
    """One id per character (1..29), padded to the batch's longest text."""
    ids = [[ord(c) % 29 + 1 for c in text] for text in texts]
    length = max(len(row) for row in ids)
    text_ids = torch.zeros(len(ids), length, dtype=torch.long)
    for i, row in enumerate(ids):
        text_ids[i, :len(row)] = torch.tensor(row)
    return {"text_ids": text_ids, "text_mask": (text_ids > 0).long()}


class ToyClips(Dataset):
    """``n`` random 2-frame clips; clip i has i % 3 + 1 captions of different lengths."""

    def __init__(self, n: int = 7):
        generator = torch.Generator().manual_seed(1)
        self.clips = torch.randn(n, 2, 3, 4, 4, generator=generator)
        self.captions = [[f"clip {i}" + " x" * j for j in range(i % 3 + 1)] for i in range(n)]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"video": self.clips[index], "index": index, "caption": self.captions[index][0]}

    def texts(self) -> tuple[list[str], list[int]]:
        pairs = [(text, i) for i, caps in enumerate(self.captions) for text in caps]
        return [t for t, _ in pairs], [i for _, i in pairs]


class ToyTasks(ToyClips):
    """``ToyClips`` as multiple-choice items (3 options, the last item 4), questions with
    answers from ``ANSWERS`` (one outside them) and 3-class labels, with two records per
    ``video`` for averaging views; ``records`` carry each item's ``kind`` and ``video``."""

    ANSWERS = ["red", "green", "blue", "left", "right"]

    def __init__(self, task: str, n: int = 7):
        super().__init__(n)
        self.task = task
        self.records = [{"kind": ("even", "odd")[i % 2], "video": f"video{i // 2}"}
                        for i in range(n)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = {"video": self.clips[index], "index": index}
        if self.task == "mc":
            count = 4 if index == len(self) - 1 else 3
            sample.update(options=[f"option {j} of {index}" + " y" * j for j in range(count)],
                          answer=index % count)
        elif self.task == "qa":
            sample.update(question=f"what is clip {index}?",
                          answer=(self.ANSWERS + ["purple"])[index % 6])
        else:
            sample["label"] = index // 2 % 3  # the views of a video share it
        return sample


class ToyRetrievalModel(nn.Module):
    """Frame tokens and character tokens, cosine similarity, a linear cross-encoder and a
    3-class head; counts the clips, texts and pairs it is asked to encode or match."""

    def __init__(self, dim: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.frames = nn.Linear(3 * 4 * 4, dim)
        self.chars = nn.Embedding(30, dim)
        self.head = nn.Linear(2 * dim, 1)
        self.classes = nn.Linear(dim, 3)
        self.counts = {"videos": 0, "texts": 0, "pairs": 0}

    def encode_video(self, video: torch.Tensor):
        from leanvl.models.base import VideoFeatures

        self.counts["videos"] += len(video)
        tokens = self.frames(video.flatten(2))
        return VideoFeatures(tokens, F.normalize(tokens.mean(1), dim=-1))

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor):
        from leanvl.models.base import TextFeatures

        self.counts["texts"] += len(text_ids)
        tokens = self.chars(text_ids) * text_mask[..., None]
        pooled = tokens.sum(1) / text_mask.sum(1, keepdim=True)
        return TextFeatures(tokens, text_mask, F.normalize(pooled, dim=-1))

    def similarity(self, video, text) -> torch.Tensor:
        return video.embedding @ text.embedding.t()

    def match(self, video, text) -> torch.Tensor:
        self.counts["pairs"] += len(video.tokens)
        words = (text.tokens * text.mask[..., None]).sum(1) / text.mask.sum(1, keepdim=True)
        return self.head(torch.cat([video.tokens.mean(1), words], dim=-1)).squeeze(-1)

    def classify_logits(self, video: torch.Tensor) -> torch.Tensor:
        return self.classes(self.encode_video(video).tokens.mean(1))


def run_toy_eval(out: str | Path) -> dict[str, Any]:
    """Retrieval (re-ranking the top 3) of the toy model on ``ToyClips``, then multiple choice,
    QA, classification and a linear probe on ``ToyTasks``, on every rank; each rank writes
    ``out/rank{r}.json``: metrics, score matrices, predictions and what it encoded."""
    from leanvl.config import EvalConfig
    from leanvl.engine import distributed
    from leanvl.tasks.classify import evaluate_classification, linear_probe
    from leanvl.tasks.common import gather_rows, shard
    from leanvl.tasks.mc import evaluate_mc
    from leanvl.tasks.qa import evaluate_qa
    from leanvl.tasks.retrieval import evaluate_retrieval

    distributed.init_distributed("gloo")
    model = ToyRetrievalModel()
    result = evaluate_retrieval(model, ToyClips(), toy_tokenize, EvalConfig(rerank_k=3),
                                batch_size=2, progress_bar=False, return_scores=True)
    scores = result.pop("scores")
    counts = dict(model.counts)
    # the other evaluations, each split over the ranks the same way
    model.counts.update(videos=0)
    tasks = {
        "mc": evaluate_mc(model, ToyTasks("mc"), toy_tokenize, EvalConfig(mc_vtm_weight=0.7),
                          batch_size=3, progress_bar=False, return_predictions=True),
        "qa": evaluate_qa(model, ToyTasks("qa"), toy_tokenize,
                          EvalConfig(qa_mode="rank", rerank_k=3), batch_size=2,
                          answers=ToyTasks.ANSWERS, progress_bar=False, return_predictions=True),
        "classify": evaluate_classification(model, ToyTasks("classify"), batch_size=2,
                                            group_by="video", progress_bar=False,
                                            return_predictions=True),
        "probe": linear_probe(model, ToyTasks("classify"), ToyTasks("classify", n=5),
                              batch_size=2, epochs=5, progress_bar=False,
                              return_predictions=True),
        # fewer items than ranks: every rank does the one item, nothing is gathered
        "mc_one_item": evaluate_mc(model, ToyTasks("mc", n=1), toy_tokenize, EvalConfig(),
                                   progress_bar=False, return_predictions=True),
    }
    task_videos = model.counts["videos"]
    rank, world = distributed.rank(), distributed.world_size()
    # dtypes the features may have under autocast, and masks; one row per transfer
    mine = torch.arange(15, dtype=torch.float32).reshape(5, 3)[shard(5)]
    halves = gather_rows(mine.to(torch.bfloat16), 5, chunk_bytes=6)
    flags = gather_rows(mine > 7, 5, chunk_bytes=1)
    summary = {"world_size": world, "counts": counts, "task_videos": task_videos,
               "metrics": {k: v for k, v in result.items() if not k.startswith("seconds")},
               "tasks": {task: {k: v for k, v in metrics.items() if k != "seconds"}
                         for task, metrics in tasks.items()},
               "scores": {k: v.tolist() for k, v in scores.items()},
               "bf16": halves.float().tolist(), "bool": flags.tolist()}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(summary))
    distributed.cleanup()
    return summary
