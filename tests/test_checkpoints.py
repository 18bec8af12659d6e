"""Converters for the official UMT and OpenAI CLIP checkpoints, checked against their key lists.

The key lists (name + shape, one per line) are copies of ``shared/reference/*.txt`` in
``fixtures/reference``. State dicts with exactly those names and shapes are filled with random
values, converted and loaded with ``strict=True`` into B/16-sized modules built on the meta
device (``assign=True`` keeps the loaded tensors, so nothing is initialised or computed).
"""

from __future__ import annotations

import argparse
import ast
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from leanvl.models.checkpoints import (
    CheckpointError,
    convert_openai_clip_visual,
    convert_timm_clip_visual,
    convert_umt_finetune,
    convert_umt_pretrain,
    load_checkpoint_file,
    unwrap_state_dict,
)
from leanvl.models.teachers import CLIPVisionTeacher
from leanvl.nn.vit import AlignmentHead, PooledClassifier, VideoViT, sincos_table

REFERENCE = Path(__file__).parent / "fixtures" / "reference"


def reference_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with exactly the names and shapes of a reference key list."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for line in (REFERENCE / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            state[key] = torch.randn(ast.literal_eval(shape), generator=generator)
    return state


def load_exact(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = module.load_state_dict(state, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_convert_umt_pretrain_b16():
    official = reference_state("umt_pretrain_b16_keys.txt")
    student_state, head_state = convert_umt_pretrain({"model": official, "epoch": 199})
    with torch.device("meta"):
        student = VideoViT.from_size("b16")
        heads = nn.ModuleList(AlignmentHead(768, 512) for _ in range(6))
    load_exact(student, student_state)
    load_exact(heads, head_state)
    assert torch.equal(student.blocks[7].attn.q_bias, official["encoder.blocks.7.attn.q_bias"])
    assert torch.equal(student.blocks[11].attn.v_bias, official["encoder.blocks.11.attn.v_bias"])
    assert torch.equal(student.patch_embed.proj.weight,
                       official["encoder.patch_embed.proj.weight"])
    assert torch.equal(student.norm.bias, official["encoder.norm.bias"])
    assert torch.equal(heads[3].head.weight, official["clip_decoder.3.head.weight"])
    assert torch.equal(heads[5].norm.weight, official["clip_decoder.5.norm.weight"])


def test_convert_umt_pretrain_accepts_only_the_sincos_buffer():
    official = reference_state("umt_pretrain_b16_keys.txt")
    official["encoder.pos_embed"] = sincos_table(1568, 768)[None]
    student_state, _ = convert_umt_pretrain(official)
    assert "pos_embed" not in student_state
    official["encoder.pos_embed"] = torch.randn(1, 1568, 768)
    with pytest.raises(CheckpointError, match="learned position embedding"):
        convert_umt_pretrain(official)
    official.pop("encoder.pos_embed")
    official["mask_token"] = torch.zeros(768)
    with pytest.raises(CheckpointError, match="mask_token"):
        convert_umt_pretrain(official)


def test_convert_umt_finetune_b16():
    official = reference_state("umt_finetune_b16_keys.txt", seed=1)
    student_state, classifier_state = convert_umt_finetune({"module": official})
    with torch.device("meta"):
        student = VideoViT.from_size("b16", final_norm=False)
        classifier = PooledClassifier(768, 400)
    load_exact(student, student_state)
    load_exact(classifier, classifier_state)
    assert torch.equal(student.blocks[4].mlp.fc2.weight, official["blocks.4.mlp.fc2.weight"])
    assert torch.equal(classifier.norm.weight, official["fc_norm.weight"])
    assert torch.equal(classifier.head.bias, official["head.bias"])
    # A student with a final norm does not fit this checkpoint: the strict load says so.
    with torch.device("meta"):
        with_norm = VideoViT.from_size("b16")
    with pytest.raises(RuntimeError, match="norm.weight"):
        with_norm.load_state_dict(student_state, strict=True, assign=True)


def test_convert_openai_clip_visual_b16():
    official = reference_state("openai_clip_vit_b16_visual_keys.txt", seed=2)
    full = {f"visual.{key}": value for key, value in official.items()}
    full["text_projection"] = torch.zeros(512, 512)
    state = convert_openai_clip_visual({"model": full})
    assert state["conv1.weight"].shape == (768, 3, 16, 16)
    with torch.device("meta"):
        teacher = CLIPVisionTeacher.from_size("b16")
    load_exact(teacher, state)
    torch.testing.assert_close(teacher.conv1.weight, official["conv1.weight"][:, :, 0])
    assert torch.equal(teacher.proj, state["proj"])
    blocks = teacher.transformer.resblocks
    assert torch.equal(blocks[9].attn.in_proj_bias,
                       official["transformer.resblocks.9.attn.in_proj_bias"])
    assert torch.equal(blocks[2].mlp.c_proj.weight,
                       official["transformer.resblocks.2.mlp.c_proj.weight"])
    # The teacher also accepts the inflated 3-D conv directly.
    with torch.device("meta"):
        direct = CLIPVisionTeacher.from_size("b16")
    direct.load_state_dict(official, strict=True, assign=True)
    assert direct.conv1.weight.shape == (768, 3, 16, 16)


def test_timm_to_openai_round_trip():
    openai = {key: value for key, value in
              reference_state("openai_clip_vit_b16_visual_keys.txt", seed=3).items()
              if not key.startswith("transformer.resblocks.") or ".resblocks.0." in key}
    openai["conv1.weight"] = openai["conv1.weight"][:, :, 0]
    # timm's names for the same tensors, written out by hand.
    rename = {"conv1.weight": "patch_embed.proj.weight", "ln_pre.weight": "norm_pre.weight",
              "ln_pre.bias": "norm_pre.bias", "ln_post.weight": "norm.weight",
              "ln_post.bias": "norm.bias"}
    block = {"attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
             "attn.out_proj.weight": "attn.proj.weight", "attn.out_proj.bias": "attn.proj.bias",
             "ln_1.weight": "norm1.weight", "ln_1.bias": "norm1.bias",
             "ln_2.weight": "norm2.weight", "ln_2.bias": "norm2.bias",
             "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
             "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}
    timm_state = {"cls_token": openai["class_embedding"][None, None],
                  "pos_embed": openai["positional_embedding"][None],
                  "head.weight": openai["proj"].t(), "head.bias": torch.zeros(512)}
    for key, value in openai.items():
        if key in rename:
            timm_state[rename[key]] = value
        elif key.startswith("transformer.resblocks.0."):
            timm_state["blocks.0." + block[key[len("transformer.resblocks.0."):]]] = value
    converted = convert_timm_clip_visual(timm_state)
    assert converted.keys() == openai.keys()
    for key, value in openai.items():
        assert torch.equal(converted[key], value), key
    with pytest.raises(CheckpointError, match="fc_norm"):
        convert_timm_clip_visual({**timm_state, "fc_norm.weight": torch.ones(768)})


def test_load_checkpoint_file_weights_only(tmp_path):
    state = {"a": torch.arange(3.0)}
    path = tmp_path / "umt.pth"
    torch.save({"model": state, "args": argparse.Namespace(batch_size=2048)}, path)
    assert torch.equal(unwrap_state_dict(load_checkpoint_file(path))["a"], state["a"])
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": state, "note": Path("x")}, pickled)  # not a weights-only type
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_checkpoint_file(pickled)
    assert load_checkpoint_file(pickled, allow_pickle=True)["note"] == Path("x")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(tmp_path / "missing.pt")
    ddp = unwrap_state_dict({"state_dict": {"module.x": torch.zeros(1)}})
    assert list(ddp) == ["x"]


def test_load_checkpoint_file_torchscript(tmp_path):
    # OpenAI's CLIP .pt files are TorchScript archives.
    path = tmp_path / "ViT-B-16.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(nn.Linear(2, 3)), str(path))
    state = load_checkpoint_file(path)
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (3, 2)


def test_converted_umt_classifier_is_released_weights_that_load(tmp_path):
    import json

    from safetensors.torch import save_file

    from leanvl.models.convert import convert_checkpoint
    from leanvl.tasks.finetune import load_finetuned

    official = reference_state("umt_finetune_b16_keys.txt", seed=1)
    source = tmp_path / "k400.safetensors"
    save_file({k: v.contiguous() for k, v in official.items()}, str(source))
    classes = tmp_path / "classes.json"
    num_classes = official["head.bias"].shape[0]
    classes.write_text(json.dumps([f"action {i}" for i in range(num_classes)]))
    summary = convert_checkpoint("umt-finetune", source, tmp_path / "released", classes=classes)
    assert summary["model"] == "umt_b16" and summary["classes"] == num_classes
    model, task, labels = load_finetuned(tmp_path / "released")
    assert task == "classify" and labels[3] == "action 3"
    assert torch.equal(model.head.head.weight, official["head.weight"])
    assert torch.equal(model.model.video_encoder.blocks[4].mlp.fc2.weight,
                       official["blocks.4.mlp.fc2.weight"])
    with pytest.raises(ValueError, match="list of"):
        classes.write_text("[1, 2]")
        convert_checkpoint("umt-finetune", source, tmp_path / "again", classes=classes)
