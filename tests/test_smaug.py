import pytest
import torch

from leanvl import create_model
from leanvl.losses import pixel_reconstruction_loss
from leanvl.models.smaug import SMAUG
from leanvl.nn.mae import MAEDecoder, patchify, unpatchify
from leanvl.sparsify import (
    CLS_POSITION,
    FUSED_POSITION,
    TextGuidedFrameSelector,
    gumbel_top_k,
    keep_and_fuse,
    select_rows,
    sparsified_length,
)
from tests.conftest import pretrain_batch

TINY = {"vision": {"image_size": 32}}


def _batch(batch_size=4, frames=2, size=32):
    return pretrain_batch(batch_size, frames, size)


def test_keep_and_fuse_keeps_top_tokens_and_fuses_the_rest_by_attention():
    torch.manual_seed(0)
    tokens = torch.randn(1, 6, 3, requires_grad=True)  # [CLS] + 5 patches
    attention = torch.tensor([[0.2, 0.05, 0.3, 0.1, 0.25, 0.1]], requires_grad=True)
    positions = torch.tensor([[CLS_POSITION, 0, 1, 2, 3, 4]])
    out, kept_positions = keep_and_fuse(tokens, attention, positions, keep_rate=0.4)
    # ceil(0.4 * 5) = 2 kept: patches 1 (0.3) and 3 (0.25); patches 0, 2, 4 fused
    assert kept_positions.tolist() == [[CLS_POSITION, FUSED_POSITION, 1, 3]]
    expected = 0.05 * tokens[0, 1] + 0.1 * tokens[0, 3] + 0.1 * tokens[0, 5]
    assert torch.allclose(out[0, 1], expected)
    assert torch.equal(out[0, 0], tokens[0, 0]) and torch.equal(out[0, 2], tokens[0, 2])
    assert torch.equal(out[0, 3], tokens[0, 4])
    out.sum().backward()
    assert tokens.grad.abs().sum(-1).gt(0).all()  # kept and fused tokens all get gradients
    assert attention.grad[0, [1, 3, 5]].abs().gt(0).all()  # through the fusion weights
    # a later stage carries the fused token like [CLS] and ranks only patch tokens
    again, again_positions = keep_and_fuse(out, torch.tensor([[0.1, 0.9, 0.6, 0.4]]),
                                           kept_positions, keep_rate=0.5)
    assert again_positions.tolist() == [[CLS_POSITION, FUSED_POSITION, FUSED_POSITION, 1]]
    assert torch.allclose(again[0, 2], 0.4 * out[0, 3])
    assert sparsified_length(5, [0.4, 0.5]) == again.shape[1]


def test_frame_vit_sparsifies_under_autocast():
    torch.manual_seed(0)
    model = create_model("smaug_tiny", **TINY)
    frames = torch.randn(3, 3, 64, 64)  # 16 patches: 13 kept after block 2, 11 after block 3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens, positions, patches = model.video_encoder.encode_frames(frames)
    assert patches == 16 and tokens.shape == (3, sparsified_length(16, [0.8, 0.8]), 192)
    assert positions[:, 0].eq(CLS_POSITION).all() and positions[:, 1:3].eq(FUSED_POSITION).all()
    kept = positions[:, 3:]
    assert kept.ge(0).all() and all(len(set(row.tolist())) == row.numel() for row in kept)


def test_gumbel_top_k_selects_distinct_one_hot_rows_with_gradients():
    torch.manual_seed(0)
    scores = torch.randn(8, 5, requires_grad=True)
    index, rows = gumbel_top_k(scores, 3, training=True, generator=torch.Generator().manual_seed(1))
    assert index.shape == (8, 3)
    assert all(len(set(r.tolist())) == 3 for r in index) and index.diff(dim=1).gt(0).all()
    assert torch.equal(rows.detach(), torch.nn.functional.one_hot(index, 5).float())
    items = torch.randn(8, 5, 2, 4)
    picked = select_rows(items, rows)
    assert torch.equal(picked, items[torch.arange(8)[:, None], index])
    (picked * torch.randn_like(picked)).sum().backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0
    first, _ = gumbel_top_k(scores, 3, training=False)
    second, _ = gumbel_top_k(scores, 3, training=False)
    assert torch.equal(first, second)
    assert torch.equal(first, scores.topk(3, dim=1).indices.sort(dim=1).values)
    selector = TextGuidedFrameSelector(16, 8, dim=16, mlp_dim=32).eval()
    frames, text = torch.randn(2, 4, 16), torch.randn(2, 8)
    assert torch.equal(selector(frames, text, 2)[0], selector(frames, text, 2)[0])


def test_masks_tube_for_clips_random_for_images():
    model = create_model("smaug_tiny", **TINY)
    torch.manual_seed(0)
    mask = model.make_mask(torch.randn(3, 4, 3, 64, 64)).view(3, 4, 16)
    assert (mask == mask[:, :1]).all() and mask.sum(-1).eq(8).all()
    assert not (mask[0, 0] == mask[1, 0]).all()
    image_mask = model.make_mask(torch.randn(3, 3, 64, 64))
    assert image_mask.shape == (3, 16) and image_mask.sum(-1).eq(8).all()


def test_decoder_places_tokens_and_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    decoder = MAEDecoder(8, dim=8, depth=0, num_heads=2, patch_size=2).eval()
    tokens = torch.randn(1, 3, 8)  # [CLS] + patches 3 and 1
    positions = torch.tensor([[CLS_POSITION, 3, 1]])
    out = decoder(tokens, positions, num_patches=4)
    table = decoder._table(4, out)
    for slot, patch in ((1, 3), (2, 1)):
        expected = decoder.head(decoder.norm(decoder.embed(tokens[:, slot]) + table[:, patch]))
        assert torch.allclose(out[:, patch], expected, atol=1e-6)
    empty = decoder.head(decoder.norm(decoder.mask_token[:, 0] + table[:, 0]))
    assert torch.allclose(out[:, 0], empty, atol=1e-6)
    images = torch.randn(2, 3, 4, 6)
    assert torch.equal(unpatchify(patchify(images, 2), 2, 4, 6), images)
    target = torch.randn(2, 4, 12)
    predicted = target.clone()
    scored = torch.tensor([[True, False, False, True], [False, False, True, False]])
    predicted[~scored] += 5.0  # errors on unscored patches do not count
    predicted[0, 0] += 1.0
    assert torch.isclose(pixel_reconstruction_loss(predicted, target, scored),
                         torch.tensor(1.0 / 3))


def test_pretraining_losses_temporal_encoder_only_for_several_frames(monkeypatch):
    torch.manual_seed(0)
    model = create_model("smaug_tiny", selected_frames=1, **TINY).train()
    calls = []
    original = model.temporal_encoder.forward
    monkeypatch.setattr(model.temporal_encoder, "forward",
                        lambda frames: calls.append(frames.shape) or original(frames))
    losses = model.pretrain_losses(_batch(frames=1, size=64))
    assert set(losses) == {"vtc", "vtm", "mlm", "mvm"} and calls == []
    losses = model.pretrain_losses(_batch(frames=2, size=64))
    assert len(calls) == 1
    sum(losses.values()).backward()
    assert model.frame_selector.video_in.weight.grad.abs().sum() > 0
    assert model.mae_decoder.head.weight.grad.abs().sum() > 0
    assert model.temporal_encoder.blocks[0].attn.proj.weight.grad.abs().sum() > 0


def test_pretraining_reduces_losses_and_contract():
    torch.manual_seed(0)
    model = create_model("smaug_tiny", selected_frames=1, **TINY)
    batch = _batch(frames=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(25):
        losses = model.pretrain_losses(batch)
        # VTC on 4 random pairs sits at log(4) for a while from a random init; the rest learn
        tracked = losses["mvm"] + losses["vtm"] + losses["mlm"]
        first = first if first is not None else tracked.item()
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert tracked.item() < 0.8 * first
    model.eval()
    video = model.encode_video(torch.randn(4, 3, 3, 32, 32))  # other frame counts work
    text = model.encode_text(batch["text_ids"], batch["text_mask"])
    assert video.frame_cls.shape == (4, 3, 192) and video.embedding.shape == (4, 128)
    assert model.match(video, text).shape == (4,) and model.similarity(video, text).shape == (4, 4)
    assert model.select_frames(video, text).shape[1] == video.tokens.shape[1] // 3
    assert torch.equal(model.match(video, text), model.match(video, text))  # deterministic
    assert isinstance(model, SMAUG)


def test_clip_weights_load_into_frame_vit(tmp_path):
    from safetensors.torch import save_file

    from leanvl.models.convert import convert_checkpoint
    from leanvl.models.teachers import CLIPVisionTeacher

    torch.manual_seed(0)
    clip = CLIPVisionTeacher.from_size("tiny", image_size=32)
    source = tmp_path / "clip.pt"
    torch.save({"visual." + k: v for k, v in clip.state_dict().items()}, source)
    converted = tmp_path / "clip_visual.safetensors"
    convert_checkpoint("clip-visual", source, converted)
    model = create_model("smaug_tiny", clip_weights=str(converted), **TINY)
    for key, value in clip.state_dict().items():  # load_state_dict_strict: none missing/extra
        assert torch.equal(model.video_encoder.state_dict()[key], value), key
    assert "clip_weights" not in model.release_config()[0]

    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, img_size=32,
                            embed_dim=192, depth=4, num_heads=3, num_classes=128)
    torch.nn.init.zeros_(vit.head.bias)  # CLIP has none; timm's converted weights hold zeros
    timm_file = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(timm_file))
    model = create_model("smaug_tiny", clip_weights=str(timm_file), **TINY)
    assert torch.equal(model.video_encoder.transformer.resblocks[2].attn.in_proj_weight,
                       vit.blocks[2].attn.qkv.weight)
    assert torch.equal(model.video_encoder.proj, vit.head.weight.t())


def test_downstream_tasks_run_on_smaug(clip_folder):
    from leanvl.config import EvalConfig
    from leanvl.data.datasets import VideoTextDataset
    from leanvl.data.text import TextEncoder
    from leanvl.profile import count_parameters
    from leanvl.tasks.classify import VideoClassifier
    from leanvl.tasks.qa import VideoQAClassifier
    from leanvl.tasks.retrieval import evaluate_retrieval

    torch.manual_seed(0)
    model = create_model("smaug_tiny", selected_frames=1, **TINY)
    root, anno = clip_folder
    dataset = VideoTextDataset(anno, root, num_frames=2, size=32, train=False, sampling="middle")
    result = evaluate_retrieval(model.eval(), dataset, TextEncoder(max_len=8),
                                EvalConfig(rerank_k=3), batch_size=4, num_workers=0,
                                progress_bar=False)
    assert result["num_videos"] == 6 and "rerank/t2v/R@1" in result
    batch = _batch(frames=2)
    qa = VideoQAClassifier(model, num_answers=3).train()
    loss = qa.losses({**batch, "answer_index": torch.tensor([0, 1, 2, 0])})["qa"]
    loss.backward()
    assert model.frame_selector.video_in.weight.grad is not None  # S trains in fine-tuning
    classifier = VideoClassifier(model, num_classes=3)
    assert classifier.losses({"video": batch["video"], "label": torch.tensor([0, 1, 2, 0])})[
        "classify"].requires_grad
    counts = count_parameters(model)
    assert counts["frame selector (S)"] > 0 and counts["MAE decoder (D_v)"] > 0
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert counts["fusion (Q_m, cross-attention layers)"] > 0
