"""The frozen CLIP teacher: outputs against a reference forward, timm mapping, loading, freezing."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from leanvl.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from leanvl.models.checkpoints import CheckpointError, load_state_dict_strict
from leanvl.models.teachers import CLIPVisionTeacher, TeacherOutput, renormalize


def randomise(module: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Random weights everywhere (biases too), LayerNorm gains around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * scale
            is_gain = name.endswith("weight") and param.dim() == 1
            param.copy_(noise + 1.0 if is_gain else noise)


def tiny_teacher(**overrides) -> CLIPVisionTeacher:
    config = {"width": 64, "layers": 3, "heads": 4, "output_dim": 32, "patch_size": 8,
              "image_size": 32, "return_layers": 2}
    teacher = CLIPVisionTeacher(**{**config, **overrides})
    randomise(teacher)
    return teacher


def reference_forward(teacher: CLIPVisionTeacher, video: torch.Tensor, count: int):
    """OpenAI CLIP's visual forward with nn.MultiheadAttention, frame by frame."""
    B, T = video.shape[:2]
    x = teacher.conv1(video.flatten(0, 1))
    x = x.flatten(2).transpose(1, 2)
    cls = teacher.class_embedding.expand(x.shape[0], 1, -1)
    x = teacher.ln_pre(torch.cat([cls, x], 1) + teacher.positional_embedding)
    outputs, weights = [], None
    blocks = teacher.transformer.resblocks
    for i, block in enumerate(blocks):
        mha = nn.MultiheadAttention(teacher.width, block.attn.num_heads, batch_first=True)
        mha.load_state_dict(block.attn.state_dict())
        h = block.ln_1(x)
        out, weights = mha(h, h, h, need_weights=True, average_attn_weights=True)
        x = x + out
        x = x + block.mlp(block.ln_2(x))
        if i >= len(blocks) - count:
            outputs.append(teacher.ln_post(x[:, 1:]) @ teacher.proj)
    P = x.shape[1] - 1
    targets = [o.reshape(B, T * P, -1) for o in outputs]
    return targets, weights[:, 0, 1:].reshape(B, T, P)


def test_teacher_matches_multihead_attention_reference():
    teacher = tiny_teacher()
    video = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = teacher(video)
    assert isinstance(out, TeacherOutput)
    assert len(out.layers) == 2 and out.layers[0].shape == (2, 3 * 16, 32)
    assert out.attention.shape == (2, 3, 16)
    with torch.no_grad():
        targets, attention = reference_forward(teacher, video, 2)
    for got, expected in zip(out.layers, targets):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attention, attention, atol=1e-6, rtol=1e-5)
    # Frame by frame: frame 2 of sample 1 alone gives the same tokens.
    single = teacher(video[1:, 2:])
    torch.testing.assert_close(single.layers[-1][0], out.layers[-1][1, 2 * 16:], atol=1e-5,
                               rtol=1e-5)
    assert teacher(video, return_layers=3).layers[1].shape == (2, 48, 32)


def test_teacher_is_frozen():
    teacher = tiny_teacher()
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    video = torch.randn(1, 2, 3, 32, 32, requires_grad=True)
    out = teacher(video)
    assert not out.layers[0].requires_grad and not out.attention.requires_grad


def test_teacher_other_input_size_interpolates_positions():
    teacher = tiny_teacher()
    assert torch.equal(teacher.position_embedding(4, 4), teacher.positional_embedding)
    out = teacher(torch.randn(1, 2, 3, 24, 40))
    assert out.layers[0].shape == (1, 2 * 3 * 5, 32) and out.attention.shape == (1, 2, 15)


def test_renormalize_imagenet_to_clip():
    raw = torch.rand(2, 3, 3, 8, 8)

    def normalise(x, mean, std):
        return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    student_input = normalise(raw, IMAGENET_MEAN, IMAGENET_STD)
    teacher = tiny_teacher()
    torch.testing.assert_close(teacher.renormalize(student_input, IMAGENET_MEAN, IMAGENET_STD),
                               normalise(raw, CLIP_MEAN, CLIP_STD))
    assert renormalize(raw, CLIP_MEAN, CLIP_STD, CLIP_MEAN, CLIP_STD) is raw
    official = tiny_teacher(mean=IMAGENET_MEAN, std=IMAGENET_STD)  # UMT code's choice
    assert official.renormalize(student_input, IMAGENET_MEAN, IMAGENET_STD) is student_input


def openai_state(teacher: CLIPVisionTeacher) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in teacher.state_dict().items()}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_from_file_full_clip_with_inflated_conv(tmp_path, suffix):
    teacher = tiny_teacher()
    state = openai_state(teacher)
    state["conv1.weight"] = state["conv1.weight"][:, :, None]  # UMT's 1 x p x p layout
    full = {f"visual.{key}": value for key, value in state.items()}
    # The text tower's names overlap the visual ones without the prefix.
    full["positional_embedding"] = torch.zeros(77, 16)
    full["transformer.resblocks.0.ln_1.weight"] = torch.zeros(16)
    path = tmp_path / f"clip{suffix}"
    if suffix == ".pt":
        torch.save({"state_dict": full, "args": argparse.Namespace(lr=1.0)}, path)
    else:
        save_file(full, str(path))
    loaded = CLIPVisionTeacher.from_file(path, heads=4, return_layers=2)
    assert (loaded.width, loaded.patch_size, loaded.image_size, loaded.out_dim) == (64, 8, 32, 32)
    video = torch.randn(1, 2, 3, 32, 32)
    torch.testing.assert_close(loaded(video).layers[-1], teacher(video).layers[-1])


def test_load_errors_list_keys_and_file(tmp_path):
    state = openai_state(tiny_teacher())
    state.pop("ln_post.bias")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        CLIPVisionTeacher.from_file(path, heads=4)
    message = str(error.value)
    assert "broken.pth" in message and "ln_post.bias" in message and "extra.weight" in message
    with pytest.raises(CheckpointError, match=r"mine\.pt.*missing.*resblocks\.3\.ln_1"):
        load_state_dict_strict(tiny_teacher(layers=4), openai_state(tiny_teacher()), "mine.pt")


@pytest.mark.parametrize("model_name,act", [("vit_base_patch16_clip_224", "gelu"),
                                            ("vit_base_patch16_clip_quickgelu_224",
                                             "quick_gelu")])
def test_timm_clip_naming_matches_timm_outputs(model_name, act):
    timm = pytest.importorskip("timm")
    model = timm.create_model(model_name, pretrained=False, embed_dim=128, depth=3,
                              num_heads=2, img_size=64, num_classes=48).eval()
    randomise(model, seed=3)
    with torch.no_grad():
        model.head.bias.zero_()  # CLIP's projection has no bias (timm stores zeros)
    teacher = CLIPVisionTeacher.from_state_dict(model.state_dict(), act=act, return_layers=3)
    assert (teacher.width, teacher.patch_size, teacher.image_size) == (128, 16, 64)
    assert len(teacher.transformer.resblocks) == 3 and teacher.out_dim == 48
    assert teacher.transformer.resblocks[0].attn.num_heads == 2  # 128 // 64

    captured = []
    hooks = [block.register_forward_hook(lambda m, i, o: captured.append(o))
             for block in model.blocks]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        pooled = model(images)
    for hook in hooks:
        hook.remove()
    out = teacher(images[:, None])  # two one-frame videos
    for got, block_out in zip(out.layers, captured):
        expected = model.head(model.norm(block_out[:, 1:]))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The [CLS] path through timm's head is CLIP's image embedding; the same weights give it.
    torch.testing.assert_close(model.head(model.norm(captured[-1][:, 0])), pooled)
    assert out.attention.shape == (2, 1, 16)
    # [CLS] -> patch weights: positive, and short of 1 by the [CLS] -> [CLS] weight.
    assert torch.all(out.attention > 0) and torch.all(out.attention.sum(-1) < 1)

    state = model.state_dict()
    state["head.bias"] = torch.ones(48)
    with pytest.raises(CheckpointError, match="head.bias"):
        CLIPVisionTeacher.from_state_dict(state)


def test_sizes():
    with torch.device("meta"):
        large = CLIPVisionTeacher.from_size("l14")
    assert large.conv1.weight.shape == (1024, 3, 14, 14)
    assert large.positional_embedding.shape == (257, 1024) and large.proj.shape == (1024, 768)
    assert large.return_layers == 6
    with pytest.raises(ValueError, match="unknown CLIP size"):
        CLIPVisionTeacher.from_size("h14")
