"""Builders every task shares: threads, the tokenizer and its truncated vocabulary, the model
(with ``model.pretrained`` weights), the training loader, and released weights.

Pre-training, fine-tuning, evaluation, the demo and the benchmarks all build through here, so a
method's model, tokenizer and vocabulary come out the same whichever command asks for them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanvl.data.annotations import corpus_texts
from leanvl.data.datasets import Collator, MixedLoader, build_dataset, is_shards, make_loader
from leanvl.data.text import TextEncoder, VocabTruncation

log = logging.getLogger(__name__)


def configure_threads(num_workers: int, threads: int = 0) -> None:
    """torch's CPU threads: ``threads`` when > 0, else one core left per DataLoader worker
    (oversubscribed OpenMP threads spin-wait and make small matmuls far slower than a single
    thread would). Give ``threads`` (``data.cpu_threads``) when the workers are mostly idle,
    as with small clips: the demo's 96-pixel clips decode in ~6 ms, so one worker beside two
    torch threads beats one beside one (docs/data.md)."""
    if torch.cuda.is_available():
        return
    if threads < 0:
        raise ValueError(f"data.cpu_threads must be >= 0 (0: automatic), got {threads}")
    cores = os.cpu_count() or 1
    torch.set_num_threads(threads or max(1, cores - max(0, num_workers)))


def build_text_encoder(data_cfg: Any, model: nn.Module | None = None) -> TextEncoder:
    """The tokenizer of ``data.tokenizer`` padded to ``data.max_text_len``; for a ``model``
    with a truncated vocabulary (``text_vocab_ids``) token ids are mapped into it."""
    text = TextEncoder(data_cfg.tokenizer, data_cfg.max_text_len)
    modules = model.modules() if model is not None else ()  # task wrappers, DDP: look inside
    kept = next((m.text_vocab_ids for m in modules if getattr(m, "text_vocab_ids", None)), None)
    if kept:
        text.truncation = VocabTruncation(kept, len(text.tokenizer), text.tokenizer.unk_token_id)
    return text


def truncate_vocabulary(cfg: Any, text: TextEncoder) -> dict[str, Any]:
    """E-ViLM's vocabulary truncation, as model kwargs (empty when off); sets ``text``'s mapping.

    With ``data.vocab_keep_fraction`` < 1 the most frequent tokens of the training captions are
    kept (specials always). Weights that already have a truncated vocabulary keep theirs:
    ``text_vocab_ids`` in ``model.kwargs`` or recorded with ``model.pretrained`` (its
    ``config.json``, or a training checkpoint's ``model_kwargs``).
    Returns {text_vocab_ids, special_ids}, which the model stores in its released config.
    """
    from leanvl.engine.checkpoint import to_plain

    kept = to_plain(cfg.model.kwargs).get("text_vocab_ids") or _released_vocabulary(
        cfg.model.pretrained)
    if not kept:
        fraction = float(cfg.data.vocab_keep_fraction)
        if fraction >= 1:
            return {}
        corpus = list(cfg.data.vocab_corpus or [])
        if not corpus:
            if is_shards(cfg.data.train):
                raise ValueError("data.vocab_keep_fraction < 1 counts words in the training "
                                 f"captions, which needs an annotation file; {cfg.data.train} "
                                 "are shards (give data.vocab_corpus)")
            corpus = [str(cfg.data.train)]
        texts = [t for path in corpus for t in corpus_texts(path)]
        kept = VocabTruncation.fit(texts, text.tokenizer, fraction).kept_ids
        log.info("vocabulary truncated to %d of %d tokens (data.vocab_keep_fraction=%g, "
                 "counted in %s)", len(kept), len(text.tokenizer), fraction, ", ".join(corpus))
    text.truncation = VocabTruncation(kept, len(text.tokenizer), text.tokenizer.unk_token_id)
    special = {name: text.special_id(name) for name in ("pad", "unk", "cls", "sep", "mask")}
    return {"text_vocab_ids": list(kept), "special_ids": special}


def _released_vocabulary(pretrained: str) -> list[int] | None:
    """``text_vocab_ids`` of the weights at ``pretrained`` (released, or a training
    checkpoint); None if absent."""
    from leanvl.engine.checkpoint import trained_model_kwargs

    if not pretrained or not Path(pretrained).exists():
        return None
    return trained_model_kwargs(pretrained).get("text_vocab_ids")


def build_model(model_cfg: Any, extra_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``create_model(model.name, **model.kwargs, **extra_kwargs)``, then ``model.pretrained``
    weights if set.

    Weights from another stage may lack whole top-level modules (a stage-1 model has no text
    side): those start from scratch and are logged; a module that is present must load fully.
    Top-level modules the model does not have (a converted stage-1 file's alignment heads, for
    a model built without a teacher) are left out, and logged.
    """
    from omegaconf import OmegaConf

    from leanvl.engine.checkpoint import load_weights
    from leanvl.models.registry import create_model

    kwargs = model_cfg.kwargs
    if not isinstance(kwargs, dict):
        kwargs = OmegaConf.to_container(kwargs, resolve=True)
    kwargs = {**kwargs, **(extra_kwargs or {})}
    try:
        model = create_model(model_cfg.name, **kwargs)
    except TypeError as error:
        if "text_vocab_ids" in str(error):
            raise ValueError(f"model {model_cfg.name} does not support a truncated vocabulary "
                             "(data.vocab_keep_fraction < 1)") from None
        raise
    if model_cfg.pretrained:
        path = Path(model_cfg.pretrained)
        if not path.exists():
            raise FileNotFoundError(f"model.pretrained: {path} does not exist")
        fresh = missing_prefixes(model, path)
        unused = extra_prefixes(model, path)
        load_weights(model, path, allow_missing=fresh, ignore_unexpected=unused)
        log.info("initialised %s from %s; trained from scratch: %s; not used: %s",
                 model_cfg.name, path, ", ".join(fresh) or "nothing",
                 ", ".join(unused) or "nothing")
    _log_fresh_mlm_heads(model, fresh if model_cfg.pretrained else None)
    return model


def _log_fresh_mlm_heads(model: nn.Module, fresh: list[str] | None) -> None:
    """Say which MLM heads start fresh: those whose BERT folder had none and that no
    ``model.pretrained`` weights filled (``fresh``: its top-level modules that started from
    scratch; None without such weights)."""
    for name, module in model.named_modules():
        source = getattr(module, "mlm_head_source", None)
        top = name.split(".")[0]
        if source and (fresh is None or f"{top}." in fresh):
            log.info("%s has no MLM head weights; %s.mlm_head starts fresh", source, name)


def _stored_keys(path: str | Path) -> list[str] | None:
    from leanvl.engine.checkpoint import WEIGHTS_NAME, safetensors_keys

    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if weights.suffix != ".safetensors":
        return None
    return safetensors_keys(weights)


def _stored_top_level(path: str | Path) -> set[str] | None:
    keys = _stored_keys(path)
    return None if keys is None else {key.split(".")[0] for key in keys}


def extra_prefixes(model: nn.Module, path: str | Path) -> tuple[str, ...]:
    """Top-level modules (``name.``) and parameters (``name``, such as a stage-2 model's
    ``log_temperature``) stored in the weights at ``path`` that ``model`` does not have."""
    keys = _stored_keys(path)
    if keys is None:
        return ()
    own = {name for name, _ in model.named_children()} | \
        {name for name, _ in model.named_parameters(recurse=False)} | \
        {name for name, _ in model.named_buffers(recurse=False)}
    stored = {key.split(".")[0]: "." in key for key in keys}
    return tuple(f"{name}." if nested else name
                 for name, nested in sorted(stored.items()) if name not in own)


def missing_prefixes(model: nn.Module, path: str | Path) -> tuple[str, ...]:
    """Top-level modules of ``model`` that the weights at ``path`` do not contain."""
    present = _stored_top_level(path)
    if present is None:
        return ()
    return tuple(f"{name}." for name, _ in model.named_children() if name not in present) + \
        tuple(name for name, _ in model.named_parameters(recurse=False) if name not in present)


def build_train_loader(cfg: Any, text: TextEncoder, kind: str | None = None, **dataset_kwargs):
    """The training loader: ``data.train`` (plus ``data.image_train`` mixed in by batches)."""
    data = cfg.data
    if not data.train:
        raise ValueError("data.train is not set: give an annotation file or shard folder")
    collate = Collator(text)
    video = build_dataset(data.train, data.root or None, data, train=True, kind=kind,
                          seed=cfg.seed, **dataset_kwargs)
    loader = make_loader(video, data.batch_size, collate, train=True,
                         num_workers=data.num_workers, seed=cfg.seed,
                         group_by_length=data.group_by_length)
    if not data.image_train:
        return loader
    images = build_dataset(data.image_train, data.root or None, data, train=True, kind="image",
                           seed=cfg.seed)
    image_loader = make_loader(images, data.batch_size, collate, train=True,
                               num_workers=data.num_workers, seed=cfg.seed,
                               group_by_length=data.group_by_length)
    ratios = None
    if data.image_ratio > 0:
        ratios = {"video": 1 - data.image_ratio, "image": data.image_ratio}
    return MixedLoader({"video": loader, "image": image_loader}, ratios=ratios, seed=cfg.seed)


def release(model: nn.Module, folder: str | Path, data_cfg: Any = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` for downstream use; with ``data_cfg``,
    the input settings it was trained with (frames, size, text length, tokenizer,
    normalization), which ``leanvl eval`` takes by default.

    A model may define ``release_config() -> (kwargs, exclude_prefixes)`` to leave out what only
    pre-training needs (UMT drops its teacher and alignment heads); otherwise frozen modules
    are left out and the registry kwargs kept.
    """
    from leanvl.engine.checkpoint import input_settings, save_pretrained
    from leanvl.engine.optim import frozen_prefixes_of

    if hasattr(model, "release_config"):
        kwargs, exclude = model.release_config()
    else:
        kwargs, exclude = dict(getattr(model, "registry_kwargs", {})), frozen_prefixes_of(model)
    extra = {"data": input_settings(data_cfg)} if data_cfg is not None else None
    return save_pretrained(model, folder, kwargs=kwargs, exclude_prefixes=tuple(exclude),
                           extra=extra)
