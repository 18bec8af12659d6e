"""E-ViLM: vector quantiser, focal loss, tokenizer, model, MVM masks, retrieval, vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from leanvl import create_model
from leanvl.losses import focal_loss
from leanvl.vq import VectorQuantizer, code_usage, codebook_losses, nearest_codes
from tests.conftest import pretrain_batch

TINY = {"vocab_size": 400, "tokenizer": "tiny", "tokenizer_kwargs": {"num_codes": 64}}


def _batch(batch_size=4, frames=2, size=64, length=10):
    # [CLS], [SEP] of a truncated vocabulary (specials first)
    batch = pretrain_batch(batch_size, frames, size, length, ids=(10, 390), cls_sep=(2, 3))
    batch["text_mask"][0, -3:] = 0  # one padded caption
    return batch


SPECIALS = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


# ---- vector quantiser -------------------------------------------------------------------------
def test_nearest_code_matches_brute_force_distance():
    features, codebook = torch.randn(300, 8), torch.randn(50, 8)
    brute = torch.cdist(features, codebook).argmin(dim=1)
    assert torch.equal(nearest_codes(features, codebook, chunk_size=64), brute)
    quantizer = VectorQuantizer(50, 8, normalize=True)
    normalised = torch.cdist(torch.nn.functional.normalize(features, dim=1),
                             torch.nn.functional.normalize(quantizer.codebook, dim=1))
    assert torch.equal(quantizer.encode(features), normalised.argmin(dim=1))


def test_codebook_and_commitment_losses_by_hand():
    quantizer = VectorQuantizer(3, 2, normalize=False, restart_every=0)
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]]))
    features = torch.tensor([[[0.2, -0.1], [1.5, 0.5], [2.0, 0.0]]], requires_grad=True)
    out = quantizer(features)
    assert out.codes.tolist() == [[0, 1, 2]]
    # squared distances to the chosen codes: 0.05, 0.5, 1.0 -> mean 0.5166...
    expected = (0.2**2 + 0.1**2 + 0.5**2 + 0.5**2 + 1.0) / 3
    assert out.codebook_loss.item() == pytest.approx(expected)
    assert out.commitment_loss.item() == pytest.approx(expected)
    assert torch.equal(out.quantized.detach(), quantizer.codebook[out.codes].detach())
    # the codebook loss moves codes only, the commitment loss features only
    out.codebook_loss.backward(retain_graph=True)
    assert features.grad is None and quantizer.codebook.grad.abs().sum() > 0
    quantizer.codebook.grad = None
    out.commitment_loss.backward()
    assert quantizer.codebook.grad is None and features.grad.abs().sum() > 0
    codebook, commitment = codebook_losses(features, quantizer.codebook[out.codes])
    assert codebook.item() == pytest.approx(expected) == commitment.item()


def test_straight_through_gradient_reaches_the_encoder():
    tokenizer = create_model("evilm_tokenizer_tiny", vocab_size=400, num_codes=64,
                             special_ids=SPECIALS)
    losses = tokenizer.pretrain_losses(_batch())
    assert set(losses) == {"token", "codebook", "commitment"}
    losses["token"].backward()  # the focal loss alone: only through the straight-through copy
    assert tokenizer.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert tokenizer.to_code.weight.grad.abs().sum() > 0
    assert tokenizer.quantizer.codebook.grad is None


def test_usage_statistics_and_dead_code_restarts():
    assert code_usage(torch.tensor([2, 2, 0, 0])) == {"utilisation": 0.5, "perplexity":
                                                       pytest.approx(2.0)}
    torch.manual_seed(0)
    features = torch.randn(256, 4) + torch.tensor([5.0, 0, 0, 0])  # one small region
    used = {}
    for restart_every in (0, 2):
        quantizer = VectorQuantizer(32, 4, dead_after=4, restart_every=restart_every).train()
        for _ in range(12):
            quantizer(features.requires_grad_())
        used[restart_every] = quantizer.encode(features).unique().numel()
        if restart_every:
            assert quantizer.restarted > 0
            assert quantizer.training_usage()["utilisation"] > 0.5
    # features crowd a few codes; restarting dead codes from them spreads the features over more
    assert used[2] > 2 * used[0]


# ---- focal loss -------------------------------------------------------------------------------
def test_focal_loss_against_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    p = [1 / (1 + math.exp(-x)) for x in (2.0, -1.0, 0.5)]
    # eq. 6: positives -log p, negatives -p log(1 - p), mean over the K classes
    expected = (-math.log(p[0]) - p[1] * math.log(1 - p[1]) - p[2] * math.log(1 - p[2])) / 3
    assert focal_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert focal_loss(logits, targets, 0.0, 0.0).item() == pytest.approx(bce.item(), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        focal_loss(logits, targets[:, :2])


# ---- tokenizer --------------------------------------------------------------------------------
def test_tokenizer_targets_codes_and_training_lowers_its_loss():
    torch.manual_seed(0)
    tokenizer = create_model("evilm_tokenizer_tiny", vocab_size=400, num_codes=64,
                             special_ids=SPECIALS)
    batch = _batch()
    targets = tokenizer.word_targets(batch["text_ids"], batch["text_mask"])
    row = batch["text_ids"][1].tolist()
    assert targets[1].nonzero().squeeze(1).tolist() == sorted(set(row) - {2, 3})
    assert targets[0, batch["text_ids"][0, -3:]].sum() <= 3  # padded positions do not count
    codes = tokenizer.codes(batch["video"])
    assert codes.shape == (4, 2, 2, 2) and codes.max() < 64
    optimizer = torch.optim.AdamW(tokenizer.parameters(), lr=1e-3)
    first = None
    for _ in range(15):
        loss = sum(tokenizer.pretrain_losses(batch).values())
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first
    metrics = tokenizer.step_metrics()
    assert 0 < metrics["codebook_utilisation"] <= 1 and metrics["codebook_perplexity"] >= 1


# ---- model ------------------------------------------------------------------------------------
def test_pretraining_losses_and_frozen_tokenizer():
    torch.manual_seed(0)
    model = create_model("evilm_tiny", losses=["vtc", "vtm", "mlm", "mvm"], **TINY)
    losses = model.pretrain_losses(_batch())
    assert set(losses) == {"vtc", "vtm", "mlm", "mvm"}
    assert losses["mvm"].item() == pytest.approx(math.log(64), rel=0.2)  # 64-way, untrained
    sum(losses.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in model.tokenizer.parameters())
    assert model.video_encoder.backbone.stem[0].weight.grad is not None
    assert model.mvm_head.weight.grad is not None
    with pytest.raises(ValueError, match="tokenizer"):
        create_model("evilm_tiny", vocab_size=400).pretrain_losses(_batch())
    with pytest.raises(ValueError, match="losses"):
        create_model("evilm_tiny", losses=["uta"])


def test_mvm_masks_are_block_wise_and_zero_whole_cells():
    model = create_model("evilm_tiny", vocab_size=400, losses=["vtm"], mvm_min_patches=4)
    video = torch.randn(3, 2, 3, 256, 256)  # 8 x 8 cells of 32 pixels per frame
    mask = model.mvm_mask(video, torch.Generator().manual_seed(0))
    cells = mask.reshape(6, 8, 8)
    assert cells.sum(dim=(1, 2)).unique().tolist() == [round(0.4 * 64)]
    masked = model.mask_pixels(video, mask)
    black = ((torch.zeros(3) - torch.tensor(model.input_mean)) / torch.tensor(model.input_std))
    pixels = cells.repeat_interleave(32, 1).repeat_interleave(32, 2).reshape(3, 2, 1, 256, 256)
    assert torch.allclose(masked, torch.where(pixels, black.view(1, 1, 3, 1, 1), video))
    # BEiT's rectangles: a frame's 26 masked cells form one or two blocks, where random
    # masking at 40% scatters them over about 9 pieces
    blocks = [_components(frame) for frame in cells]
    scattered = [_components(frame) for frame in
                 torch.randperm(64).lt(26).reshape(1, 8, 8).expand(6, 8, 8)]
    assert sum(blocks) / len(blocks) <= 2.5 < sum(scattered) / len(scattered)


def _components(frame: torch.Tensor) -> int:
    """4-connected groups of True cells in an h x w bool grid."""
    seen, groups = set(), 0
    cells = {tuple(cell) for cell in frame.nonzero().tolist()}
    for start in cells:
        if start in seen:
            continue
        groups += 1
        stack = [start]
        while stack:
            row, col = stack.pop()
            if (row, col) in seen or (row, col) not in cells:
                continue
            seen.add((row, col))
            stack += [(row + 1, col), (row - 1, col), (row, col + 1), (row, col - 1)]
    return groups


def test_table8_parameters_within_five_percent():
    with torch.device("meta"):
        model = create_model("evilm")
    table = model.parameter_table()
    paper = {"text embedding": 1.2e6, "text encoder": 2.4e6, "text MLP": 49.5e3,
             "token type": 1.2e3, "visual encoder": 5.3e6, "visual MLP": 117e3,
             "decoder": 7.1e6, "pooler": 147e3, "total": 16.3e6}
    for row, value in paper.items():
        assert abs(table[row] - value) <= 0.05 * value, (row, table[row])


def test_every_evilm_preset_loads_and_builds_on_meta():
    from leanvl.config import list_presets, load_config
    from leanvl.tasks.build import build_model

    presets = [p for p in list_presets() if "evilm" in p]
    assert {"evilm_tokenizer", "evilm_pretrain", "demo_evilm"} <= set(presets)
    for preset in presets:
        cfg = load_config(preset)
        with torch.device("meta"):
            model = build_model(cfg.model)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_edgenext_weights_load_from_a_local_file(tmp_path):
    import timm

    from leanvl.models.checkpoints import CheckpointError
    from leanvl.nn.frames import FrameGridEncoder

    source = timm.create_model("edgenext_xx_small", depths=[1, 1, 1, 1], num_classes=10)
    path = tmp_path / "edgenext.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # a classifier head in the file
    encoder = FrameGridEncoder("edgenext_xx_small", str(path), depths=[1, 1, 1, 1])
    assert torch.equal(encoder.backbone.stem[0].weight, source.stem[0].weight)
    assert encoder(torch.randn(1, 2, 3, 64, 64)).shape == (1, 2 * 4, 168)
    with pytest.raises(CheckpointError, match="missing keys"):
        FrameGridEncoder("edgenext_xx_small", str(path), depths=[1, 1, 2, 1])
    with pytest.raises(FileNotFoundError):
        FrameGridEncoder("edgenext_xx_small", str(tmp_path / "none.pth"))


def test_unimodal_retrieval_scores_equal_the_public_methods(clip_folder):
    from leanvl.config import DataConfig, EvalConfig
    from leanvl.data.datasets import VideoTextDataset
    from leanvl.data.text import TextEncoder
    from leanvl.tasks.retrieval import evaluate_retrieval

    root, annotations = clip_folder
    model = create_model("evilm_tiny", losses=["vtc", "vtm", "mlm"], vocab_size=30522).eval()
    data = DataConfig(num_frames=2, size=64)
    dataset = VideoTextDataset(annotations, root, num_frames=2, size=64, train=False)
    text = TextEncoder("bert-base-uncased", 16)
    results = evaluate_retrieval(model, dataset, text, EvalConfig(rerank_k=3), batch_size=4,
                                 progress_bar=False, return_scores=True)
    texts, owners = dataset.texts()
    video = torch.stack([dataset[i]["video"] for i in range(len(dataset))])
    tokens = text(list(texts))
    with torch.no_grad():
        video_feats = model.encode_video(video)
        text_feats = model.encode_text(tokens["text_ids"], tokens["text_mask"])
        dual = model.similarity(video_feats, text_feats).t()  # texts x videos
        # the unimodal passes: the decoder over [CLS; video] / [CLS; text] alone
        alone = model.pool(model.decode(None, None, model.video_tokens(video)))
    assert torch.allclose(video_feats.embedding, torch.nn.functional.normalize(alone, dim=-1),
                          atol=1e-6)
    assert torch.allclose(results["scores"]["dual"], dual, atol=1e-5)
    t2v = results["scores"]["rerank_t2v"]
    top = dual.topk(3, dim=1).indices
    for query in range(len(texts)):
        pairs = model.match(video_feats.index(top[query]),
                            text_feats.index(torch.full((3,), query)))
        assert torch.allclose(t2v[query, top[query]].float(), pairs, atol=1e-4)
    assert data.num_frames == 2 and len(owners) == len(texts)


def test_truncated_vocabulary_unknown_words_and_round_trip(tmp_path, clip_folder):
    from leanvl.config import load_config
    from leanvl.engine.checkpoint import load_pretrained
    from leanvl.tasks.build import build_model, build_text_encoder, release, truncate_vocabulary

    root, annotations = clip_folder
    cfg = load_config(None, [f"data.train={annotations}", "data.vocab_keep_fraction=0.001",
                             "model.name=evilm_tiny", "model.kwargs.losses=[vtm,mlm]"])
    text = build_text_encoder(cfg.data)
    kwargs = truncate_vocabulary(cfg, text)
    model = build_model(cfg.model, kwargs)
    assert model.text_encoder.config.vocab_size == len(kwargs["text_vocab_ids"]) < 100
    unk = text.special_id("unk")
    encoded = text(["clip number zebra"])["text_ids"][0].tolist()
    assert encoded[3] == unk and encoded[1] != unk and encoded[2] != unk  # zebra: not in captions
    folder = release(model, tmp_path / "model", cfg.data)
    loaded = load_pretrained(folder)
    reloaded_text = build_text_encoder(cfg.data, loaded)
    assert reloaded_text(["clip number zebra"])["text_ids"][0].tolist() == encoded
    assert loaded.specials == model.specials
    ids = torch.tensor([encoded])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_text(ids, torch.ones_like(ids)).embedding,
                              model.eval().encode_text(ids, torch.ones_like(ids)).embedding)


def test_release_leaves_out_tokenizer_and_mvm_head(tmp_path):
    from leanvl.engine.checkpoint import load_pretrained
    from leanvl.tasks.build import release

    model = create_model("evilm_tiny", **TINY)
    folder = release(model, tmp_path / "model")
    loaded = load_pretrained(folder)
    assert loaded.tokenizer is None and not hasattr(loaded, "mvm_head")
    assert loaded.losses == ("vtm", "mlm")
    video = torch.randn(2, 2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_video(video).embedding,
                              model.eval().encode_video(video).embedding, atol=1e-6)


def test_downstream_wrappers_run_on_evilm():
    from leanvl.tasks.classify import VideoClassifier
    from leanvl.tasks.qa import VideoQAClassifier

    model = create_model("evilm_tiny", vocab_size=400, losses=["vtm"])
    batch = _batch()
    qa = VideoQAClassifier(model, num_answers=7)
    batch["answer_index"] = torch.tensor([0, 1, 2, -1])
    loss = qa.losses(batch)["qa"]
    loss.backward()
    assert qa.head.classifier.weight.grad is not None
    classifier = VideoClassifier(model, num_classes=5)
    assert classifier(batch["video"]).shape == (4, 5)


def test_tokenize_command_writes_codes_picture_and_usage(tmp_path, clip_folder, capsys):
    import json

    from leanvl.cli import main
    from leanvl.tasks.build import release

    root, annotations = clip_folder
    tokenizer = create_model("evilm_tokenizer_tiny", vocab_size=400, num_codes=64)
    folder = release(tokenizer, tmp_path / "tokenizer")
    out = tmp_path / "codes.png"
    assert main(["tokenize", str(root / "clip0.mp4"), "--model", str(folder), "--out", str(out),
                 "--frames", "2", "--size", "64"]) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert out.stat().st_size > 0 and record["grid"] == [2, 2, 2] and record["num_codes"] == 64
    clip = torch.stack([torch.as_tensor(record["codes"])])
    assert clip.min() >= 0 and clip.max() < 64
    capsys.readouterr()
    assert main(["tokenize", "--model", str(folder), "--data", str(annotations), "--root",
                 str(root), "--frames", "2", "--size", "64", "--quiet"]) == 0
    usage = json.loads(capsys.readouterr().out)
    assert usage["clips"] == 6 and usage["tokens"] == 6 * 8
    assert usage["utilisation"] == usage["codes_used"] / 64 and 1 <= usage["perplexity"] <= 48
    assert main(["tokenize", "--model", str(folder)]) == 2  # neither a video nor --data


def test_tokenizer_pretraining_logs_codebook_metrics_apart_from_the_loss(tmp_path, clip_folder):
    import json

    from leanvl.config import load_config
    from leanvl.tasks.pretrain import run_pretrain

    root, annotations = clip_folder
    cfg = load_config("demo_evilm_tokenizer", [
        f"out={tmp_path}", f"data.root={root}", f"data.train={annotations}", "data.size=64",
        "data.num_frames=2", "data.batch_size=3", "data.num_workers=0", "train.epochs=2",
        "train.log_every=1", "data.vocab_keep_fraction=0.01", "model.kwargs.num_codes=16"])
    result = run_pretrain(cfg, evaluate=lambda model: {}, progress=False)
    records = [json.loads(line) for line in
               (tmp_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    records = [record for record in records if "loss" in record]  # not the evaluation's
    assert len(records) == result["step"] == 4
    for record in records:
        assert 0 < record["metric/codebook_utilisation"] <= 1
        assert 1 <= record["metric/codebook_perplexity"] <= 16
        weighted = record["token"] + record["codebook"] + record["commitment"]
        assert record["loss"] == pytest.approx(weighted, rel=1e-4)  # metrics are not losses


def test_multiple_choice_and_linear_probe_run_on_evilm(clip_folder):
    from leanvl.config import DataConfig, EvalConfig
    from leanvl.data.annotations import write_annotations
    from leanvl.data.datasets import build_dataset
    from leanvl.data.text import TextEncoder
    from leanvl.tasks.classify import linear_probe
    from leanvl.tasks.mc import evaluate_mc

    root, _ = clip_folder
    data = DataConfig(num_frames=2, size=64, normalization="imagenet", num_workers=0)
    mc = write_annotations([{"video": f"clip{i}.mp4", "answer": i % 3,
                             "caption": [f"clip number {j}" for j in range(3)]}
                            for i in range(6)], root / "mc.jsonl")
    text = TextEncoder(max_len=12)
    model = create_model("evilm_tiny", vocab_size=text.vocab_size, losses=["vtm"]).eval()
    dataset = build_dataset(mc, str(root), data, train=False, kind="mc")
    result = evaluate_mc(model, dataset, text, EvalConfig(), batch_size=3, progress_bar=False)
    # each item's options scored here through the public contract: the VTM logit of (clip, option)
    options = text([f"clip number {j}" for j in range(3)])
    hits = []
    with torch.no_grad():
        for i in range(6):
            video = model.encode_video(dataset[i]["video"][None]).index(torch.zeros(3, dtype=int))
            logits = model.match(video, model.encode_text(options["text_ids"],
                                                          options["text_mask"]))
            hits.append(int(logits.argmax()) == i % 3)
    assert result["num_items"] == 6
    assert result["accuracy"] == pytest.approx(100.0 * sum(hits) / 6)
    labelled = write_annotations([{"video": f"clip{i}.mp4", "label": str(i % 2)}
                                  for i in range(6)], root / "classes.jsonl")
    dataset = build_dataset(labelled, str(root), data, train=False, kind="classification")
    probe = linear_probe(model, dataset, dataset, "cpu", batch_size=3, epochs=30,
                         progress_bar=False)
    assert probe["top1"] >= 50  # two classes, probed on its own training clips
