"""Which way a clip plays: where pre-trained models stand on the synthetic benchmark's temporal facts.

    python benchmarks/temporal_mc.py SYNTH NAME=MODEL [NAME=MODEL ...] [--clips 256]

SYNTH is a synthetic benchmark folder (``leanvl data synth`` or a demo's ``synth/``); each
MODEL is a folder of released pre-training weights (e.g. a demo's ``stage2/model``; a
video-only one such as ``stage1/model`` gets only the cosine below), evaluated zero-shot on 4
frames at 96x96 like the demo (bf16 autocast on CPUs with native bf16, as the demo
evaluates). For each model:

- **multiple choice** (``leanvl eval mc``'s scoring, ``eval.mc_vtm_weight``): static and
  temporal items, and the temporal ones split by what reversal changes: one object's motion
  (left / right, clockwise / anticlockwise, grow / shrink, appear / disappear) or the order of
  two time-symmetric events (blink, jump, pulse). Chance is 20%.
- **pre-training clips against their reversal**: for ``--clips`` pre-training clips whose time
  reversal contradicts their caption (a directional motion or an order), how often the model
  scores (clip, caption) above (the clip played backwards, the same caption), by VTM and by
  VTC. These clips were trained on, so 50% (chance) here means the model did not learn to tell
  a clip from its reversal at all, not that it failed to generalise. Beside them, the mean
  cosine between the video embeddings of each clip and of its reversal (1: the embedding is
  blind to the direction), and for scale between those of two different clips.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import table, update_section  # noqa: E402

from leanvl.config import load_config, to_object  # noqa: E402
from leanvl.data.annotations import captions_of  # noqa: E402
from leanvl.data.datasets import build_dataset  # noqa: E402
from leanvl.data.synthetic import temporal_fact_keys  # noqa: E402
from leanvl.demo import cpu_settings  # noqa: E402
from leanvl.engine.precision import autocast  # noqa: E402
from leanvl.tasks.build import build_text_encoder, configure_threads  # noqa: E402
from leanvl.tasks.finetune import load_finetuned  # noqa: E402
from leanvl.tasks.mc import evaluate_mc  # noqa: E402

# as the demo evaluates (its captions run past the default 40 tokens)
DATA = ["data.num_frames=4", "data.size=96", "data.max_text_len=64", "data.num_workers=1",
        "eval.batch_size=64"]


def mc_split(model, cfg, synth: Path, device) -> dict[str, float]:
    """MC accuracy (%) on static items, temporal items, and the two kinds of temporal items."""
    dataset = build_dataset(synth / "mc_test.jsonl", str(synth), cfg.data, train=False, kind="mc")
    with torch.no_grad(), autocast(cfg.train.precision, device.type):
        results = evaluate_mc(model, dataset, build_text_encoder(cfg.data, model), cfg.eval,
                              device, batch_size=cfg.eval.batch_size, num_workers=1,
                              progress_bar=False, return_predictions=True)
    groups: dict[str, list[bool]] = {"temporal: one motion": [], "temporal: order": []}
    for record, choice in zip(dataset.records, results["predictions"], strict=True):
        if record.get("kind") == "temporal":
            key = "temporal: order" if record.get("changed") == "order" else "temporal: one motion"
            groups[key].append(choice == record["answer"])
    out = {"static": results["accuracy/static"], "temporal": results["accuracy/temporal"]}
    out.update({k: 100 * sum(v) / max(1, len(v)) for k, v in groups.items()})
    return out


def against_reversal(model, cfg, synth: Path, clips: int, device) -> dict[str, float]:
    """% of pre-training clips scored above their own reversal with their caption (VTM, VTC;
    left out for a model without a text side), and the mean cosine of their video embeddings
    ("cosine") and, for scale, of two different clips' ("other")."""
    dataset = build_dataset(synth / "pretrain.jsonl", str(synth), cfg.data, train=False,
                            kind="retrieval")
    has_text = getattr(model, "text_encoder", True) is not None  # a stage-1 UMT has none
    text = build_text_encoder(cfg.data, model) if has_text else None
    items = [i for i, r in enumerate(dataset.records) if temporal_fact_keys(r["facts"])][:clips]
    wins = {"VTM": 0.0, "VTC": 0.0}
    cosine = other = 0.0
    for start in range(0, len(items), 32):
        chunk = items[start:start + 32]
        video = torch.stack([dataset[i]["video"] for i in chunk]).to(device)
        with torch.no_grad(), autocast(cfg.train.precision, device.type):
            forward, backward = model.encode_video(video), model.encode_video(video.flip(1))
            embedding = forward.embedding.float()
            cosine += float((embedding * backward.embedding.float()).sum())
            other += float((embedding * embedding.roll(1, 0)).sum())  # the next clip's
            if text is None:
                continue
            captions = [captions_of(dataset.records[i])[0] for i in chunk]
            encoded = {k: v.to(device) for k, v in text(captions).items()}
            words = model.encode_text(encoded["text_ids"], encoded["text_mask"])
            margins = {"VTM": model.match(forward, words) - model.match(backward, words),
                       "VTC": ((forward.embedding - backward.embedding).float()
                               * words.embedding.float()).sum(-1)}
            for key, margin in margins.items():  # a tie is half a win: chance stays 50%
                wins[key] += float(margin.gt(0).sum() + 0.5 * margin.eq(0).sum())
    count = max(1, len(items))
    scores = {k: 100 * v / count for k, v in wins.items()} if text is not None else {}
    return {**scores, "cosine": cosine / count, "other": other / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("synth", type=Path)
    parser.add_argument("models", nargs="+", help="NAME=MODEL_DIR")
    parser.add_argument("--clips", type=int, default=256)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = to_object(load_config(None, DATA + cpu_settings() + [f"data.root={args.synth}"]))
    configure_threads(cfg.data.num_workers, cfg.data.cpu_threads)
    rows = []
    for spec in args.models:
        name, _, folder = spec.partition("=")  # a name has no "="; a path may
        name, folder = (name, folder) if folder else ("", name)
        model, _, _ = load_finetuned(folder)
        model = model.to(device).eval()
        pairs = against_reversal(model, cfg, args.synth, args.clips, device)
        if "VTM" in pairs:
            mc = mc_split(model, cfg, args.synth, device)
            scores = [*(f"{mc[k]:.1f}" for k in mc), f"{pairs['VTM']:.1f}", f"{pairs['VTC']:.1f}"]
        else:  # video only: the direction in its embedding
            scores = ["-"] * 6
        rows.append([name or folder, *scores, f"{pairs['cosine']:.4f}", f"{pairs['other']:.4f}"])
        print(rows[-1], flush=True)
    body = (f"Zero-shot on SYNTH (4 frames at 96x96, {cfg.train.precision}, MC by "
            f"`eval.mc_vtm_weight={cfg.eval.mc_vtm_weight:g}`); the last four columns over "
            f"{args.clips} pre-training clips whose reversal contradicts their caption. "
            "Accuracies in % (MC chance 20, clip against its reversal chance 50); the cosine "
            "is between the video embeddings of a clip and of its reversal, and for scale "
            "between those of two of these clips.\n\n"
            + table(["model", "MC static", "MC temporal", "temporal: one motion",
                     "temporal: order", "clip over its reversal, VTM",
                     "clip over its reversal, VTC", "embedding cosine, clip vs reversal",
                     "vs another clip"],
                    rows))
    update_section("temporal-mc", "Temporal facts: multiple choice and clips against their reversal",
                   f"python benchmarks/temporal_mc.py SYNTH NAME=MODEL ... --clips {args.clips}",
                   body)


if __name__ == "__main__":
    main()
