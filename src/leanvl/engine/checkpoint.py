"""Training checkpoints (exact resumption) and released weights (safetensors + config.json).

Training checkpoints are ``<out>/checkpoints/checkpoint-<step>.pt``, one ``torch.save`` dict:

- ``model``: the unwrapped model's state dict *without* its frozen modules (``frozen_prefixes``:
  teachers are rebuilt from their own weights when the model is created, so each checkpoint
  does not carry a second copy of, e.g., a CLIP ViT); ``model_excluded_prefixes`` records what
  was left out. Pass ``include_frozen=True`` to the trainer to keep them.
- ``optimizer``, ``scheduler``, ``scaler`` (fp16 only), ``step``, ``epoch``,
  ``batch_in_epoch`` (micro-batches consumed in the current epoch), ``world_size``,
  ``grad_accum``, ``config`` (a plain dict);
- ``rng``: every rank's Python / NumPy / torch CPU / CUDA generator states (gathered to rank 0)
  and ``bad_samples``: every rank's corrupt-sample counts.

They are written atomically (temporary file in the same folder, fsync, ``os.replace``), so a
crash while writing leaves the previous checkpoint intact and never a partial file under a
checkpoint name. Only the last ``keep`` are kept. Everything in them is plain containers and
tensors, so they load with ``torch.load(weights_only=True)``.

Released weights are a folder with ``model.safetensors`` and ``config.json``
(``{"name", "kwargs", "leanvl_version", "extra"}``): ``create_model(name, **kwargs)`` rebuilds
the module, the safetensors file fills it. Tensors that share memory (tied weights) are
stored once; the other names are listed in the file's metadata and restored on load.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)\.pt$")


# ---------------------------------------------------------------- atomic files and discovery

def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename still happened
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of optimizer step ``step`` lives in ``folder``."""
    return Path(folder) / f"checkpoint-{step:08d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (temporary files never match)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_file() and (m := _CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest checkpoint in ``folder`` (or in ``folder/checkpoints``), None if there is none."""
    folder = Path(folder)
    found = list_checkpoints(folder) or list_checkpoints(folder / CHECKPOINT_DIR)
    return found[-1] if found else None


def save_checkpoint(state: dict[str, Any], folder: str | os.PathLike, step: int,
                    keep: int = 2) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step`` and keep only the last ``keep``
    (``keep <= 0`` keeps all). Call on rank 0 only."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".checkpoint-*.tmp"):  # left by a crash mid-write
        stale.unlink(missing_ok=True)
    path = atomic_save(state, checkpoint_path(folder, step))
    if keep > 0:
        for old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain containers only); with ``mmap`` the
    tensors stay on disk until touched (for reading only its config)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True, mmap=mmap)


# ---------------------------------------------------------------- RNG state

def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as plain data."""
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [str(kind), [int(k) for k in keys], int(position), int(has_gauss),
                  float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            log.warning("checkpoint has %d CUDA RNG states but %d GPUs are visible; CUDA RNG "
                        "not restored", len(cuda), torch.cuda.device_count())


# ---------------------------------------------------------------- model state

def model_state(model: nn.Module, exclude_prefixes: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """The model's state dict minus entries under ``exclude_prefixes``."""
    return {k: v for k, v in model.state_dict().items()
            if not any(k.startswith(p) for p in exclude_prefixes if p)}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor],
                     allow_missing: Sequence[str] = (),
                     ignore_unexpected: Sequence[str] = ()) -> None:
    """Load ``state`` strictly, except that keys under ``allow_missing`` may be absent and keys
    under ``ignore_unexpected`` are dropped."""
    if ignore_unexpected:
        state = {k: v for k, v in state.items()
                 if not any(k.startswith(p) for p in ignore_unexpected if p)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(k.startswith(p) for p in allow_missing if p)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:5])})")
        raise RuntimeError(f"weights do not fit {type(model).__name__}: " + "; ".join(parts))


# ---------------------------------------------------------------- released weights

def to_plain(value: Any) -> Any:
    """OmegaConf containers / tuples -> JSON-ready lists and dicts."""
    try:
        from omegaconf import Container, OmegaConf

        if isinstance(value, Container):  # DictConfig, ListConfig, omegaconf 2.4's TupleConfig
            value = OmegaConf.to_container(value, resolve=True)  # may hold tuples
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def _version() -> str:
    from leanvl import __version__

    return __version__


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can store (one per memory region) and ``alias -> stored name``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: dict[tuple, int] = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        if tensor.numel() > 0:
            storage = (tensor.device, tensor.untyped_storage().data_ptr())
            view = storage + (tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
                              tensor.dtype)
            if view in seen:  # the very same tensor under a second name (tied weights)
                aliases[name] = seen[view]
                continue
            seen[view] = name
            storages[storage] = storages.get(storage, 0) + 1
        tensors[name] = tensor
    out = {}
    for name, tensor in tensors.items():
        shared = tensor.numel() > 0 and storages[(tensor.device,
                                                  tensor.untyped_storage().data_ptr())] > 1
        whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        tensor = tensor.cpu()
        # safetensors refuses views into a larger buffer and overlapping tensors: copy those
        out[name] = tensor.contiguous().clone() if shared or not whole or \
            not tensor.is_contiguous() else tensor
    return out, aliases


def save_pretrained(model: nn.Module, folder: str | os.PathLike, name: str | None = None,
                    kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                    exclude_prefixes: Sequence[str] = ()) -> Path:
    """Write ``model.safetensors`` + ``config.json`` to ``folder``; returns the folder.

    ``name``/``kwargs`` default to the ``registry_name``/``registry_kwargs`` that
    ``create_model`` attaches. ``exclude_prefixes`` drops modules (e.g. a teacher) from the file.
    """
    from safetensors.torch import save_file

    name = name if name is not None else getattr(model, "registry_name", None)
    if not name:
        raise ValueError("save_pretrained needs the registry name of the model (name=...)")
    kwargs = kwargs if kwargs is not None else getattr(model, "registry_kwargs", {})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedupe_shared(model_state(model, exclude_prefixes))
    metadata = {"format": "pt", "aliases": json.dumps(aliases)}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, folder / WEIGHTS_NAME)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_release_config(folder, name, kwargs, exclude_prefixes, extra)
    return folder


def write_release_config(folder: str | os.PathLike, name: str, kwargs: dict[str, Any],
                         exclude_prefixes: Sequence[str] = (),
                         extra: dict[str, Any] | None = None) -> Path:
    """Write the ``config.json`` of released weights (atomically); returns its path."""
    from leanvl.data.annotations import atomic_write_text

    config = {"name": name, "kwargs": to_plain(dict(kwargs)), "leanvl_version": _version(),
              "excluded_prefixes": list(exclude_prefixes), "extra": to_plain(extra or {})}
    path = Path(folder) / CONFIG_NAME
    atomic_write_text(path, json.dumps(config, indent=2) + "\n")
    return path


# the data settings that shape what a model reads; released weights record them
# (``extra.data``) so that evaluation takes the trained ones unless told otherwise
INPUT_SETTINGS = ("num_frames", "size", "max_text_len", "tokenizer", "normalization", "mean",
                  "std")


def _pick_input_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The ``INPUT_SETTINGS`` present in ``data``; ``mean`` and ``std`` only with
    ``normalization: custom``, the one that reads them."""
    custom = data.get("normalization") == "custom"
    return {key: data[key] for key in INPUT_SETTINGS
            if key in data and (custom or key not in ("mean", "std"))}


def input_settings(data_cfg: Any) -> dict[str, Any]:
    """The input settings of a data config, as plain values (see ``_pick_input_settings``)."""
    return _pick_input_settings(to_plain({key: getattr(data_cfg, key) for key in INPUT_SETTINGS}))


def trained_input_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The ``INPUT_SETTINGS`` a model was trained with: from released weights' config.json
    (a folder, or its ``model.safetensors``) or a training checkpoint's config; ``{}`` where
    none are recorded (weights converted from official checkpoints, older releases)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":  # its tensors are not read
        data = load_checkpoint(path, mmap=True).get("config", {}).get("data", {})
    else:
        data = (_released_config(path).get("extra") or {}).get("data", {})
    return _pick_input_settings(data)


def _released_config(path: Path) -> dict[str, Any]:
    """The config.json of released weights (``path``: their folder or a file in it); ``{}``
    where there is none."""
    config = (path.parent if path.is_file() else path) / CONFIG_NAME
    return json.loads(config.read_text()) if config.is_file() else {}


def _checkpoint_model_kwargs(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The kwargs a checkpoint's model was built with (``model_kwargs``: the config's plus
    what the build derived from the data); the config's alone in checkpoints older than it."""
    kwargs = checkpoint.get("model_kwargs") or \
        (checkpoint.get("config") or {}).get("model", {}).get("kwargs") or {}
    return dict(kwargs)


def trained_model_kwargs(path: str | os.PathLike) -> dict[str, Any]:
    """The kwargs a model was built with: from released weights' config.json (a folder, or its
    ``model.safetensors``) or a training checkpoint; ``{}`` where none are recorded."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":  # its tensors are not read
        return _checkpoint_model_kwargs(load_checkpoint(path, mmap=True))
    return dict(_released_config(path).get("kwargs") or {})


def released_eval_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The evaluation settings released weights ask for (``extra.eval`` of config.json, e.g.
    the authors' re-ranking depth and multiple-choice weights of converted UMT models); ``{}``
    where none are recorded."""
    path = Path(path)
    if path.suffix == ".pt":
        return {}
    return dict((_released_config(path).get("extra") or {}).get("eval") or {})


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, with tied-weight aliases restored."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path), device=str(device))
    with safe_open(str(path), framework="pt") as handle:
        aliases = _aliases(handle)
    for alias, stored in aliases.items():
        state[alias] = state[stored]
    return state


def safetensors_keys(path: str | os.PathLike) -> list[str]:
    """The state-dict keys of a safetensors file, tied-weight aliases included, read from its
    header without loading any tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys()) + list(_aliases(handle))


def _aliases(handle) -> dict[str, str]:
    """alias -> stored key, from the metadata ``save_pretrained`` writes for tied weights."""
    return json.loads((handle.metadata() or {}).get("aliases", "{}"))


def _resolve_create_model(create_model_fn: Callable[..., nn.Module] | None):
    if create_model_fn is not None:
        return create_model_fn
    from leanvl.models.registry import create_model  # lazy: models import torch-heavy code

    return create_model


def load_pretrained(path: str | os.PathLike, create_model_fn: Callable[..., nn.Module] | None = None,
                    device: str | torch.device = "cpu", overrides: dict[str, Any] | None = None
                    ) -> nn.Module:
    """Build and fill a model from released weights (a folder, or its ``model.safetensors``)
    or from a training checkpoint (``.pt``, whose config names the model).

    ``create_model_fn(name, **kwargs)`` defaults to ``leanvl.models.registry.create_model``.
    ``overrides`` replace stored kwargs, for options that leave the weights' shapes alone
    (e.g. a Perceiver-VL's ``stream`` or ``num_cross_layers`` at inference).
    The model is returned in eval mode; ``model.pretrained_config`` holds config.json.
    """
    path = Path(path)
    factory = _resolve_create_model(create_model_fn)
    if path.is_file() and path.suffix == ".pt":
        checkpoint = load_checkpoint(path, map_location=device)
        model_cfg = checkpoint.get("config", {}).get("model", {})
        if not model_cfg.get("name"):
            raise ValueError(f"{path}: the checkpoint's config names no model")
        config = {"name": model_cfg["name"], "kwargs": _checkpoint_model_kwargs(checkpoint),
                  "excluded_prefixes": checkpoint.get("model_excluded_prefixes", []),
                  "extra": {}}
        state = checkpoint["model"]
    else:
        folder = path.parent if path.is_file() else path
        weights = path if path.is_file() else folder / WEIGHTS_NAME
        if not (folder / CONFIG_NAME).is_file() or not weights.is_file():
            raise FileNotFoundError(f"{path}: expected {WEIGHTS_NAME} and {CONFIG_NAME} "
                                    "(released weights) or a training checkpoint (.pt)")
        config = json.loads((folder / CONFIG_NAME).read_text())
        state = read_safetensors(weights, device)
    kwargs = {**config.get("kwargs", {}), **to_plain(dict(overrides or {}))}
    model = factory(config["name"], **kwargs)
    load_model_state(model, state, allow_missing=config.get("excluded_prefixes", []))
    model.registry_name = config["name"]
    model.registry_kwargs = kwargs
    model.pretrained_config = config
    return model.to(device).eval()


def load_weights(model: nn.Module, path: str | os.PathLike,
                 allow_missing: Sequence[str] = (),
                 ignore_unexpected: Sequence[str] = ()) -> nn.Module:
    """Fill an existing model from released weights (folder / .safetensors) or a checkpoint;
    see ``load_model_state`` for ``allow_missing`` / ``ignore_unexpected``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".pt":
        checkpoint = load_checkpoint(path)
        state = checkpoint["model"]
        allow_missing = tuple(allow_missing) + tuple(checkpoint.get("model_excluded_prefixes", []))
    else:
        weights = path / WEIGHTS_NAME if path.is_dir() else path
        state = read_safetensors(weights)
        config = weights.parent / CONFIG_NAME
        if config.is_file():
            allow_missing = tuple(allow_missing) + tuple(
                json.loads(config.read_text()).get("excluded_prefixes", []))
    load_model_state(model, state, allow_missing, ignore_unexpected)
    return model
