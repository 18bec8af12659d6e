"""Mixed precision: ``train.precision`` -> an autocast context and, for fp16 only, a GradScaler.

``auto`` means bf16 on a GPU that supports it (fp16 on older GPUs) and fp32 on the CPU: CPUs
without native bf16 units emulate it slowly. On CPUs with AMX or AVX512-BF16, ``bf16`` trains the
demo's models 2.0-2.5x faster per step (docs/benchmarks.md, "Demo models: CPU step time").
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16_flags() -> list[str]:
    """The CPU's native bf16 features (``amx_bf16``, ``avx512_bf16``) from /proc/cpuinfo;
    empty where there are none or the file is absent (not Linux)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags]


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else ``platform.processor()``, else the
    machine type)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``auto`` -> bf16 / fp16 / fp32 for ``device``; other names are validated."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, "
                         f"got {precision!r}")
    device = torch.device(device)
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context for a resolved precision (a no-op context for fp32)."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    cast = torch.autocast(device_type=device.type, dtype=_DTYPES[precision])
    if device.type != "cpu":
        return cast
    # On the CPU, the fused ("flash") attention kernel is 2.5-3.5x slower in bf16 than the
    # math path, forward plus backward, at the demo's shapes (and faster in fp32, where it is
    # left on): docs/benchmarks.md, "Demo models: CPU step time".
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    stack.enter_context(cast)
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Autocast off for ``device``'s type, for scores that bf16 would round into ties (nearby
    multiple-choice options, re-ranked candidates); a no-op on devices without autocast, such as
    ``meta``, on which FLOPs are counted."""
    device_type = torch.device(device).type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def make_grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (its narrow range needs loss scaling); None otherwise."""
    device = torch.device(device)
    if resolve_precision(precision, device) != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
