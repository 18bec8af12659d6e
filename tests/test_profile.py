"""Parameter counts, FLOPs (papers' convention, attention included), latency, memory, MFU."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leanvl import profile
from leanvl.masking import random_mask
from leanvl.nn.vit import PooledClassifier, VideoViT
from leanvl.profile import (
    count_flops,
    count_parameters,
    format_table,
    measure_latency,
    model_flops_utilisation,
    peak_memory,
    profile_report,
    training_throughput,
)


def analytic_gflops(tokens: int, dim: int, depth: int, mlp_dim: int, patch_volume: int) -> float:
    """Multiply-adds of a VideoViT: patch conv, then per block qkv, proj, MLP and attention."""
    per_block = 4 * tokens * dim**2 + 2 * tokens * dim * mlp_dim + 2 * tokens**2 * dim
    return (tokens * dim * patch_volume + depth * per_block) / 1e9


def test_b16_parameters_and_gflops_match_the_paper():
    with torch.device("meta"):
        backbone = VideoViT.from_size("b16")
        classifier = PooledClassifier(768, 400)
        video = torch.empty(1, 8, 3, 224, 224)
    params = count_parameters(backbone)
    # 12 x 7.09M blocks + 0.59M patch conv; no [CLS], no learned positions, no k biases.
    assert params["total"] == 85_637_376
    assert params["blocks"] == 12 * 7_087_104
    # The paper's "87M" is the K400 model (VideoMAE's convention); ours with the 400-way head:
    with_head = params["total"] + count_parameters(classifier)["total"]
    assert abs(with_head - 87e6) / 87e6 < 0.02
    gflops = count_flops(backbone, video)  # meta tensors: counted, not computed
    assert gflops == pytest.approx(analytic_gflops(1568, 768, 12, 3072, 3 * 16 * 16), rel=1e-9)
    assert abs(gflops - 180) / 180 < 0.05  # paper, Table 6: 180 GFLOPs at 8 x 224^2


def test_cpu_counts_attention_like_meta():
    torch.manual_seed(0)
    model = VideoViT.from_size("tiny").eval()
    video = torch.randn(1, 2, 3, 64, 64)  # 32 tokens
    expected = analytic_gflops(32, 192, 4, 768, 3 * 16 * 16)
    assert count_flops(model, video) == pytest.approx(expected, rel=1e-9)  # SDPA on CPU
    with torch.device("meta"):
        meta_model = VideoViT.from_size("tiny")
    assert count_flops(meta_model, torch.empty(1, 2, 3, 64, 64, device="meta")) == \
        pytest.approx(expected, rel=1e-9)
    # Dropping 75% of the tokens cuts the count to that of 8 tokens.
    mask = random_mask(1, 32, 0.75, torch.Generator().manual_seed(0))
    assert count_flops(model, (video, mask)) == pytest.approx(
        analytic_gflops(8, 192, 4, 768, 3 * 16 * 16) + 24 * 192 * 768 / 1e9, rel=1e-9)
    by_module = count_flops(model, {"video": video}, by_module=True)
    assert by_module["Global"] == pytest.approx(expected, rel=1e-9)
    backward = count_flops(model.train(), video, backward=True)
    assert 2.5 * expected < backward < 3.5 * expected  # backward is about twice the forward


def test_count_parameters_grouping():
    model = nn.Module()
    model.text = nn.Module()
    model.text.embedding = nn.Embedding(10, 4)
    model.text.encoder = nn.Linear(4, 4)
    model.head = nn.Linear(4, 2)
    model.temperature = nn.Parameter(torch.ones(()))
    model.head.requires_grad_(False)
    assert count_parameters(model) == {"text": 60, "head": 10, "temperature": 1, "total": 71}
    nested = count_parameters(model, depth=2)
    assert nested == {"text.embedding": 40, "text.encoder": 20, "head": 10, "temperature": 1,
                      "total": 71}
    assert count_parameters(model, trainable_only=True)["total"] == 61


def test_latency_throughput_memory():
    calls = []
    timing = measure_latency(lambda: calls.append(1), warmup=1, repeats=3)
    assert set(timing) >= {"mean_ms", "std_ms"} and len(calls) == 1 + 3
    calls.clear()
    throughput = training_throughput(lambda: calls.append(1), batch_size=8, steps=3, warmup=2)
    assert len(calls) == 2 + 3 and math.isfinite(throughput)
    memory = peak_memory(lambda: torch.ones(64 * 2**20).add_(1), "cpu")  # 256 MiB
    if memory["peak_mib"] is not None:  # /proc/self unavailable off Linux
        assert memory["peak_mib"] > 200


def test_model_flops_utilisation(monkeypatch):
    assert model_flops_utilisation(1e12, 1.0, "cpu") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    # 378e12 multiply-adds per second = 756e12 FLOP/s = the H100 PCIe's bf16 peak.
    assert model_flops_utilisation(378e12, 1.0, "cuda") == pytest.approx(1.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert model_flops_utilisation(78e12, 1.0, "cuda") == pytest.approx(0.5)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert profile.gpu_peak_flops("cuda") == 989e12


def test_profile_report_and_tables():
    torch.manual_seed(0)
    model = VideoViT.from_size("tiny", depth=1).eval()
    rows = profile_report(model, torch.randn(1, 2, 3, 32, 32), repeats=2, warmup=1)
    items = [row["item"] for row in rows]
    assert items[:4] == ["params: patch_embed", "params: blocks", "params: norm", "params: total"]
    assert any(item.startswith("GFLOPs") for item in items)
    assert any(item.startswith("latency") for item in items)
    markdown = format_table(rows)
    assert markdown.splitlines()[0] == "| item | value |" and markdown.splitlines()[1] == "|---|---|"
    text = format_table([{"a": "1", "bb": "long value"}], style="text")
    assert text.splitlines() == ["a  bb        ", "-  ----------", "1  long value"]
    with pytest.raises(ValueError):
        format_table(rows, style="html")
