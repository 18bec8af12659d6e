"""Attention, MLP, drop path, sine-cosine table, patch embedding and the VideoViT student."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from leanvl.nn.attention import (
    Attention,
    CrossAttention,
    DropPath,
    Mlp,
    QuickGELU,
    multi_head_attention,
)
from leanvl.nn.vit import AlignmentHead, PatchEmbed3D, PooledClassifier, VideoViT, sincos_table


def reference_attention(x: torch.Tensor, attn: Attention, key_mask=None):
    """Explicit softmax(QK^T/sqrt(d))V with the module's weights: (output, head-mean weights)."""
    B, N, D = x.shape
    H, d = attn.num_heads, attn.head_dim
    w = attn.qkv.weight
    if attn.bias_mode == "qv":
        bias = torch.cat([attn.q_bias, torch.zeros(D), attn.v_bias])
    else:
        bias = attn.qkv.bias if attn.bias_mode == "qkv" else torch.zeros(3 * D)
    q, k, v = (x @ w.t() + bias).reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = logits.softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(B, N, D)
    return attn.proj(out), probs.mean(1)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("mode", ["none", "qkv", "qv"])
def test_attention_matches_explicit_softmax(mode):
    torch.manual_seed(0)
    attn = Attention(32, 4, qkv_bias=mode).eval()
    randomise(attn)
    x = torch.randn(2, 7, 32)
    expected, expected_weights = reference_attention(x, attn)
    out, weights = attn(x, attention_rows=slice(0, 3))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights[:, :3], atol=1e-6, rtol=1e-5)
    # Asking for the weights must not change the SDPA output.
    torch.testing.assert_close(attn(x), out)


def test_qv_bias_layout_and_use():
    attn = Attention(16, 2, qkv_bias="qv")
    names = {name: tuple(p.shape) for name, p in attn.named_parameters()}
    assert names == {"q_bias": (16,), "v_bias": (16,), "qkv.weight": (48, 16),
                     "proj.weight": (16, 16), "proj.bias": (16,)}
    randomise(attn)
    x = torch.randn(1, 5, 16)
    base = attn(x)
    with torch.no_grad():
        attn.v_bias.add_(1.0)
    assert not torch.allclose(attn(x), base)  # v bias shifts every output
    with torch.no_grad():
        attn.v_bias.sub_(1.0)
        attn.q_bias.mul_(3.0)
    assert not torch.allclose(attn(x), base)  # q bias changes the attention pattern


def test_key_mask_equals_truncated_sequence():
    torch.manual_seed(1)
    attn = Attention(32, 4).eval()
    x = torch.randn(2, 6, 32)
    key_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    out, weights = attn(x, key_mask=key_mask, attention_rows=0)
    # The valid tokens of sample 0 see exactly what they would see without the padding.
    torch.testing.assert_close(out[0, :4], attn(x[:1, :4])[0], atol=1e-5, rtol=1e-5)
    assert torch.all(weights[0, 0, 4:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 1))
    expected, _ = reference_attention(x, attn, key_mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_ignores_masked_context():
    torch.manual_seed(2)
    cross = CrossAttention(32, 4, context_dim=24).eval()
    x, context = torch.randn(2, 3, 32), torch.randn(2, 5, 24)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = cross(x, context, mask)
    changed = context.clone()
    changed[0, 3:] = 100.0  # masked context tokens must not matter
    torch.testing.assert_close(cross(x, changed, mask), out)
    out_rows, weights = cross(x, context, mask, attention_rows=slice(0, 3))
    torch.testing.assert_close(out_rows, out)
    assert weights.shape == (2, 3, 5) and torch.all(weights[0, :, 3:] == 0)


def test_multi_head_attention_index_rows():
    q = torch.randn(1, 2, 4, 8)
    _, by_slice = multi_head_attention(q, q, q, attention_rows=slice(1, 3))
    _, by_index = multi_head_attention(q, q, q, attention_rows=torch.tensor([1, 2]))
    torch.testing.assert_close(by_slice, by_index)


def test_mlp_uses_exact_gelu_and_quick_gelu_formula():
    torch.manual_seed(3)
    mlp = Mlp(8, 16)
    x = torch.randn(4, 8)
    hidden = mlp.fc1(x)
    exact = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    torch.testing.assert_close(mlp(x), mlp.fc2(exact))
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x))


def test_drop_path_identity_in_eval_and_per_sample_in_train():
    layer = DropPath(0.5)
    x = torch.ones(1000, 3, 4)
    assert torch.equal(layer.eval()(x), x)
    torch.manual_seed(0)
    out = layer.train()(x)
    per_sample = out.flatten(1)
    # Whole samples are either dropped or scaled by 1 / keep.
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}
    assert torch.all(per_sample.min(1).values == per_sample.max(1).values)
    assert 0.4 < (per_sample[:, 0] == 0).float().mean() < 0.6


def test_sincos_table_hand_computed():
    table = sincos_table(10, 8)
    assert table.shape == (10, 8) and table.dtype == torch.float32
    assert torch.equal(table[0], torch.tensor([0.0, 1.0] * 4))
    # column 2i = sin(p / 10000^(2i/d)), column 2i+1 = cos of the same angle
    angle = 3 / 10000 ** (4 / 8)
    assert table[3, 4].item() == pytest.approx(math.sin(angle), abs=1e-7)
    assert table[3, 5].item() == pytest.approx(math.cos(angle), abs=1e-7)
    assert table[7, 0].item() == pytest.approx(math.sin(7.0), abs=1e-7)


def test_patch_embed_shape_and_token_order():
    embed = PatchEmbed3D(patch_size=16, tubelet_size=1, in_chans=3, dim=24)
    assert tuple(embed.proj.weight.shape) == (24, 3, 1, 16, 16)
    video = torch.zeros(1, 3, 3, 32, 48)
    base = embed(video)
    assert base.shape == (1, 3 * 2 * 3, 24)
    video[0, 1, :, 16:32, 0:16] = 1.0  # frame 1, patch row 1, column 0
    changed = (embed(video) - base).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert changed == [1 * 6 + 1 * 3 + 0]  # t-major, then rows, then columns
    with pytest.raises(ValueError, match="not divisible"):
        embed(torch.zeros(1, 1, 3, 30, 32))


@pytest.fixture(scope="module")
def tiny_vit() -> VideoViT:
    torch.manual_seed(0)
    return VideoViT.from_size("tiny", depth=3).eval()


def test_videovit_parameter_names(tiny_vit):
    names = set(tiny_vit.state_dict())
    expected = {"patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(3):
        expected |= {f"blocks.{i}.{n}" for n in (
            "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
            "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
            "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    assert names == expected  # no position table in the state dict
    assert tiny_vit.blocks[0].norm1.eps == 1e-6


def test_videovit_drops_masked_tokens(tiny_vit):
    video = torch.randn(2, 4, 3, 32, 32)  # 4 frames x 2 x 2 patches = 16 tokens
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 3, 5, 6, 9, 10, 12, 15]] = True
    mask[1, 8:] = True
    embedded = tiny_vit.embed(video, mask)
    assert embedded.shape == (2, 8, 192)
    torch.testing.assert_close(embedded, tiny_vit.embed(video)[~mask].reshape(2, 8, 192))
    assert tiny_vit(video, mask).shape == (2, 8, 192)
    # Masked tokens really are gone: changing a masked patch leaves the output unchanged.
    altered = video.clone()
    altered[1, 3] += 5.0  # frame 3 of sample 1 is tokens 12..15, all masked
    torch.testing.assert_close(tiny_vit(altered, mask)[1], tiny_vit(video, mask)[1])
    uneven = mask.clone()
    uneven[1, 0] = True
    with pytest.raises(ValueError, match="same number"):
        tiny_vit(video, uneven)


def test_videovit_adds_sincos_table(tiny_vit):
    video = torch.randn(1, 2, 3, 32, 32)
    patches = tiny_vit.patch_embed(video)
    expected = patches + sincos_table(8, 192)[None]
    torch.testing.assert_close(tiny_vit.embed(video), expected)


def test_videovit_returns_last_layers(tiny_vit):
    video = torch.randn(2, 2, 3, 32, 32)
    tokens, layers = tiny_vit.forward_features(video, return_layers=2)
    assert len(layers) == 2 and all(layer.shape == (2, 8, 192) for layer in layers)
    torch.testing.assert_close(layers[-1], tokens)  # the last layer through the shared norm
    _, raw = tiny_vit.forward_features(video, return_layers=2, norm_layers=False)
    torch.testing.assert_close(tiny_vit.norm(raw[0]), layers[0])
    assert not torch.allclose(raw[0], layers[0])


def test_videovit_other_frame_counts_and_sizes(tiny_vit):
    assert tiny_vit(torch.randn(1, 3, 3, 48, 32)).shape == (1, 3 * 3 * 2, 192)
    assert tiny_vit(torch.randn(2, 3, 32, 32)).shape == (2, 4, 192)  # an image batch


def test_videovit_drop_path_eval_deterministic_and_checkpointing_same_gradients():
    torch.manual_seed(4)
    model = VideoViT.from_size("tiny", depth=2, drop_path_rate=0.5)
    video = torch.randn(2, 2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(video), model(video))
    assert model.blocks[0].drop_path.prob == 0.0 and model.blocks[1].drop_path.prob == 0.5
    model = VideoViT.from_size("tiny", depth=2).train()
    model(video).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(video).square().mean().backward()
    for expected, param in zip(grads, model.parameters()):
        torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=1e-5)


def test_heads():
    head = AlignmentHead(192, 64)
    x = torch.randn(2, 5, 192)
    torch.testing.assert_close(head(x), F.layer_norm(head.head(x), (64,), head.norm.weight,
                                                     head.norm.bias, 1e-5))
    classifier = PooledClassifier(192, 10)
    assert classifier(x).shape == (2, 10)
    assert set(classifier.state_dict()) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}


def test_sizes():
    with torch.device("meta"):
        large = VideoViT.from_size("l16")
    assert (large.dim, large.depth, large.num_heads) == (1024, 24, 16)
    assert large.blocks[0].mlp.fc1.out_features == 4096
    with pytest.raises(ValueError, match="unknown VideoViT size"):
        VideoViT.from_size("huge")
