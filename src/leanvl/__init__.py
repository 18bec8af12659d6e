"""leanvl: efficient video-language models in one PyTorch library and CLI."""

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "list_models", "load_pretrained"]


def __getattr__(name):
    # Lazy: `import leanvl` (and the CLI's start-up) must not import torch models.
    if name in ("create_model", "list_models"):
        from leanvl.models import registry

        return getattr(registry, name)
    if name == "load_pretrained":
        from leanvl.engine.checkpoint import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'leanvl' has no attribute {name!r}")
