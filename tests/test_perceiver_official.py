"""Perceiver-VL ``variant="official"`` and ``leanvl convert perceiver-vl``: the authors' released
checkpoint, checked against its key list (``fixtures/reference/perceiver_vl_official_keys.txt``,
a copy of ``shared/reference``) and each of the six points where the authors' model differs from
leanvl's default, against values computed by hand here from the checkpoint's own tensors."""

from __future__ import annotations

import ast
import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from leanvl.cli import main
from leanvl.engine.checkpoint import load_pretrained
from leanvl.models.checkpoints import (
    CheckpointError,
    convert_perceiver_vl,
    load_state_dict_strict,
    load_tensors_only,
)
from leanvl.models.convert import convert_checkpoint
from leanvl.models.registry import create_model

KEYS = Path(__file__).parent / "fixtures" / "reference" / "perceiver_vl_official_keys.txt"
#: B/32 sizes -> tiny ones (width 32, 1 head, 16-pixel patches at 32x32, 8 latents, 4 frames);
#: the converter reads every size from the shapes, so only the names must be the authors'
TINY = {768: 32, 3072: 64, 2304: 96, 145: 5, 32: 16, 128: 8, 64: 4}


def reference_keys() -> dict[str, tuple[int, ...]]:
    """Names and shapes of the authors' checkpoint (``name (shape)  [note]`` per line)."""
    keys = {}
    for line in KEYS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, rest = line.split(" ", 1)
            keys[name] = ast.literal_eval(rest[:rest.index(")") + 1])
    return keys


def official_state(tiny: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the authors' names (tiny: 3 self-attention blocks, tiny shapes)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in reference_keys().items():
        if tiny:
            if name.startswith("transformer.blocks.") and int(name.split(".")[2]) >= 3:
                continue
            shape = tuple(TINY.get(size, size) for size in shape)
        if name == "text_embeddings.position_ids":
            state[name] = torch.arange(shape[1])[None]
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.5
    return state


def tiny_model(state: dict[str, torch.Tensor], **overrides):
    """The converted tiny state in a strictly loaded official model (eval mode)."""
    converted, shape = convert_perceiver_vl({"state_dict": state})
    kwargs = {"variant": "official", **shape, "num_cross_layers": 1, "layer_drop": 0.0,
              **overrides}
    model = create_model("perceiver_vl_b32", **kwargs)
    load_state_dict_strict(model, converted)
    return model.eval()


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def authors_cross_block(state, prefix: str, x: torch.Tensor, context: torch.Tensor):
    """The authors' cross-attention block written out (one head): the attention output is added
    to norm1(x), the context is used as given."""
    def linear(name, value):
        return value @ state[f"{prefix}.{name}.weight"].t() + state[f"{prefix}.{name}.bias"]

    normed = layer_norm(x, state[f"{prefix}.norm1.weight"], state[f"{prefix}.norm1.bias"], 1e-6)
    q, k, v = linear("attn.q", normed), linear("attn.k", context), linear("attn.v", context)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    x = normed + linear("attn.proj", weights @ v)
    hidden = layer_norm(x, state[f"{prefix}.norm2.weight"], state[f"{prefix}.norm2.bias"], 1e-6)
    return x + linear("mlp.fc2", gelu(linear("mlp.fc1", hidden)))


# ---- the checkpoint's exact names ---------------------------------------------------------------

def test_reference_checkpoint_converts_and_loads_with_no_missing_or_unexpected_keys():
    keys = reference_keys()
    assert len(keys) == 240
    state = official_state(tiny=False)
    assert sum(v.numel() for k, v in state.items() if k != "text_embeddings.position_ids") \
        == 164_244_284
    converted, shape = convert_perceiver_vl({"state_dict": state, "epoch": 9})
    assert shape == {"dim": 768, "num_heads": 12, "mlp_dim": 3072, "num_latents": 128,
                     "num_blocks": 3, "self_per_block": 4, "patch_size": 32, "image_size": 384,
                     "max_frames": 64, "vocab_size": 30522, "max_text_len": 40}
    with torch.device("meta"):
        model = create_model("perceiver_vl_b32", variant="official", **shape)
    result = model.load_state_dict(converted, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.encoder.self_layers[11].attn.qkv.weight,
                       state["transformer.blocks.11.attn.qkv.weight"])
    assert torch.equal(converted["encoder.cross.2.attn.kv.weight"], torch.cat(
        [state["transformer.crossatt_blocks_visual.2.attn.k.weight"],
         state["transformer.crossatt_blocks_visual.2.attn.v.weight"]]))
    assert torch.equal(converted["encoder.context_norm.bias"], state["transformer.co_norm.bias"])
    assert torch.equal(converted["decoder.attn.kv.bias"], torch.cat(
        [state["transformer.decoder_block_text.0.attn.k.bias"],
         state["transformer.decoder_block_text.0.attn.v.bias"]]))
    assert torch.equal(converted["embed.temporal_embed"], state["transformer.temporal_embed"][0])
    assert torch.equal(converted["query_cls"], state["transformer.cls_token_decoder"][0, :1])


def test_converter_names_what_does_not_fit():
    state = official_state()
    state["vqa_classifier.1.weight"] = torch.zeros(4, 4)
    with pytest.raises(CheckpointError, match="vqa_classifier.1.weight"):
        convert_perceiver_vl({"state_dict": state})
    state = official_state()
    del state["transformer.cls_token"]
    with pytest.raises(CheckpointError, match="transformer.cls_token"):
        convert_perceiver_vl(state)


# ---- points 1-6 of the authors' model, each against a value computed here ------------------

def test_point1_a_cls_token_per_frame_and_no_video_type_embedding():
    state = official_state()
    model = tiny_model(state)
    video = torch.randn(1, 2, 3, 32, 32)
    tokens, _ = model.embed.video(video)
    assert tokens.shape == (1, 2 * 5, 32)  # per frame: its [CLS] and 2x2 patches
    weight, bias = state["transformer.patch_embed.proj.weight"], state[
        "transformer.patch_embed.proj.bias"]
    position = state["transformer.pos_embed"][0]
    temporal = state["transformer.temporal_embed"][0]
    for t in range(2):
        cls = state["transformer.cls_token"][0, 0] + position[0] + temporal[t]
        torch.testing.assert_close(tokens[0, 5 * t], cls)
        for p in range(4):
            row, col = divmod(p, 2)
            patch = video[0, t, :, 16 * row:16 * row + 16, 16 * col:16 * col + 16]
            expected = (weight * patch).sum((1, 2, 3)) + bias + position[1 + p] + temporal[t]
            torch.testing.assert_close(tokens[0, 5 * t + 1 + p], expected, atol=1e-4, rtol=1e-4)
    # an image (B x 3 x H x W) gets no temporal embedding, as in the authors' code
    image, _ = model.embed.video(video[:, 0])
    torch.testing.assert_close(image[0, 0], state["transformer.cls_token"][0, 0] + position[0])
    # padded frames mask their [CLS] too
    _, mask = model.embed.video(video, torch.tensor([[1, 0]]))
    assert mask.tolist() == [[True] * 5 + [False] * 5]


def test_point2_bert_embedding_sum_and_layernorm_for_text():
    state = official_state()
    model = tiny_model(state)
    ids = torch.tensor([[101, 7592, 2088, 102, 0]])
    summed = (state["text_embeddings.word_embeddings.weight"][ids[0]]
              + state["text_embeddings.position_embeddings.weight"][:5]
              + state["text_embeddings.token_type_embeddings.weight"][0])
    expected = layer_norm(summed, state["text_embeddings.LayerNorm.weight"],
                          state["text_embeddings.LayerNorm.bias"], 1e-12)
    torch.testing.assert_close(model.embed.text(ids, torch.ones_like(ids))[0], expected)


def test_point3_cross_attention_adds_its_output_to_the_normalised_queries():
    state = official_state()
    model = tiny_model(state)
    latents, context = torch.randn(2, 8, 32), torch.randn(2, 11, 32)
    expected = authors_cross_block(state, "transformer.crossatt_blocks_visual.1", latents, context)
    torch.testing.assert_close(model.encoder.cross[1](latents, context), expected,
                               atol=1e-4, rtol=1e-4)
    queries = torch.randn(2, 3, 32)
    expected = authors_cross_block(state, "transformer.decoder_block_text.0", queries, latents)
    torch.testing.assert_close(model.decoder(queries, latents), expected, atol=1e-4, rtol=1e-4)


def test_point4_one_shared_input_norm_and_none_on_the_decoder_context():
    state = official_state()
    model = tiny_model(state)
    video, ids = torch.randn(2, 2, 3, 32, 32), torch.randint(1000, 2000, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    video_tokens, _ = model.embed.video(video)
    text_tokens = model.embed.text(ids, mask)
    inputs = layer_norm(torch.cat([video_tokens, text_tokens], 1),
                        state["transformer.co_norm.weight"], state["transformer.co_norm.bias"],
                        1e-6)
    latents = state["transformer.latents"].expand(2, -1, -1)
    # the text padding is masked: written out here with the padded keys left out per sample
    first = torch.stack([
        authors_cross_block(state, "transformer.crossatt_blocks_visual.0", latents[b:b + 1],
                            inputs[b:b + 1, :10 + int(mask[b].sum())])[0] for b in range(2)])
    x = first
    for layer in model.encoder.self_layers:
        x = layer(x)
    expected = layer_norm(x, state["transformer.norm.weight"], state["transformer.norm.bias"],
                          1e-6)
    encoded = model.encode_inputs({"video": (video_tokens, None), "text": (text_tokens, mask)})
    torch.testing.assert_close(encoded, expected, atol=1e-4, rtol=1e-4)
    assert all(isinstance(block.norm_context, torch.nn.Identity)
               for block in (*model.encoder.cross, model.decoder))
    query = state["transformer.cls_token_decoder"][0, :1].expand(2, -1, -1)
    decoded = layer_norm(authors_cross_block(state, "transformer.decoder_block_text.0", query,
                                             encoded),
                         state["transformer.decoder_norm.weight"],
                         state["transformer.decoder_norm.bias"], 1e-6)
    torch.testing.assert_close(model.decode(encoded, model.query_cls)[:, 0], decoded[:, 0],
                               atol=1e-4, rtol=1e-4)


def test_point5_vtm_head_is_pooled_two_class_and_the_match_logit_is_class_one():
    state = official_state()
    model = tiny_model(state)
    cls = torch.randn(3, 32)
    pooled = torch.tanh(cls @ state["matching_score.pooler.dense.weight"].t()
                        + state["matching_score.pooler.dense.bias"])
    expected = pooled @ state["matching_score.fc.weight"][1] + state["matching_score.fc.bias"][1]
    torch.testing.assert_close(model.vtm_logits(cls), expected)


def test_point6_bert_mlm_head_untied_and_mask_types_in_the_authors_order():
    state = official_state()
    model = tiny_model(state)
    features = torch.randn(4, 32)
    hidden = gelu(features @ state["mlm_score.transform.dense.weight"].t()
                  + state["mlm_score.transform.dense.bias"])
    hidden = layer_norm(hidden, state["mlm_score.transform.LayerNorm.weight"],
                        state["mlm_score.transform.LayerNorm.bias"], 1e-12)
    expected = hidden @ state["mlm_score.decoder.weight"].t() + state["mlm_score.bias"]
    torch.testing.assert_close(model.mlm_head(features), expected, atol=1e-4, rtol=1e-5)
    assert model.mlm_head.decoder.weight.data_ptr() != model.embed.token_embed.weight.data_ptr()
    # the authors' type id is (label == -100): 0 for a position to predict, 1 otherwise
    predicted = torch.tensor([[False, True, False]])
    queries = model.mlm_queries(torch.ones(1, 3), predicted)[0]
    positions, types = state["transformer.mlm_pos.weight"], state["transformer.mlm_type.weight"]
    torch.testing.assert_close(queries[1], positions[1] + types[0])
    torch.testing.assert_close(queries[2], positions[2] + types[1])


# ---- points 7-8: evaluated as the authors did ---------------------------------------------

@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """`leanvl convert perceiver-vl` on a tiny checkpoint saved as Lightning does (next to the
    weights: a class-keyed callback state and a hyper-parameter object)."""
    folder = tmp_path_factory.mktemp("pvl")
    state = official_state(seed=3)
    hyper = Hyper(config={"max_frames": 8})
    hyper.saved_by = "lightning"  # instance state: unpickling it calls __setstate__
    torch.save({"state_dict": state, "epoch": 4, "callbacks": {Callback: {"best": 1.0}},
                "hyper_parameters": hyper}, folder / "pvl.ckpt")
    assert main(["convert", "perceiver-vl", str(folder / "pvl.ckpt"), str(folder / "out")]) == 0
    return state, folder


class Callback:
    """A class a Lightning checkpoint names (its callback state is keyed by the class)."""


class Hyper(dict):
    """A hyper-parameter container whose code must not run when the file is read."""

    ran = False

    def __setstate__(self, state):
        Hyper.ran = True


def test_lightning_checkpoint_is_read_without_running_its_code(released, tmp_path):
    _, folder = released
    with pytest.raises(pickle.UnpicklingError):
        torch.load(folder / "pvl.ckpt", weights_only=True)
    loaded = load_tensors_only(folder / "pvl.ckpt")
    assert not Hyper.ran and loaded["epoch"] == 4
    assert isinstance(loaded["state_dict"]["transformer.latents"], torch.Tensor)
    assert type(loaded["hyper_parameters"]).__name__ == "Hyper"
    assert type(loaded["hyper_parameters"]) is not Hyper
    # --allow-pickle reads it with full unpickling (the class then runs)
    convert_checkpoint("perceiver-vl", folder / "pvl.ckpt", tmp_path / "trusted",
                       allow_pickle=True)
    assert Hyper.ran
    Hyper.ran = False
    with pytest.raises(ValueError, match="folder"):
        convert_checkpoint("perceiver-vl", folder / "pvl.ckpt", tmp_path / "model.safetensors")


def test_point7_released_config_runs_the_first_cross_attention_deterministically(released):
    state, folder = released
    config = json.loads((folder / "out" / "config.json").read_text())
    assert config["name"] == "perceiver_vl_b32"
    assert {k: config["kwargs"][k] for k in ("variant", "stream", "num_cross_layers",
                                             "layer_drop")} == \
        {"variant": "official", "stream": "single", "num_cross_layers": 1, "layer_drop": 0.0}
    assert config["extra"]["data"] == {"num_frames": 4, "size": 32, "max_text_len": 40,
                                       "tokenizer": "bert-base-uncased",
                                       "normalization": "custom", "mean": [0.5] * 3,
                                       "std": [0.5] * 3}
    model = load_pretrained(folder / "out")
    video, ids = torch.randn(2, 4, 3, 32, 32), torch.randint(1000, 2000, (2, 7))
    mask = torch.ones_like(ids)

    def logits():
        return model.match(model.encode_video(video), model.encode_text(ids, mask))

    first = logits()
    torch.testing.assert_close(logits(), first, rtol=0, atol=0)
    with torch.no_grad():  # cross-attentions 2 and 3 never run
        for block in model.encoder.cross[1:]:
            for parameter in block.parameters():
                parameter.normal_()
    torch.testing.assert_close(logits(), first, rtol=0, atol=0)
    model.train()  # LayerDrop 0: training runs the same single cross-attention
    torch.testing.assert_close(logits(), first, rtol=0, atol=0)


def test_point8_retrieval_scores_every_pair_with_single_stream_vtm(released):
    _, folder = released
    model = load_pretrained(folder / "out")
    videos, ids = torch.randn(3, 4, 3, 32, 32), torch.randint(1000, 2000, (4, 6))
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    video_feats, text_feats = model.encode_video(videos), model.encode_text(ids, mask)
    scores = model.similarity(video_feats, text_feats)
    assert not model.needs_rerank and scores.shape == (3, 4)
    for v in range(3):
        for t in range(4):  # each pair jointly encoded and matched on its own
            pair = model.forward_joint(videos[v:v + 1], ids[t:t + 1, :int(mask[t].sum())],
                                       mask[t:t + 1, :int(mask[t].sum())])
            torch.testing.assert_close(scores[v, t], pair[0], atol=1e-4, rtol=1e-4)
    # the authors rank by sigmoid(logit): the same order
    assert torch.equal(scores.argsort(dim=0), torch.sigmoid(scores.double()).argsort(dim=0))


def test_eval_retrieval_and_mc_run_the_converted_weights(released, tmp_path, capsys):
    _, folder = released
    data = tmp_path / "synth"
    assert main(["data", "synth", "--quiet", "--out", str(data), "pretrain_clips=2",
                 "retrieval_test_clips=5", "mc_test_clips=4", "classify_train_clips=2",
                 "classify_test_clips=2", "frames=8", "size=32", "workers=1"]) == 0
    capsys.readouterr()
    common = ["--quiet", "--model", str(folder / "out"), f"data.root={data}",
              "data.num_workers=0", "eval.batch_size=4"]
    assert main(["eval", "retrieval", *common, f"data.test={data / 'retrieval_test.jsonl'}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # every pair scored by the joint model (no dual-encoder pre-filter to re-rank); five clips
    assert metrics["num_videos"] == metrics["num_texts"] == 5 and "rerank_skipped" in metrics
    assert metrics["dual/t2v/R@5"] == metrics["dual/v2t/R@5"] == 100.0
    assert main(["eval", "mc", *common, f"data.test={data / 'mc_test.jsonl'}"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    # the same items scored here through the public contract, with the released input settings
    from leanvl.data.datasets import build_dataset
    from leanvl.engine.checkpoint import load_pretrained
    from leanvl.tasks.build import build_text_encoder
    from leanvl.tasks.search import input_config

    model = load_pretrained(folder / "out").eval()
    settings = input_config(folder / "out", [f"data.root={data}", "data.num_workers=0"])
    items = build_dataset(data / "mc_test.jsonl", str(data), settings, train=False, kind="mc")
    text = build_text_encoder(settings, model)
    records = [json.loads(line) for line in (data / "mc_test.jsonl").read_text().splitlines()]
    hits = []
    with torch.no_grad():
        for i, record in enumerate(records):
            options = text(record["caption"])
            video = model.encode_video(items[i]["video"][None])
            logits = model.match(video.index(torch.zeros(len(record["caption"]), dtype=int)),
                                 model.encode_text(options["text_ids"], options["text_mask"]))
            hits.append(int(logits.argmax()) == record["answer"])
    assert metrics["num_items"] == len(records) == 4
    assert metrics["accuracy"] == pytest.approx(100.0 * sum(hits) / len(hits))


def test_official_variant_trains_and_scores_in_the_other_streams_too():
    """The authors only ran single-stream; the official model fine-tunes in leanvl's other
    streams as well: the mixed stream's cached scores equal its per-pair decoder."""
    model = create_model("perceiver_vl_tiny", variant="official", stream="mixed",
                         pair_chunk=3).eval()
    videos, ids = torch.randn(4, 2, 3, 96, 96), torch.randint(1000, 2000, (4, 6))
    with torch.no_grad():
        video, text = model.encode_video(videos), model.encode_text(ids, torch.ones_like(ids))
        cached = model.similarity(video, text)
        uncached = torch.stack([model.match(video.index(torch.full((4,), i)), text)
                                for i in range(4)])
    torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=1e-5)
    model.train()
    batch = {"video": videos, "text_ids": ids, "text_mask": torch.ones_like(ids)}
    losses = model.pretrain_losses(batch)
    assert set(losses) == {"vtm", "mlm"} and all(torch.isfinite(v) for v in losses.values())
