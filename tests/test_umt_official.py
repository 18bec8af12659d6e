"""UMT's published checkpoints and the facts of the authors' code (REFERENCE.md, "UMT: official
code facts"), each checked against values computed by hand here.

State dicts with exactly the official names and shapes (``fixtures/reference``) are built with
one distinct constant per key, a zero-stride view (no memory), so that where each tensor lands
can be checked by its value; full-size models are built on the meta device.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from leanvl import create_model
from leanvl.models.checkpoints import (
    CheckpointError,
    convert_umt_stage2,
    stored_table_grid,
    umt_stage2_kwargs,
)

REFERENCE = Path(__file__).parent / "fixtures" / "reference"


# ------------------------------------------------------------------------------ by hand

def hand_sincos(positions: int, dim: int) -> torch.Tensor:
    """The Transformer's table written out: sin(p / 10000^(2(j//2)/dim)) in even columns, cos
    in odd ones (float64, like the authors' numpy)."""
    table = torch.empty(positions, dim, dtype=torch.float64)
    for j in range(dim):
        angle = torch.arange(positions, dtype=torch.float64) / 10000 ** (2 * (j // 2) / dim)
        table[:, j] = torch.sin(angle) if j % 2 == 0 else torch.cos(angle)
    return table


def hand_linear(frames: list[torch.Tensor], new_t: int) -> list[torch.Tensor]:
    """Linear resampling in time with half-pixel centres (align_corners=False), clamped."""
    t = len(frames)
    out = []
    for i in range(new_t):
        source = max((i + 0.5) * t / new_t - 0.5, 0.0)
        low = int(math.floor(source))
        high = min(low + 1, t - 1)
        weight = source - low
        out.append((1 - weight) * frames[low] + weight * frames[high])
    return out


def cubic(d: float, a: float = -0.75) -> float:
    """Keys' cubic convolution kernel (a = -0.75, as PyTorch's bicubic)."""
    d = abs(d)
    if d <= 1:
        return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0


def hand_bicubic(plane: torch.Tensor, y: int, x: int, new_h: int, new_w: int) -> torch.Tensor:
    """One output pixel (all channels) of a bicubic resize of ``plane`` (H x W x C) with
    half-pixel centres and clamped borders."""
    h, w = plane.shape[:2]
    sy, sx = (y + 0.5) * h / new_h - 0.5, (x + 0.5) * w / new_w - 0.5
    iy, ix = math.floor(sy), math.floor(sx)
    value = torch.zeros(plane.shape[-1], dtype=plane.dtype)
    for dy in range(-1, 3):
        for dx in range(-1, 3):
            weight = cubic(sy - (iy + dy)) * cubic(sx - (ix + dx))
            value += weight * plane[min(max(iy + dy, 0), h - 1), min(max(ix + dx, 0), w - 1)]
    return value


def hand_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


# ------------------------------------------------------------------------------ key lists

def key_list(name: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (REFERENCE / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, shape = line.split("\t")
            rows.append((key, tuple(ast.literal_eval(shape))))
    return rows


def tagged_state(rows) -> dict[str, torch.Tensor]:
    """Key i holds the constant i + 1 everywhere (a view: no memory); BERT's tied MLM decoder
    is the word-embedding matrix and its bias the MLM bias, as in a real checkpoint."""
    state = {key: torch.tensor(float(i + 1)).expand(shape) for i, (key, shape) in enumerate(rows)}
    for prefix in ("text_encoder.bert.", "text_encoder."):
        words = state.get(prefix + "embeddings.word_embeddings.weight")
        if "text_encoder.cls.predictions.decoder.weight" in state and words is not None:
            state["text_encoder.cls.predictions.decoder.weight"] = words
            state["text_encoder.cls.predictions.decoder.bias"] = \
                state["text_encoder.cls.predictions.bias"]
    return state


def finetuned_rows(rows):
    """A retrieval fine-tune of the same model, by the key list's own note: a BertModel
    (``text_encoder.<name>``, no ``bert.``, no ``cls.*``) and no ``clip_decoder``."""
    out = []
    for key, shape in rows:
        if key.startswith(("text_encoder.cls.", "vision_encoder.clip_decoder.")):
            continue
        out.append((key.replace("text_encoder.bert.", "text_encoder."), shape))
    return out


def value_of(tensor: torch.Tensor) -> float:
    return float(tensor.reshape(-1)[0])


@pytest.mark.parametrize("finetuned", [False, True], ids=["pretraining", "retrieval-finetuned"])
def test_stage2_checkpoints_convert_with_no_missing_or_unexpected_key(finetuned):
    rows = key_list("umt_stage2_b16_keys.txt")
    if finetuned:
        rows = finetuned_rows(rows)
    official = tagged_state(rows)
    official["temp"] = torch.tensor(0.05)
    tag = {key: value_of(value) for key, value in official.items() if value.dim()}
    state = convert_umt_stage2({"model": official})
    kwargs = umt_stage2_kwargs(state)
    assert kwargs["vision"] == {"dim": 768, "depth": 12, "num_heads": 12, "mlp_dim": 3072,
                                "patch_size": 16, "tubelet_size": 1, "drop_path_rate": 0.0}
    assert (kwargs["text"]["text_layers"], kwargs["text"]["fusion_layers"]) == (9, 3)
    assert (kwargs["embed_dim"], kwargs["itm_logits"], kwargs["pool_norm"]) == (512, 2, True)
    assert kwargs["mlm_head"] is (not finetuned)
    assert kwargs["uta_layers"] == (0 if finetuned else 6)
    bert = "text_encoder." if finetuned else "text_encoder.bert."
    expect = {
        "video_encoder.blocks.3.attn.q_bias": "vision_encoder.encoder.blocks.3.attn.q_bias",
        "video_encoder.norm.weight": "vision_encoder.encoder.norm.weight",
        "pool_norm.bias": "vision_encoder.pool_norm.bias",
        "text_encoder.encoder.layer.10.crossattention.self.key.weight":
            bert + "encoder.layer.10.crossattention.self.key.weight",
        "text_encoder.encoder.layer.4.output.LayerNorm.bias":
            bert + "encoder.layer.4.output.LayerNorm.bias",
        "itm_head.weight": "itm_head.weight", "vision_proj.bias": "vision_proj.bias"}
    if not finetuned:
        expect.update({"uta_heads.5.norm.bias": "vision_encoder.clip_decoder.5.norm.bias",
                       "text_encoder.mlm_head.transform.dense.weight":
                           "text_encoder.cls.predictions.transform.dense.weight",
                       "text_encoder.mlm_head.bias": "text_encoder.cls.predictions.bias"})
    for ours, theirs in expect.items():
        assert value_of(state[ours]) == tag[theirs], ours
    assert float(state["log_temperature"]) == pytest.approx(math.log(0.05))
    # every tensor of the checkpoint fits the model: a strict load, no key missing or left over
    if not finetuned:
        state["text_encoder.mlm_head.decoder.weight"] = \
            state["text_encoder.embeddings.word_embeddings.weight"]
    with torch.device("meta"):  # pre-training: with a teacher, so the heads have a home
        model = create_model("umt_b16", **kwargs, teacher="" if finetuned else "b16")
    teacher = {} if finetuned else model.teacher.state_dict(prefix="teacher.")
    result = model.load_state_dict({**state, **teacher}, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_stage2_converter_refuses_untied_decoder_and_unknown_keys():
    official = tagged_state(key_list("umt_stage2_b16_keys.txt"))
    untied = {**official, "text_encoder.cls.predictions.decoder.weight":
              torch.tensor(-1.0).expand(30522, 768)}
    with pytest.raises(CheckpointError, match="not tied"):
        convert_umt_stage2(untied)
    with pytest.raises(CheckpointError, match="text_decoder"):
        convert_umt_stage2({**official, "text_decoder.bert.x": torch.zeros(1)})
    # xbert keeps BERT's position ids as a buffer in the file: 0, 1, 2, ... is all it may hold
    positions = "text_encoder.bert.embeddings.position_ids"
    assert not any("position_ids" in key for key in
                   convert_umt_stage2({**official, positions: torch.arange(512)[None]}))
    with pytest.raises(CheckpointError, match="position_ids"):
        convert_umt_stage2({**official, positions: torch.arange(512).flip(0)[None]})


# ------------------------------------------------------------------------------ stage 1

@pytest.mark.parametrize("stage,eps", [(1, 1e-6), (2, 1e-5)])
def test_alignment_heads_add_the_sincos_table_at_visible_positions(stage, eps):
    """Each returned layer + the student-width sine-cosine table at the visible positions ->
    Linear -> LayerNorm (eps 1e-6 in stage 1, 1e-5 in stage 2)."""
    torch.manual_seed(0)
    model = create_model("umt_tiny", stage=stage, teacher="tiny", mask_type="random",
                         teacher_kwargs={"image_size": 32}, text={"vocab_size": 64}).eval()
    for head in model.uta_heads:  # tiny outputs, so that the eps decides the result
        head.head.weight.data.mul_(1e-3)
        head.head.bias.data.zero_()
    video = torch.randn(2, 2, 3, 32, 32)  # 2 frames x 2 x 2 patches = 8 positions
    mask = torch.tensor([[True, False, False, True, False, True, False, False],
                         [False, True, False, False, True, False, True, False]])
    _, layers = model.video_encoder.forward_features(video, mask, return_layers=2)
    aligned = model.align(layers, video, mask)
    table = hand_sincos(8, 192).float()
    for layer, head, out, in zip(layers, model.uta_heads, aligned, strict=True):
        visible = torch.stack([table[~row] for row in mask])
        x = (layer + visible) @ head.head.weight.t() + head.head.bias
        expected = hand_layer_norm(x, head.norm.weight, head.norm.bias, eps)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        other = hand_layer_norm(x, head.norm.weight, head.norm.bias, 1e-5 if eps == 1e-6 else 1e-6)
        assert (out - other).abs().max() > 1e-3  # the eps matters at this scale
        without_table = hand_layer_norm(layer @ head.head.weight.t(), head.norm.weight,
                                        head.norm.bias, eps)
        assert (out - without_table).abs().max() > 1e-2


# ------------------------------------------------------------------------------ tables

def test_position_table_runs_on_or_resamples_in_time_and_images_take_the_first_frame():
    """Default: the 1-D table over all T*h*w positions. ``table_frames`` (the authors'
    ckpt_num_frame): the table of those frames, linear in time to the frames given. Images:
    the first frame's rows, never resampled."""
    from leanvl.nn.vit import VideoViT

    dim = 16
    plain = VideoViT(dim=dim, depth=1, num_heads=1)
    trained4 = VideoViT(dim=dim, depth=1, num_heads=1, table_frames=4)
    cpu, f32 = torch.device("cpu"), torch.float32
    torch.testing.assert_close(plain.position_table((8, 2, 2), cpu, f32)[0],
                               hand_sincos(32, dim).float())
    base = hand_sincos(16, dim).reshape(4, 4, dim)
    expected = torch.stack(hand_linear(list(base), 8)).reshape(32, dim).float()
    torch.testing.assert_close(trained4.position_table((8, 2, 2), cpu, f32)[0], expected)
    torch.testing.assert_close(trained4.position_table((4, 2, 2), cpu, f32)[0],
                               hand_sincos(16, dim).float())
    for model in (plain, trained4):
        torch.testing.assert_close(model.position_table((1, 2, 2), cpu, f32)[0],
                                   hand_sincos(4, dim).float())
    # the UMT option reaches the table, and an image reads the same patches either way
    umt = create_model("umt_tiny", position_frames=4, mask_type="none",
                       text={"vocab_size": 64}).eval()
    assert umt.video_encoder.table_frames == 4
    image = torch.randn(1, 3, 32, 32)
    patches = umt.video_encoder.patch_embed(image[:, None])
    torch.testing.assert_close(umt.video_encoder.embed(image),
                               patches + hand_sincos(4, 192).float())


def test_classifier_table_of_16_frames_and_384_pixels_is_the_authors_resampling():
    """8 x 14 x 14 table -> bicubic in space (here 14 -> 24 patches, 384 px) -> linear in time
    (8 -> 16 frames), checked at a few positions computed by hand."""
    from leanvl.nn.vit import VideoViT

    dim = 6
    model = VideoViT(dim=dim, depth=1, num_heads=1, table_frames=8, table_patches=14)
    table = model.position_table((16, 24, 24), torch.device("cpu"), torch.float32)[0]
    table = table.reshape(16, 24, 24, dim)
    base = hand_sincos(8 * 14 * 14, dim).float().reshape(8, 14, 14, dim)
    for t, y, x in [(0, 0, 0), (5, 3, 17), (15, 23, 23), (8, 12, 1), (11, 20, 9)]:
        per_frame = [hand_bicubic(base[f], y, x, 24, 24) for f in range(8)]
        expected = hand_linear(per_frame, 16)[t]
        torch.testing.assert_close(table[t, y, x], expected, rtol=1e-4, atol=1e-5)


def test_16_frame_classifier_converts_with_its_stored_table_used_as_is(tmp_path):
    """A full-size B/16 Kinetics classifier fine-tuned at 16 frames (``pos_embed`` stored):
    every key loads (strictly), the grid is told from the table, and the table is used as is."""
    from safetensors.torch import save_file

    from leanvl.models.convert import convert_checkpoint
    from leanvl.tasks.finetune import load_finetuned

    rows = key_list("umt_finetune_b16_keys.txt")
    official = {key: torch.randn(shape) * 0.02 for key, shape in rows}
    base = hand_sincos(8 * 196, 768).float().reshape(8, 196 * 768)
    stored = torch.stack(hand_linear(list(base), 16)).reshape(1, 16 * 196, 768)
    official["pos_embed"] = stored
    source = tmp_path / "k400_f16.safetensors"
    save_file(official, str(source))
    summary = convert_checkpoint("umt-finetune", source, tmp_path / "released")
    assert summary["position_table"] == "16x14x14"
    config = json.loads((tmp_path / "released" / "config.json").read_text())
    assert config["extra"]["data"] == {"num_frames": 16, "size": 224, "normalization": "imagenet"}
    model, task, _ = load_finetuned(tmp_path / "released")
    encoder = model.model.video_encoder
    assert task == "classify" and encoder.pos_embed.shape == (1, 3136, 768)
    table = encoder.position_table((16, 14, 14), torch.device("cpu"), torch.float32)
    assert torch.equal(table, stored)
    assert torch.equal(encoder.blocks[4].mlp.fc2.weight, official["blocks.4.mlp.fc2.weight"])
    # at another clip length the stored table is resampled linearly in time (16 -> 8)
    half = encoder.position_table((8, 14, 14), torch.device("cpu"), torch.float32)[0]
    expected = torch.stack(hand_linear(list(stored.reshape(16, -1)), 8)).reshape(8 * 196, 768)
    torch.testing.assert_close(half, expected)


def test_grid_of_a_stored_table_is_found_or_asked_for():
    from leanvl.models.checkpoints import authors_position_table

    dim = 8
    assert stored_table_grid(authors_position_table((8, 24, 24), dim)) == (8, 24, 24)  # 384 px
    assert stored_table_grid(authors_position_table((16, 14, 14), dim)) == (16, 14, 14)
    assert stored_table_grid(torch.randn(1, 4608, dim), frames=8) == (8, 24, 24)
    with pytest.raises(CheckpointError, match="give the frames"):
        stored_table_grid(torch.randn(1, 4608, dim))


# ------------------------------------------------------------------------------ stage 2

def _stage2(**kwargs):
    torch.manual_seed(0)
    model = create_model("umt_tiny", mask_type="none", pool_norm=True, keep_temporal=True,
                         itm_logits=2, text={"vocab_size": 64}, **kwargs).eval()
    with torch.no_grad():
        model.pool_norm.weight.uniform_(0.5, 1.5)
        model.pool_norm.bias.normal_(0, 0.1)
    return model


def test_pooled_layernorm_per_frame_cosines_and_the_two_way_match_head():
    model = _stage2()
    video = torch.randn(3, 3, 3, 32, 32)  # 3 clips of 3 frames, 4 patches per frame
    ids = torch.randint(5, 64, (4, 7))
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    with torch.no_grad():
        clips = model.encode_video(video)
        texts = model.encode_text(ids, mask)
        scores = model.similarity(clips, texts)
        tokens = model.video_encoder(video)
        per_frame = tokens.reshape(3, 3, 4, -1).mean(dim=2)
        normed = hand_layer_norm(per_frame, model.pool_norm.weight, model.pool_norm.bias, 1e-6)
        frames = normed @ model.vision_proj.weight.t() + model.vision_proj.bias
        frames = frames / frames.norm(dim=-1, keepdim=True)
        text = texts.tokens[:, 0] @ model.text_proj.weight.t() + model.text_proj.bias
        text = text / text.norm(dim=-1, keepdim=True)
        cosines = torch.einsum("vfe,te->vft", frames, text)
        expected = cosines.mean(dim=1) / model.temperature
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
        # the embedding is the mean of the unit frame vectors: one dot product gives the score
        torch.testing.assert_close(clips.embedding, frames.mean(dim=1), rtol=1e-5, atol=1e-6)
        assert bool((clips.embedding.norm(dim=-1) < 0.999).all())
        # VTM: log-odds for match() (sigmoid = the head's softmax), the raw logit to re-rank
        pairs_v, pairs_t = clips.index(torch.tensor([0, 1, 2])), texts.index(torch.tensor([3, 0, 1]))
        fused = model.fused_cls(pairs_v, pairs_t)
        logits = fused @ model.itm_head.weight.t() + model.itm_head.bias
        torch.testing.assert_close(model.match(pairs_v, pairs_t), logits[:, 1] - logits[:, 0])
        torch.testing.assert_close(model.rerank_logit(pairs_v, pairs_t), logits[:, 1])
        torch.testing.assert_close(torch.sigmoid(model.match(pairs_v, pairs_t)),
                                   logits.softmax(dim=1)[:, 1])
        # an image is one frame: a unit embedding
        image = model.encode_video(video[:, 0])
        torch.testing.assert_close(image.embedding.norm(dim=-1), torch.ones(3))


def test_keep_temporal_training_pools_per_frame_only_without_uneven_masks():
    model = _stage2()
    assert model._per_frame(None) and not model._per_frame(torch.zeros(1, 4, dtype=torch.bool))
    model.mask_type = "tube"
    assert model._per_frame(torch.zeros(1, 4, dtype=torch.bool))


def _official_tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny UMT vision-language checkpoint with the authors' names: ViT 64 wide x 2 blocks,
    BERT 64 wide x 3 layers (the last with cross-attention), the bert-base vocabulary, an MLM
    head, two alignment heads, pool_norm, 2-way itm_head, temp."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.05):
        return torch.randn(shape, generator=generator) * std

    def norm(prefix, dim):
        return {f"{prefix}.weight": 1 + rand(dim, std=0.1), f"{prefix}.bias": rand(dim)}

    state = {"vision_encoder.encoder.patch_embed.proj.weight": rand(64, 3, 1, 16, 16),
             "vision_encoder.encoder.patch_embed.proj.bias": rand(64)}
    for i in range(2):
        block = f"vision_encoder.encoder.blocks.{i}"
        state.update({**norm(f"{block}.norm1", 64), **norm(f"{block}.norm2", 64),
                      f"{block}.attn.q_bias": rand(64), f"{block}.attn.v_bias": rand(64),
                      f"{block}.attn.qkv.weight": rand(192, 64),
                      f"{block}.attn.proj.weight": rand(64, 64), f"{block}.attn.proj.bias": rand(64),
                      f"{block}.mlp.fc1.weight": rand(128, 64), f"{block}.mlp.fc1.bias": rand(128),
                      f"{block}.mlp.fc2.weight": rand(64, 128), f"{block}.mlp.fc2.bias": rand(64)})
    state.update(norm("vision_encoder.encoder.norm", 64))
    for i in range(2):
        state.update({f"vision_encoder.clip_decoder.{i}.head.weight": rand(32, 64),
                      f"vision_encoder.clip_decoder.{i}.head.bias": rand(32),
                      **norm(f"vision_encoder.clip_decoder.{i}.norm", 32)})
    state.update(norm("vision_encoder.pool_norm", 64))
    bert = "text_encoder.bert"
    state.update({f"{bert}.embeddings.word_embeddings.weight": rand(30522, 64, std=0.5),
                  f"{bert}.embeddings.position_embeddings.weight": rand(64, 64, std=0.5),
                  f"{bert}.embeddings.token_type_embeddings.weight": rand(2, 64),
                  **norm(f"{bert}.embeddings.LayerNorm", 64)})
    for i in range(3):
        layer = f"{bert}.encoder.layer.{i}"
        parts = ["attention"] + (["crossattention"] if i == 2 else [])
        for part in parts:
            for name in ("query", "key", "value"):
                state.update({f"{layer}.{part}.self.{name}.weight": rand(64, 64, std=0.2),
                              f"{layer}.{part}.self.{name}.bias": rand(64)})
            state.update({f"{layer}.{part}.output.dense.weight": rand(64, 64),
                          f"{layer}.{part}.output.dense.bias": rand(64),
                          **norm(f"{layer}.{part}.output.LayerNorm", 64)})
        state.update({f"{layer}.intermediate.dense.weight": rand(128, 64),
                      f"{layer}.intermediate.dense.bias": rand(128),
                      f"{layer}.output.dense.weight": rand(64, 128),
                      f"{layer}.output.dense.bias": rand(64),
                      **norm(f"{layer}.output.LayerNorm", 64)})
    state.update({"text_encoder.cls.predictions.bias": rand(30522),
                  "text_encoder.cls.predictions.transform.dense.weight": rand(64, 64),
                  "text_encoder.cls.predictions.transform.dense.bias": rand(64),
                  **norm("text_encoder.cls.predictions.transform.LayerNorm", 64)})
    state["text_encoder.cls.predictions.decoder.weight"] = \
        state[f"{bert}.embeddings.word_embeddings.weight"]
    state["text_encoder.cls.predictions.decoder.bias"] = state["text_encoder.cls.predictions.bias"]
    state.update({"vision_proj.weight": rand(32, 64, std=0.3), "vision_proj.bias": rand(32),
                  "text_proj.weight": rand(32, 64, std=0.3), "text_proj.bias": rand(32),
                  "itm_head.weight": rand(2, 64, std=0.5), "itm_head.bias": rand(2),
                  "temp": torch.tensor(0.07)})
    return state


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    from leanvl.cli import main

    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(out), "--quiet", "pretrain_clips=2",
                 "retrieval_test_clips=6", "mc_test_clips=5", "classify_train_clips=2",
                 "classify_test_clips=2", "frames=6", "size=32", "workers=1"]) == 0
    return out


def test_converted_stage2_runs_the_authors_retrieval_and_mc_protocol(tmp_path, tiny_synth,
                                                                     capsys):
    from leanvl.cli import main
    from leanvl.config import load_config
    from leanvl.engine.checkpoint import load_pretrained
    from leanvl.tasks.build import build_text_encoder
    from leanvl.tasks.mc import option_scores

    source = tmp_path / "b16_tiny.pth"
    torch.save({"model": _official_tiny_state(), "epoch": 9}, source)
    out = tmp_path / "released"
    assert main(["convert", "umt-stage2", str(source), str(out), "--frames", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoint"] == "pre-training" and "8 alignment-head" in summary["left_out"]
    config = json.loads((out / "config.json").read_text())
    assert config["extra"]["eval"] == {"rerank_k": 128, "mc_vtm_weight": 0.7}
    model = load_pretrained(out)
    assert model.keep_temporal and model.itm_head.out_features == 2

    common = [f"data.root={tiny_synth}", "data.size=32", "data.num_workers=0", "--quiet"]
    assert main(["eval", "retrieval", "--model", str(out),
                 f"data.test={tiny_synth / 'retrieval_test.jsonl'}", *common]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["rerank_k"] == 128 and "rerank/t2v/R@1" in metrics and "dual/t2v/R@1" in metrics

    # the same protocol by hand: dual scores = mean per-frame cosine; re-ranked = raw match logit
    from leanvl.data.datasets import build_dataset
    from leanvl.tasks.retrieval import evaluate_retrieval

    cfg = load_config(None, [f"data.root={tiny_synth}", "data.size=32", "data.num_frames=2",
                             "data.max_text_len=32", "data.normalization=imagenet"])
    dataset = build_dataset(str(tiny_synth / "retrieval_test.jsonl"), str(tiny_synth), cfg.data,
                            train=False, kind="retrieval")
    text_encoder = build_text_encoder(cfg.data, model)
    result = evaluate_retrieval(model, dataset, text_encoder, cfg.eval, progress_bar=False,
                                return_scores=True)
    texts, _ = dataset.texts()
    with torch.no_grad():
        clip = model.encode_video(dataset[1]["video"][None])
        tokens = text_encoder([texts[0]])
        text = model.encode_text(tokens["text_ids"], tokens["text_mask"])
        frames = model.pool_norm(clip.tokens.reshape(1, 2, 4, -1).mean(dim=2))
        frames = F.normalize(model.vision_proj(frames), dim=-1)
        dual = (frames[0] @ text.embedding[0]).mean() / model.temperature
        fused = model.fused_cls(clip, text)
        raw = (fused @ model.itm_head.weight.t() + model.itm_head.bias)[0, 1]
    assert float(result["scores"]["dual"][0, 1]) == pytest.approx(float(dual), abs=1e-4)
    assert float(result["scores"]["rerank_t2v"][0, 1]) == pytest.approx(float(raw), abs=1e-4)

    assert main(["eval", "mc", "--model", str(out), f"data.test={tiny_synth / 'mc_test.jsonl'}",
                 *common[:-1]]) == 0
    captured = capsys.readouterr()
    assert "eval.mc_vtm_weight=0.7" in captured.err
    assert json.loads(captured.out)["num_items"] == 5
    # the MC rule: 0.7 * softmax(itm)[match] + 0.3 * softmax over the options of cos / temp
    with torch.no_grad():
        options = text_encoder(["a red circle", "a blue square", "nothing"])
        option_feats = model.encode_text(options["text_ids"], options["text_mask"])
        got = option_scores(model, clip, option_feats, 3, 0.7)[0]
        logits = model.fused_cls(clip.index(torch.zeros(3, dtype=torch.long)), option_feats)
        logits = logits @ model.itm_head.weight.t() + model.itm_head.bias
        cosines = (frames[0] @ option_feats.embedding.t()).mean(dim=0) / model.temperature
        expected = 0.7 * logits.softmax(dim=1)[:, 1] + 0.3 * cosines.softmax(dim=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_convert_command_names_bad_outputs_and_options(tmp_path, capsys):
    from leanvl.cli import main

    source = tmp_path / "b16_tiny.pth"
    torch.save({"model": _official_tiny_state()}, source)
    assert main(["convert", "umt-stage2", str(source), str(tmp_path / "out.txt")]) == 2
    assert "folder (released weights) or a .safetensors file" in capsys.readouterr().err
    assert main(["convert", "umt-stage1", str(source), str(tmp_path / "s1.safetensors"),
                 "--position-frames", "4"]) == 2
    assert "only applies to umt-stage2" in capsys.readouterr().err
    # a .safetensors output keeps the alignment heads, for model.pretrained= with a teacher
    assert main(["convert", "umt-stage2", str(source), str(tmp_path / "all.safetensors")]) == 0
    from leanvl.engine.checkpoint import safetensors_keys

    keys = safetensors_keys(tmp_path / "all.safetensors")
    assert "uta_heads.1.norm.weight" in keys and "text_encoder.mlm_head.decoder.weight" in keys
