"""Model registry: ``@register_model("name")`` on a factory; ``create_model(name, **kwargs)``."""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable

from torch import nn

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
# Modules that register models on import; imported lazily so `import leanvl` stays light.
_MODEL_MODULES = ("leanvl.models.umt", "leanvl.models.clip", "leanvl.models.perceiver_vl",
                  "leanvl.models.smaug", "leanvl.models.evilm")


def register_model(name: str) -> Callable:
    """Decorator registering a factory ``fn(**kwargs) -> nn.Module`` under ``name``."""
    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"model name {name!r} is registered twice")
        _FACTORIES[name] = factory
        return factory
    return decorator


def _load_all() -> None:
    for module in _MODEL_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # a missing dependency inside the module is a real error
                raise


def list_models() -> list[str]:
    """Names of all registered models."""
    _load_all()
    return sorted(_FACTORIES)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names get the closest valid one in the error."""
    _load_all()
    if name not in _FACTORIES:
        close = difflib.get_close_matches(name, list(_FACTORIES), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown model '{name}'{hint} (models: {', '.join(sorted(_FACTORIES))})")
    model = _FACTORIES[name](**kwargs)
    model.registry_name = name
    model.registry_kwargs = dict(kwargs)
    return model
