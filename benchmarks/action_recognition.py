"""Action recognition on the synthetic benchmark: linear probe and full fine-tuning of the demo's
UMT backbones, and how often a clip is taken for its own time reversal.

    python benchmarks/action_recognition.py DEMO_DIR [--epochs 8] [key=value ...]

DEMO_DIR is a ``leanvl demo`` folder (its ``synth/``, ``stage1/model`` and ``stage2/model``);
a randomly initialised UMT-tiny is the baseline. The demo's benchmark has no classification
clips; the script adds the default 2,000 + 500 to it, rendered like the demo's clips. For each
backbone:

- **linear probe** (``leanvl eval probe``'s protocol): frozen mean-pooled tokens of
  ``classify_train`` / ``classify_test``, one linear layer;
- **fine-tuning** (``leanvl finetune classify``): the whole student with UMT's classifier head,
  ``--epochs`` epochs of ``classify_train``, layer-wise lr decay 0.75, evaluated on
  ``classify_test``.

The ten classes are five pairs of time reversals (move left / right, up / down, rotate
clockwise / anticlockwise, grow / shrink, appear / disappear). Besides top-1, the table gives
the share of test clips predicted as their reversed class, and the accuracy within the pair
(correct / (correct + reversed); chance 50%): a backbone that sees what moves but not which way
scores high on neither. Each row also gives its wall time on this machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _report import table, update_section  # noqa: E402

from leanvl.config import load_config  # noqa: E402
from leanvl.data.datasets import build_dataset  # noqa: E402
from leanvl.data.synthetic import CLASSES, REVERSE  # noqa: E402
from leanvl.demo import cpu_settings  # noqa: E402
from leanvl.engine.precision import autocast  # noqa: E402
from leanvl.tasks.build import build_model, configure_threads  # noqa: E402
from leanvl.tasks.classify import evaluate_classification, linear_probe  # noqa: E402
from leanvl.tasks.finetune import load_finetuned, run_finetune  # noqa: E402

DATA = ["data.num_frames=4", "data.size=96", "data.crop_scale=[0.8,1.0]", "data.batch_size=64",
        "data.num_workers=1"]


def _scores(results: dict) -> list[str]:
    """Top-1, taken for its reversal, and right within the pair, from ``return_predictions``."""
    predicted, truth = torch.tensor(results["predictions"]), torch.tensor(results["targets"])
    reverse = torch.tensor([CLASSES.index(REVERSE[c]) for c in CLASSES])
    correct = (predicted == truth).float()
    reversed_ = (predicted == reverse[truth]).float()
    within = correct.sum() / (correct.sum() + reversed_.sum()).clamp(min=1)
    return [f"{100 * correct.mean():.1f}", f"{100 * reversed_.mean():.1f}", f"{100 * within:.1f}"]


def _add_classification_splits(root: Path) -> None:
    """Generate the default classification splits into the demo's benchmark folder (its other
    clips are reused, not encoded again)."""
    from omegaconf import OmegaConf

    from leanvl.config import SynthConfig
    from leanvl.data import synthetic

    saved = OmegaConf.to_container(OmegaConf.load(root / "synth_config.yaml"), resolve=True)
    defaults = SynthConfig()
    cfg = SynthConfig(**{**saved, "out": str(root),
                         "classify_train_clips": defaults.classify_train_clips,
                         "classify_test_clips": defaults.classify_test_clips})
    if saved.get("classify_train_clips") != cfg.classify_train_clips \
            or saved.get("classify_test_clips") != cfg.classify_test_clips:
        synthetic.generate(cfg, progress=False)
        OmegaConf.save(OmegaConf.structured(cfg), root / "synth_config.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo")
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("overrides", nargs="*", help="config overrides for fine-tuning")
    args = parser.parse_args()
    demo, device = Path(args.demo), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    root = demo / "synth"
    _add_classification_splits(root)
    backbones = [("random initialisation", ""), ("demo stage 1", str(demo / "stage1" / "model")),
                 ("demo stage 2", str(demo / "stage2" / "model"))]
    finetune = ["model.name=umt_tiny", "model.kwargs={stage: 1}", f"data.root={root}",
                f"data.train={root / 'classify_train.jsonl'}",
                f"data.test={root / 'classify_test.jsonl'}", *DATA, *cpu_settings(),
                f"train.epochs={args.epochs}", "train.lr=1e-3", "train.min_lr=1e-6",
                "train.layer_decay=0.75", "train.weight_decay=0.05", "train.warmup_epochs=1",
                "train.betas=[0.9,0.999]", "train.log_every=10", *args.overrides]
    rows = []
    for name, weights in backbones:
        cfg = load_config(None, finetune + [f"model.pretrained={weights}",
                                            f"out={demo / 'action' / name.replace(' ', '_')}"])
        configure_threads(cfg.data.num_workers, cfg.data.cpu_threads)
        split = {s: build_dataset(root / f"classify_{s}.jsonl", str(root), cfg.data, train=False,
                                  kind="classification", classes=list(CLASSES))
                 for s in ("train", "test")}
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)  # the random initialisation, and the heads, repeat
        backbone = build_model(cfg.model).to(device).eval()
        with autocast(cfg.train.precision, device.type):
            probe = linear_probe(backbone, split["train"], split["test"], device, 64, 1,
                                 cfg.eval.probe_features, cfg.eval.probe_epochs,
                                 cfg.eval.probe_lr, seed=cfg.seed, progress_bar=False,
                                 return_predictions=True)
        rows.append([name, "linear probe", *_scores(probe),
                     f"{time.perf_counter() - start:.0f}"])
        print(rows[-1], flush=True)
        start = time.perf_counter()
        run_finetune(cfg, "classify")
        model, _, _ = load_finetuned(Path(cfg.out) / "model")
        with autocast(cfg.train.precision, device.type):
            tested = evaluate_classification(model.to(device), split["test"], device, 64, 1,
                                             progress_bar=False, return_predictions=True)
        rows.append([name, f"fine-tuning, {args.epochs:g} epochs", *_scores(tested),
                     f"{time.perf_counter() - start:.0f}"])
        print(rows[-1], flush=True)
    body = ("Synthetic `classify_train` (2,000 clips) / `classify_test` (500), ten classes in five "
            "time-reversal pairs; UMT-tiny, 4 frames at 96x96. Fine-tuning: lr 1e-3, layer decay "
            "0.75, batch 64, 1 warm-up epoch, crops 0.8-1.0. Accuracies in % (chance: top-1 10, "
            "within the pair 50).\n\n"
            + table(["backbone", "protocol", "top-1", "predicted as its reversal",
                     "accuracy within the pair", "seconds"], rows))
    update_section("action-recognition", "Action recognition: probe and fine-tuning (synthetic)",
                   " ".join(["python benchmarks/action_recognition.py DEMO_DIR",
                             f"--epochs {args.epochs:g}", *args.overrides]), body)


if __name__ == "__main__":
    main()
