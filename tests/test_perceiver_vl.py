"""Perceiver-VL: LayerDrop, mixed-stream caching, the query decoder, streams, initialisation."""

from __future__ import annotations

import pytest
import torch

from leanvl import create_model, load_pretrained
from leanvl.nn.perceiver import PerceiverEncoder
from leanvl.profile import count_flops

SMALL = {"dim": 64, "num_heads": 2, "mlp_dim": 128, "num_latents": 8, "num_blocks": 3,
         "self_per_block": 1, "patch_size": 16, "image_size": 32, "max_frames": 4,
         "vocab_size": 300, "max_text_len": 12, "embed_dim": 32}


def small(**kwargs):
    torch.manual_seed(0)
    return create_model("perceiver_vl_tiny", **{**SMALL, **kwargs})


def batch(size=4, frames=2, length=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(104, 300, (size, length), generator=generator)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one padded caption
    return {"video": torch.randn(size, frames, 3, 32, 32, generator=generator),
            "text_ids": ids, "text_mask": mask, "index": torch.arange(size)}


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.75])
def test_layer_drop_expected_active_cross_attentions(p):
    encoder = PerceiverEncoder(dim=16, num_heads=2, num_blocks=4, self_per_block=1,
                               layer_drop=p, layer_drop_seed=3).train()
    draws = torch.tensor([encoder.active_blocks() for _ in range(4000)])
    assert draws[:, 0].all()  # the first cross-attention is never dropped
    expected = 1 + 3 * (1 - p)
    assert abs(draws.sum(1).float().mean().item() - expected) < 0.06
    encoder.eval()
    assert encoder.active_blocks() == [True] * 4  # nothing dropped at inference
    assert encoder.active_blocks(num_cross_layers=2) == [True, True, False, False]
    with pytest.raises(ValueError, match="num_cross_layers"):
        encoder.active_blocks(num_cross_layers=5)


def test_layer_drop_decisions_agree_across_ranks_and_resume():
    # two "ranks" with different global RNG states make the same decisions step by step
    first = PerceiverEncoder(16, 2, num_blocks=3, self_per_block=1, layer_drop=0.5).train()
    second = PerceiverEncoder(16, 2, num_blocks=3, self_per_block=1, layer_drop=0.5).train()
    torch.manual_seed(1)
    a = [first.active_blocks() for _ in range(50)]
    torch.manual_seed(2)
    b = [second.active_blocks() for _ in range(50)]
    assert a == b and any(not all(x) for x in a)
    # the call counter is state: a reloaded encoder continues the same sequence
    resumed = PerceiverEncoder(16, 2, num_blocks=3, self_per_block=1, layer_drop=0.5).train()
    resumed.load_state_dict(first.state_dict())
    assert [resumed.active_blocks() for _ in range(20)] == \
        [first.active_blocks() for _ in range(20)]


def test_dropped_cross_attention_gets_no_gradient():
    model = small(layer_drop=0.5)
    model.train()
    encoder = model.encoder
    # find two draws in a row (the step's encoder calls: video, then text) that both drop
    # block 2's cross-attention, then replay them
    draws = [encoder.active_blocks() for _ in range(200)]
    calls = next(i for i in range(199) if not draws[i][2] and not draws[i + 1][2])
    encoder.layer_drop_calls.fill_(calls)
    loss = sum(model.pretrain_losses(batch()).values())
    loss.backward()
    assert encoder.cross[0].attn.q.weight.grad is not None  # never dropped
    assert all(p.grad is None for p in encoder.cross[2].parameters())  # dropped both times
    assert model.ddp_find_unused_parameters


def test_mixed_stream_cached_scores_equal_uncached():
    model = small(stream="mixed", pair_chunk=5).eval()
    data = batch(size=5)
    with torch.no_grad():
        video = model.encode_video(data["video"])
        text = model.encode_text(data["text_ids"], data["text_mask"])
        cached = model.similarity(video, text)  # 5 x 5 through per-item decoder caches
        uncached = torch.stack([model.match(video.index(torch.full((5,), i)), text)
                                for i in range(5)])
    assert cached.shape == (5, 5)
    assert torch.allclose(cached, uncached, atol=1e-5)
    assert not model.needs_rerank and video.inputs is None  # no input array kept


def test_single_and_multi_streams():
    data = batch()
    single = small(stream="single").eval()
    with torch.no_grad():
        video = single.encode_video(data["video"])
        text = single.encode_text(data["text_ids"], data["text_mask"])
        joint = single.match(video, text)
        # the joint encoder sees both modalities: the score changes with the video
        swapped = single.match(video.index(torch.tensor([1, 0, 3, 2])), text)
    assert video.inputs.shape == (4, 2 * 4, 64)
    assert not torch.allclose(joint, swapped)
    multi = small(stream="multi").eval()
    with torch.no_grad():
        video = multi.encode_video(data["video"])
        text = multi.encode_text(data["text_ids"], data["text_mask"])
        assert torch.allclose(multi.similarity(video, text).diagonal(), multi.match(video, text),
                              atol=1e-6)
    assert set(multi.pretrain_losses(data)) == {"vtc", "mlm"}
    with pytest.raises(ValueError, match="multi-stream"):  # at training, not when scoring
        small(stream="multi", losses=["vtm"]).pretrain_losses(data)
    # single-stream training can add VTC on the separate encodings behind its pre-filter
    assert set(small(stream="single", losses=["vtc", "vtm", "mlm"]).pretrain_losses(data)) == \
        {"vtc", "vtm", "mlm"}


def test_mlm_logits_do_not_depend_on_the_masked_token():
    model = small(stream="single").eval()
    data = batch(size=2)
    predicted = torch.zeros_like(data["text_ids"], dtype=torch.bool)
    predicted[:, 3] = True
    ids_a = data["text_ids"].clone()
    ids_a[:, 3] = 103  # [MASK] in the input array
    ids_b = ids_a.clone()
    with torch.no_grad():
        video = model.encode_video(data["video"])
        text_a = model.encode_text(ids_a, data["text_mask"])
        context = model.joint_latents(video, text_a)
        queries = model.mlm_queries(data["text_mask"], predicted)
        logits = model.mlm_head(model.decode(context, queries))
        # queries hold positions and mask indicators only: token embeddings never reach them
        model.embed.token_embed.weight.normal_()
        assert torch.equal(model.mlm_queries(data["text_mask"], predicted), queries)
        ids_b[:, 5] = 200  # another visible token does change the prediction (via the latents)
        changed = model.mlm_head(model.decode(model.joint_latents(
            video, model.encode_text(ids_b, data["text_mask"])), queries))
    assert not torch.allclose(logits, changed)
    unmarked = model.mlm_queries(data["text_mask"], torch.zeros_like(predicted))
    assert not torch.allclose(unmarked[:, 3], queries[:, 3])  # the indicator is an input


@pytest.mark.parametrize("stream", ["single", "mixed"])
def test_pretraining_losses_go_down(stream):
    model = small(stream=stream, layer_drop=0.5, mlm_ratio=0.3)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    data = batch(size=8)
    history = []
    # 100 steps: at 60 the ratio below sat at 0.70-0.78, moved by any change of floating-point
    # order (threads, CPU); at 100 it is 0.49-0.69 over five initialisations
    for step in range(100):
        torch.manual_seed(step)
        losses = model.pretrain_losses(data)
        assert set(losses) == {"vtm", "mlm"}
        history.append(losses["mlm"].item())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert sum(history[-10:]) < 0.75 * sum(history[:10])


@pytest.mark.parametrize("aggregation", ["separate", "separate_plus"])
def test_separate_aggregations_use_a_cross_attention_per_modality(aggregation):
    model = small(aggregation=aggregation, stream="single", layer_drop=0.0)
    assert model.encoder.num_cross_attentions == 6
    data = batch()
    video = model.encode_video(data["video"])  # video only: the text cross-attentions are idle
    video.embedding.sum().backward()
    assert model.encoder.cross[1].attn.q.weight.grad is not None
    assert model.encoder.cross_text[1].attn.q.weight.grad is None
    model.zero_grad()
    sum(model.pretrain_losses(data).values()).backward()  # joint: both are used
    assert model.encoder.cross_text[1].attn.q.weight.grad is not None


def test_init_from_timm_vit_and_two_stage_freezing(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    model = create_model("perceiver_vl_tiny", dim=192, num_heads=3, mlp_dim=768, num_latents=8,
                         image_size=32, init=str(path), freeze_pretrained=True)
    assert torch.equal(model.encoder.self_layers[3].attn.qkv.weight,
                       vit.blocks[3].attn.qkv.weight)
    assert torch.equal(model.embed.patch_embed.proj.weight, vit.patch_embed.proj.weight)
    assert model.embed.video_pos.shape == (1, 4, 192)  # 4x4 grid resampled to 2x2, no [CLS]
    assert "encoder.self_layers." in model.frozen_prefixes
    from leanvl.engine.optim import freeze

    frozen = freeze(model)
    assert any(n.startswith("encoder.self_layers.") for n in frozen)
    assert not any(n.startswith("encoder.cross.") for n in frozen)
    kwargs, exclude = model.release_config()
    assert "init" not in kwargs and exclude == ()
    with pytest.raises(ValueError, match="init="):
        create_model("perceiver_vl_tiny", freeze_pretrained=True)


@pytest.mark.parametrize("mode", ["new", "interpolate"])
def test_latent_size_change_at_fine_tuning(tmp_path, mode):
    from leanvl.engine.checkpoint import load_weights, save_pretrained

    source = small(num_latents=4)
    save_pretrained(source, tmp_path / "m")
    target = small(num_latents=8, latent_resize=mode)
    fresh = target.latents.latents.detach().clone()
    load_weights(target, tmp_path / "m")
    stored = source.latents.latents.detach()
    if mode == "new":
        assert torch.equal(target.latents.latents, fresh)
    else:
        assert torch.allclose(target.latents.latents[0], stored[0])
        assert torch.allclose(target.latents.latents[-1], stored[-1])
    assert torch.equal(target.vtm_head.weight, source.vtm_head.weight)  # the rest loads as is
    reloaded = load_pretrained(tmp_path / "m", overrides={"stream": "single",
                                                          "num_cross_layers": 2})
    assert reloaded.latents.num_latents == 4 and reloaded.stream == "single"
    assert reloaded.num_cross_layers == 2 and reloaded.registry_kwargs["stream"] == "single"


def test_inference_cross_layers_and_clear_errors():
    model = small(num_cross_layers=1).eval()
    data = batch()
    with torch.no_grad():
        one = model.encode_video(data["video"]).tokens
        model.num_cross_layers = None
        three = model.encode_video(data["video"]).tokens
    assert not torch.allclose(one, three)
    with pytest.raises(ValueError, match="max_frames"):
        model.encode_video(torch.randn(1, 5, 3, 32, 32))
    with pytest.raises(ValueError, match="max_text_len"):
        model.encode_text(torch.ones(1, 13, dtype=torch.long), torch.ones(1, 13))
    with pytest.raises(ValueError, match="stream"):
        small(stream="dual")


def test_cost_grows_linearly_for_perceiver_and_quadratically_for_joint_attention():
    def gflops(name, frames, **kwargs):
        with torch.device("meta"):
            model = create_model(name, **kwargs).eval()
            video = torch.empty(1, frames, 3, 384, 384)
            ids = torch.ones(1, 40, dtype=torch.long)
        return count_flops(lambda: model.forward_joint(video, ids, torch.ones_like(ids)))

    perceiver = gflops("perceiver_vl_b32", 32) / gflops("perceiver_vl_b32", 8)
    joint = gflops("vilt_b32", 32) / gflops("vilt_b32", 8)
    assert perceiver <= 4.2 and joint >= 1.4 * perceiver
    by_latents = [gflops("perceiver_vl_b32", 8, num_latents=n) for n in (32, 64, 128, 256)]
    steps = [b - a for a, b in zip(by_latents, by_latents[1:])]
    # equal steps per doubling of N would be quadratic; linear means each step doubles
    assert all(1.8 < later / earlier < 2.3 for earlier, later in zip(steps, steps[1:]))


def test_every_task_runs_a_perceiver_unchanged(clip_folder):
    from leanvl.config import EvalConfig
    from leanvl.data.datasets import Collator, VideoTextDataset
    from leanvl.data.text import TextEncoder
    from leanvl.tasks.classify import VideoClassifier
    from leanvl.tasks.qa import VideoQAClassifier
    from leanvl.tasks.retrieval import evaluate_retrieval

    root, anno = clip_folder
    dataset = VideoTextDataset(anno, root, num_frames=2, size=32, train=False, sampling="middle")
    text = TextEncoder(max_len=12)
    model = small(vocab_size=text.vocab_size).eval()
    result = evaluate_retrieval(model, dataset, text, EvalConfig(rerank_k=4), batch_size=4,
                                progress_bar=False)
    assert result["num_texts"] == 12 and "rerank_skipped" in result
    # the rank of each caption's clip, computed here from the model's own scores
    video = model.encode_video(torch.stack([dataset[i]["video"] for i in range(6)]))
    texts, owners = dataset.texts()
    encoded = text(texts)
    captions = model.encode_text(encoded["text_ids"], encoded["text_mask"])
    scores = model.similarity(video, captions).t()  # T x V
    hits = scores.argmax(dim=1) == torch.tensor(owners)
    assert result["dual/t2v/R@1"] == pytest.approx(100.0 * hits.float().mean().item())
    # the decoder scores pairs; the separate encoders' embeddings are ranked beside it
    embedded = (captions.embedding @ video.embedding.t()).argmax(dim=1) == torch.tensor(owners)
    assert result["embed/t2v/R@1"] == pytest.approx(100.0 * embedded.float().mean().item())
    batch = Collator(text)([dataset[i] for i in range(3)])
    qa = VideoQAClassifier(model, num_answers=5)
    assert qa(batch["video"], batch["text_ids"], batch["text_mask"]).shape == (3, 5)
    classifier = VideoClassifier(model, num_classes=4)
    assert classifier.classify_logits(batch["video"]).shape == (3, 4)
    train = small(vocab_size=text.vocab_size, stream="mixed")
    assert set(train.pretrain_losses(batch)) == {"vtm", "mlm"}


def test_single_stream_without_vtc_scores_every_pair_jointly():
    data = batch(size=3)
    model = small(stream="single").eval()  # the paper's VTM + MLM: no trained dual encoder
    assert not model.needs_rerank and model.ddp_find_unused_parameters
    with torch.no_grad():
        video = model.encode_video(data["video"])
        text = model.encode_text(data["text_ids"], data["text_mask"])
        scores = model.similarity(video, text)
        pairwise = torch.stack([model.match(video.index(torch.full((3,), i)), text)
                                for i in range(3)])
    assert torch.allclose(scores, pairwise, atol=1e-5)
    assert small(stream="single", losses=["vtc", "vtm", "mlm"]).needs_rerank


def test_mixed_scores_stay_float32_under_bf16_autocast():
    model = small(stream="mixed").eval()
    data = batch(size=4)
    with torch.no_grad():
        video = model.encode_video(data["video"])
        text = model.encode_text(data["text_ids"], data["text_mask"])
        exact = model.similarity(video, text)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = model.similarity(video, text)
    assert under.dtype == torch.float32 and torch.allclose(under, exact, atol=1e-5)


@pytest.mark.parametrize("stream", ["single", "mixed"])
def test_vtm_scores_of_pairs_are_float32_under_bf16_autocast(stream):
    # multiple choice scores each option with match(); bf16 logits tie, and ties count as misses
    model = small(stream=stream).eval()
    data = batch(size=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        video = model.encode_video(data["video"])
        text = model.encode_text(data["text_ids"], data["text_mask"])
        pairs = model.match(video, text)
        joint = model.forward_joint(data["video"], data["text_ids"], data["text_mask"])
    assert pairs.dtype == joint.dtype == torch.float32
    assert pairs.unique().numel() == 4


def test_vtc_aligns_clean_captions_when_mlm_masks_them():
    data = batch(size=4)
    with_mlm = small(stream="multi", losses=["vtc", "mlm"], layer_drop=0.0, mlm_ratio=1.0)
    without = small(stream="multi", losses=["vtc"], layer_drop=0.0)
    assert torch.allclose(with_mlm.pretrain_losses(data)["vtc"],
                          without.pretrain_losses(data)["vtc"], atol=1e-6)


def test_token_table_starts_from_a_bert_folder(tmp_path):
    from transformers import BertModel

    from leanvl.nn.text import bert_config

    torch.manual_seed(4)
    bert = BertModel(bert_config(vocab_size=300, hidden_size=96, num_layers=1, num_heads=2,
                                 intermediate_size=64, max_positions=16))
    bert.save_pretrained(tmp_path / "bert")
    stored = bert.embeddings.word_embeddings.weight.detach()
    # PCA to the model's width, computed independently through the SVD of the centred table
    centred = stored - stored.mean(dim=0)
    left, singular, _ = torch.linalg.svd(centred, full_matrices=False)
    expected = left[:, :64] * singular[:64]
    expected = expected * (0.02 / expected.std())
    kept = [0, 100, 101, 102, 103] + list(range(150, 250))
    for vocab in (None, kept):
        model = small(text_embed_init=str(tmp_path / "bert"), text_vocab_ids=vocab)
        table = model.embed.token_embed.weight.detach()
        rows = expected if vocab is None else expected[vocab] * (expected.std()
                                                                 / expected[vocab].std())
        # each principal direction is defined up to its sign
        signs = torch.sign((table * rows).sum(dim=0))
        torch.testing.assert_close(table * signs, rows, atol=1e-5, rtol=1e-4)
        assert model.mlm_head.weight is model.embed.token_embed.weight
        assert "text_embed_init" not in model.release_config()[0]
    with pytest.raises(ValueError, match="cannot start"):
        small(dim=128, num_heads=2, text_embed_init=str(tmp_path / "bert"))


def test_hard_vtm_negatives_follow_vtc_similarity():
    model = small(losses=["vtc", "vtm", "mlm"], vtm_negatives="hard")
    size = 6
    video = torch.nn.functional.normalize(torch.randn(size, 32), dim=-1)
    # text i is a copy of video (i + 1) % size: at temperature 0.07 the draw is all but certain
    text = video.roll(-1, dims=0)
    swap = torch.tensor([True, False, True, True, False, True])
    source = model._hard_sources(swap, torch.arange(size), video, text, torch.arange(size))
    expected = torch.where(swap, (torch.arange(size) + 1) % size, torch.arange(size))
    assert source.tolist() == expected.tolist()
    # a video sharing the caption's clip id is a positive and never drawn
    ids = torch.tensor([0, 0, 1, 2, 3, 4])
    text = video.clone()
    text[0] = video[1]
    source = model._hard_sources(torch.ones(size, dtype=torch.bool), torch.arange(size), video,
                                 text, ids)
    assert source[0] not in (0, 1)
    losses = model.pretrain_losses(batch(size=4))
    assert set(losses) == {"vtc", "vtm", "mlm"} and all(v.isfinite() for v in losses.values())
    with pytest.raises(ValueError, match="vtc and vtm"):
        small(losses=["vtm", "mlm"], vtm_negatives="hard")


def test_mixed_vtm_negatives_mine_half_of_the_swapped_samples(monkeypatch):
    model = small(losses=["vtc", "vtm", "mlm"], vtm_negatives="mixed")
    mined = []
    original = model._hard_sources

    def spy(hard, source, *args):
        mined.append((hard.clone(), source.clone()))
        return original(hard, source, *args)

    monkeypatch.setattr(model, "_hard_sources", spy)
    model.vtm_swap_prob = 1.0  # every sample swapped: the mined ones are about half of them
    for _ in range(20):
        model.pretrain_losses(batch(size=8))
    hard = torch.stack([h for h, _ in mined])
    assert 0.3 < hard.float().mean().item() < 0.7
    with pytest.raises(ValueError, match="vtm_negatives"):
        small(vtm_negatives="semi")


def test_rank_loss_ranks_every_pair_of_the_batch_by_the_decoder():
    data = batch(size=4)
    data["index"] = torch.tensor([0, 1, 2, 0])  # captions 0 and 3 share video 0
    model = small(stream="mixed", losses=["vtm", "mlm", "rank"], layer_drop=0.0, mlm_ratio=1.0)
    losses = model.pretrain_losses(data)
    # independently: the uncached decoder score of every pair, on the clean captions (VTM
    # and MLM read the masked ones), then softmax over each row and each column
    video = model.encode_video(data["video"])
    text = model.encode_text(data["text_ids"], data["text_mask"])
    scores = torch.stack([model.match(video.index(torch.full((4,), i)), text)
                          for i in range(4)])
    positive = (data["index"][:, None] == data["index"][None]).float()
    expected = 0.0
    for logits in (scores, scores.t()):
        log_p = logits.log_softmax(dim=1)
        expected = expected - ((log_p * positive).sum(1) / positive.sum(1)).mean() / 2
    assert torch.allclose(losses["rank"], expected, atol=1e-5)
    model.zero_grad()
    losses["rank"].backward()
    assert model.vtm_head.weight.grad.abs().sum() > 0
    assert model.latents.latents.grad.abs().sum() > 0  # the encoders learn from it too
    with pytest.raises(ValueError, match="stream='mixed'"):
        small(stream="single", losses=["vtm", "rank"])
