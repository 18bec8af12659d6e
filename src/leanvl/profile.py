"""Cost measurements behind ``leanvl profile``: parameters, FLOPs, latency, memory, throughput.

FLOPs follow the papers' convention: one multiply-add counts as one FLOP (so a Linear of
N x D_in x D_out is N*D_in*D_out), which is half of what ``FlopCounterMode`` reports.
``FlopCounterMode`` has no formula for CPU's fused attention kernel
(``_scaled_dot_product_flash_attention_for_cpu``) and would silently count attention as zero
on CPU; ``count_flops`` adds it. On the meta device SDPA decomposes into counted matmuls, so
models can be costed there without allocating or computing anything.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

#: dense bf16 tensor-core peaks in FLOP/s (2 FLOPs per multiply-add), vendor datasheets
GPU_PEAK_BF16: dict[str, float] = {
    "A100": 312e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
}


def count_parameters(model: nn.Module, depth: int = 1,
                     trainable_only: bool = False) -> dict[str, int]:
    """Parameters per component (module-name prefix of ``depth`` parts), plus ``total``.

    ``depth=1`` groups by top-level child; ``depth=2`` gives a nested breakdown such as
    ``text.embeddings`` / ``text.encoder`` (E-ViLM's Table 8). Shared parameters count once;
    parameters of frozen modules count unless ``trainable_only``.
    """
    counts: dict[str, int] = {}
    total = 0
    components = model.parameter_components() if depth == 1 and hasattr(
        model, "parameter_components") else None
    if components:
        return _count_by_components(model, components, trainable_only)
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        # Group by the owning module's path, so ``norm.weight`` stays under ``norm``.
        owner = name.rsplit(".", 1)[0] if "." in name else name
        component = ".".join(owner.split(".")[:depth])
        counts[component] = counts.get(component, 0) + param.numel()
        total += param.numel()
    counts["total"] = total
    return counts


def _count_by_components(model: nn.Module, components: Mapping[str, tuple[str, ...]],
                         trainable_only: bool) -> dict[str, int]:
    """Parameters per named component of ``model.parameter_components()`` (name -> prefixes;
    the first component whose prefix matches takes a parameter, the rest go to ``other``)."""
    counts = dict.fromkeys(components, 0)
    total = 0
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        owner = next((c for c, prefixes in components.items() if name.startswith(prefixes)),
                     "other")
        counts[owner] = counts.get(owner, 0) + param.numel()
        total += param.numel()
    counts["total"] = total
    return counts


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args: Any, **kwargs: Any) -> int:
    # Same count as torch's formula for the CUDA kernels: Q K^T and A V, 2 FLOPs per MAC.
    b, h, n_q, d = query_shape
    n_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * n_q * n_k * d + 2 * b * h * n_q * n_k * d_v


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape,
                             *args: Any, **kwargs: Any) -> int:
    # Recomputed scores (Q K^T) plus four gradient matmuls (dA, dV, dQ, dK), as torch's
    # formula for the CUDA kernels' backward.
    b, h, n_q, d = query_shape
    n_k, d_v = key_shape[2], value_shape[3]
    return 2 * b * h * n_q * n_k * (3 * d + 2 * d_v)


def _custom_flop_formulas() -> dict[Any, Callable[..., int]]:
    aten = torch.ops.aten
    formulas: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            _sdpa_cpu_backward_flops
    return formulas


def _call(fn: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return fn(**inputs)
    if isinstance(inputs, tuple | list):
        return fn(*inputs)
    return fn(inputs)


def count_flops(model_fn: Callable[..., Any], inputs: Any = (), backward: bool = False,
                by_module: bool = False) -> float | dict[str, float]:
    """GFLOPs (1 multiply-add = 1 FLOP, papers' convention) of ``model_fn(inputs)``.

    ``inputs`` is a tensor, a tuple of positional arguments or a dict of keyword arguments;
    meta-device tensors work (nothing is computed). Forward only, under ``no_grad``, unless
    ``backward`` (then the sum of the output is back-propagated too). With ``by_module``,
    returns GFLOPs per module name (``FlopCounterMode``'s hierarchy, ``Global`` = total).
    """
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=_custom_flop_formulas())
    with counter:
        if backward:
            out = _call(model_fn, inputs)
            out = out[0] if isinstance(out, tuple | list) else out
            out.float().sum().backward()
        else:
            with torch.no_grad():
                _call(model_fn, inputs)
    if by_module:
        return {name: sum(ops.values()) / 2e9 for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops() / 2e9


def _synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable[[], Any], warmup: int = 3, repeats: int = 10,
                    device: torch.device | str | None = None) -> dict[str, float]:
    """Wall-clock time of ``fn()`` in ms over ``repeats`` runs after ``warmup`` (CUDA-synced)."""
    if device is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"mean_ms": statistics.fmean(times),
            "std_ms": statistics.stdev(times) if len(times) > 1 else 0.0,
            "min_ms": min(times), "repeats": float(repeats)}


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    # glibc keeps freed blocks resident; hand them back first, or a later allocation that
    # reuses them would not show up as RSS growth. Best effort: other libcs lack malloc_trim.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], Any],
                device: torch.device | str | None = None) -> dict[str, float | str | None]:
    """Peak memory of ``fn()`` in MiB above what was in use before it.

    CUDA: ``max_memory_allocated`` (tensors only). CPU: the process's resident-set high-water
    mark (``VmHWM``, reset first) minus its RSS before the call, after returning glibc's free
    heap to the system; it includes allocator and library overhead and misses memory the
    allocator still holds. ``None`` where /proc is unavailable. tracemalloc does not see
    tensors.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mib": (peak - before) / 2**20, "method": "cuda max_memory_allocated"}
    _release_free_heap()
    before = _proc_status_kib("VmRSS")
    if before is None or not _reset_peak_rss():
        fn()
        return {"peak_mib": None, "method": "unsupported (no /proc/self)"}
    fn()
    high = _proc_status_kib("VmHWM")
    return {"peak_mib": max(high - before, 0) / 1024, "method": "cpu VmHWM - VmRSS"}


def training_throughput(step_fn: Callable[[], Any], batch_size: int, steps: int = 10,
                        warmup: int = 2, device: torch.device | str | None = None) -> float:
    """Clips per second of ``step_fn()`` (one optimisation step on ``batch_size`` clips)."""
    timing = measure_latency(step_fn, warmup=warmup, repeats=steps, device=device)
    return batch_size / (timing["mean_ms"] / 1e3)


def gpu_peak_flops(device: torch.device | str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a known GPU (A100, H100, H200); None on CPU or unknown GPUs."""
    if device is None or torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    # Longest key first, so "H100 PCIe" wins over "H100".
    for key in sorted(GPU_PEAK_BF16, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAK_BF16[key]
    return None


def model_flops_utilisation(flops_per_step: float, step_time: float,
                            device: torch.device | str | None = None) -> float | None:
    """Achieved / peak bf16 FLOP/s; ``flops_per_step`` in the papers' convention (MACs).

    Hardware FLOPs are twice the multiply-adds, so the achieved rate is
    ``2 * flops_per_step / step_time``. None on CPU or an unlisted GPU.
    """
    peak = gpu_peak_flops(device)
    if peak is None or step_time <= 0:
        return None
    return 2 * flops_per_step / step_time / peak


def _human(count: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(count) >= scale:
            return f"{count / scale:.2f}{unit}"
    return f"{count:.0f}"


def profile_report(model: nn.Module, inputs: Any, forward: Callable[..., Any] | None = None,
                   param_depth: int = 1, latency: bool = True, memory: bool = True,
                   warmup: int = 2, repeats: int = 5,
                   device: torch.device | str | None = None) -> list[dict[str, str]]:
    """Rows (``item``, ``value``) of a cost report: params per component, GFLOPs, time, memory.

    ``forward`` defaults to ``model``; it is called as ``forward(*inputs)`` (tuple),
    ``forward(**inputs)`` (dict) or ``forward(inputs)``.
    """
    forward = forward or model
    table = model.parameter_table() if hasattr(model, "parameter_table") else \
        count_parameters(model, depth=param_depth)
    rows = [{"item": f"params: {name}", "value": _human(count)} for name, count in table.items()]
    gflops = count_flops(forward, inputs)
    rows.append({"item": "GFLOPs (1 MAC = 1 FLOP)", "value": f"{gflops:.2f}"})

    def run() -> None:
        with torch.no_grad():
            _call(forward, inputs)

    if latency:
        timing = measure_latency(run, warmup=warmup, repeats=repeats, device=device)
        rows.append({"item": "latency (ms)",
                     "value": f"{timing['mean_ms']:.2f} ± {timing['std_ms']:.2f}"})
    if memory:
        peak = peak_memory(run, device)
        value = "n/a" if peak["peak_mib"] is None else f"{peak['peak_mib']:.1f}"
        rows.append({"item": f"peak memory (MiB, {peak['method']})", "value": value})
    return rows


def format_table(rows: list[dict[str, Any]], style: str = "markdown") -> str:
    """Rows of dicts (same keys) as a Markdown table or aligned plain text."""
    if not rows:
        return ""
    columns = list(rows[0])
    cells = [[str(row.get(col, "")) for col in columns] for row in rows]
    if style == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    if style != "text":
        raise ValueError(f"style must be 'markdown' or 'text', got {style!r}")
    widths = [max(len(col), *(len(row[i]) for row in cells)) for i, col in enumerate(columns)]
    lines = ["  ".join(col.ljust(w) for col, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)



def flops_by_component(model: nn.Module, model_fn: Callable[..., Any]) -> dict[str, float]:
    """GFLOPs (1 MAC = 1 FLOP) of ``model_fn()`` by ``model``'s top-level modules (a
    ``ModuleList``'s members summed under its name), plus ``other`` (work outside them, e.g.
    concatenation) and ``total``; a module called several times counts every call."""
    counter = FlopCounterMode(display=False, depth=None, custom_mapping=_custom_flop_formulas())
    parts: dict[str, float] = {}
    handles = []
    for name, child in model.named_children():
        members = list(child) if isinstance(child, nn.ModuleList | nn.Sequential) and \
            not hasattr(child, "forward_joint") else [child]
        for member in members:
            def before(module, args, _name=name):
                module._flops_before = counter.get_total_flops()

            def after(module, args, output, _name=name):
                used = counter.get_total_flops() - module.__dict__.pop("_flops_before")
                parts[_name] = parts.get(_name, 0.0) + used / 2e9

            handles += [member.register_forward_pre_hook(before),
                        member.register_forward_hook(after)]
    try:
        with counter, torch.no_grad():
            model_fn()
    finally:
        for handle in handles:
            handle.remove()
    total = counter.get_total_flops() / 2e9
    parts = {name: value for name, value in parts.items() if value > 0}
    parts["other"] = max(total - sum(parts.values()), 0.0)
    parts["total"] = total
    return parts


def profile_model(name: str, frames: int = 8, size: int = 224, batch: int = 1, text_len: int = 32,
                  part: str = "auto", mask_ratio: float = 0.0, latency: bool = True,
                  repeats: int = 3, train_batch: int = 0, overrides: list[str] | None = None,
                  device: torch.device | str | None = None, precision: str = "auto"
                  ) -> list[dict[str, str]]:
    """The ``leanvl profile`` report of a registered model on random inputs.

    ``part`` picks what GFLOPs and latency cover: ``video`` (the video encoder, as the papers'
    tables), ``text``, ``full`` (both encoders and one matching pass), ``pair`` (one pass of
    the cross-encoder over (clip, caption) pairs, ``model.forward_joint``, with GFLOPs by
    component) or ``auto`` (the model's ``profile_part``, else ``video``). ``train_batch`` > 0
    adds pre-training throughput (clips/s) of ``pretrain_losses`` + backward + AdamW step under
    ``precision`` (``auto``: bf16 autocast on GPU, fp32 on CPU, as training runs), its peak
    memory and, on a known GPU, the model FLOPs utilisation of that step.
    """
    from omegaconf import OmegaConf

    from leanvl.masking import random_mask, tube_mask
    from leanvl.models.registry import create_model

    kwargs = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides or [])), resolve=True)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_model(name, **kwargs).to(device).eval()
    if part == "auto":
        part = getattr(model, "profile_part", "video")
    if part == "pair" and not hasattr(model, "forward_joint"):
        raise ValueError(f"--part pair needs a model with forward_joint; {name} has none")
    video = torch.randn(batch, frames, 3, size, size, device=device)
    ids = torch.randint(1000, 2000, (batch, text_len), device=device)
    ids[:, 0] = 101
    text_mask = torch.ones_like(ids)
    encoder = getattr(model, "video_encoder", None)
    if mask_ratio > 0:
        if encoder is None:
            raise ValueError(f"--mask-ratio needs a model with a maskable video_encoder; {name} "
                             "has none")
        tokens = getattr(encoder, "patch_embed", encoder).grid(frames, size, size)
        if getattr(encoder, "frame_by_frame", False):  # the same patches in every frame
            mask = tube_mask(batch, tokens[0], tokens[1] * tokens[2], mask_ratio, device=device)
        else:
            mask = random_mask(batch, tokens[0] * tokens[1] * tokens[2], mask_ratio,
                               device=device)

        def encode_video():
            return encoder(video, mask)
    elif part == "video" and encoder is not None:
        def encode_video():
            return encoder(video)  # the backbone alone, as Table 6 counts it
    else:
        def encode_video():
            return model.encode_video(video)

    def forward():
        if part == "video":
            return encode_video()
        if part == "pair":
            return model.forward_joint(video, ids, text_mask)
        text = model.encode_text(ids, text_mask)
        if part == "text":
            return text
        return model.match(model.encode_video(video), text)

    rows = [{"item": "model", "value": name},
            {"item": "input", "value": f"{batch} x {frames} x 3 x {size} x {size}"
             + (f", text {text_len} tokens" if part != "video" else "")
             + (f", {mask_ratio:.0%} of video tokens masked" if mask_ratio else "")},
            {"item": "measured", "value": {"video": "video encoder", "text": "text encoder",
                                           "full": "video + text encoders + one match",
                                           "pair": "one (clip, caption) pair through the "
                                                   "cross-encoder"}[part]}]
    with torch.no_grad():
        rows += profile_report(model, (), forward=lambda: forward(), latency=latency,
                               memory=latency, repeats=repeats, device=device)
        if part == "pair":
            for component, value in flops_by_component(model, forward).items():
                if component != "total":
                    rows.append({"item": f"GFLOPs: {component}", "value": f"{value:.3f}"})
    if train_batch > 0:
        model.train()
        ids_t = ids[:1].expand(train_batch, -1).clone()
        batch_t = {"video": torch.randn(train_batch, frames, 3, size, size, device=device),
                   "text_ids": ids_t, "text_mask": torch.ones_like(ids_t),
                   "index": torch.arange(train_batch, device=device)}
        from leanvl.engine.optim import freeze
        from leanvl.engine.precision import autocast, resolve_precision

        freeze(model)  # teachers: no gradients, as in training
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        resolved = resolve_precision(precision, device)

        def losses():
            with autocast(resolved, device):
                return sum(model.pretrain_losses(batch_t).values())

        def step():
            optimizer.zero_grad(set_to_none=True)
            losses().backward()
            optimizer.step()

        throughput = training_throughput(step, train_batch, steps=repeats, device=device)
        rows.append({"item": f"training throughput (batch {train_batch}, {resolved})",
                     "value": f"{throughput:.1f} clips/s"})
        peak = peak_memory(step, device)
        if peak["peak_mib"] is not None:
            rows.append({"item": f"training peak memory (MiB, {peak['method']})",
                         "value": f"{peak['peak_mib']:.0f}"})
        if device.type == "cuda":
            step_flops = count_flops(losses, backward=True) * 1e9
            mfu = model_flops_utilisation(step_flops, train_batch / throughput, device)
            rows.append({"item": "training GFLOPs per step (forward + backward)",
                         "value": f"{step_flops / 1e9:.0f}"})
            rows.append({"item": "model FLOPs utilisation (bf16 peak)",
                         "value": "n/a (unknown GPU)" if mfu is None else f"{100 * mfu:.1f}%"})
    return rows
