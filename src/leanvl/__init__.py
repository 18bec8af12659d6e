"""leanvl: efficient video-language models in one PyTorch library and CLI."""

__version__ = "0.1.0"

__all__ = ["__version__"]
