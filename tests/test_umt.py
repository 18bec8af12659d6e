import pytest
import torch

from leanvl import create_model
from leanvl.models.umt import UMT
from tests.conftest import pretrain_batch

TEACHER = {"teacher": "tiny", "teacher_kwargs": {"image_size": 32}}


def _batch(batch_size=4, frames=2, size=32):
    return pretrain_batch(batch_size, frames, size)


def test_stage_losses_and_frozen_teacher():
    torch.manual_seed(0)
    stage1 = create_model("umt_tiny", stage=1, **TEACHER)
    assert set(stage1.pretrain_losses(_batch())) == {"uta"}
    assert stage1.text_encoder is None
    stage2 = create_model("umt_tiny", stage=2, **TEACHER)
    losses = stage2.pretrain_losses(_batch())
    assert set(losses) == {"uta", "vtc", "vtm", "mlm"}
    sum(losses.values()).backward()
    assert all(p.grad is None for p in stage2.teacher.parameters())
    assert all(not p.requires_grad for p in stage2.teacher.parameters())
    assert stage2.video_encoder.blocks[0].attn.qkv.weight.grad is not None
    no_teacher = create_model("umt_tiny", mask_type="random")
    assert set(no_teacher.pretrain_losses(_batch())) == {"vtc", "vtm", "mlm"}


def test_student_sees_only_unmasked_tokens_chosen_by_teacher_attention():
    torch.manual_seed(0)
    model = create_model("umt_tiny", stage=1, video_mask_ratio=0.75, **TEACHER)
    video = torch.randn(2, 2, 3, 32, 32)  # 2 frames x 4 patches
    output = model.teacher(model.teacher.renormalize(video, model.input_mean, model.input_std))
    mask = model.make_mask(video, output.attention, torch.Generator().manual_seed(0))
    assert mask.shape == (2, 8) and mask.view(2, 2, 4).sum(-1).eq(3).all()  # 75% per frame
    tokens, _, uta = model._distill(video)
    assert tokens.shape == (2, 2, 192) and uta is not None
    images = torch.randn(2, 1, 3, 32, 32)
    assert model.make_mask(images, model.teacher(images).attention).sum(1).eq(2).all()  # 50%


def test_uta_training_aligns_student_with_teacher():
    torch.manual_seed(0)
    model = create_model("umt_tiny", stage=1, **TEACHER)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch(frames=2)
    first = None
    for _ in range(30):
        loss = model.pretrain_losses(batch)["uta"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_contract_shapes_and_errors():
    model = create_model("umt_tiny")
    batch = _batch()
    video = model.encode_video(batch["video"])
    text = model.encode_text(batch["text_ids"], batch["text_mask"])
    assert video.embedding.shape == (4, 128) and torch.allclose(video.embedding.norm(dim=-1), torch.ones(4))
    assert model.similarity(video, text).shape == (4, 4) and model.match(video, text).shape == (4,)
    assert model.fused_cls(video, text).shape == (4, 128)
    with pytest.raises(ValueError, match="semantic masking needs a teacher"):
        model.pretrain_losses(batch)
    video_only = create_model("umt_tiny", stage=1)  # released stage-1 weights: no teacher
    assert video_only.encode_video(batch["video"]).tokens.shape == (4, 2 * 4, 192)
    with pytest.raises(ValueError, match="stage 1 pre-training distils from a teacher"):
        video_only.pretrain_losses(batch)
    with pytest.raises(ValueError, match="did you mean 'umt_tiny'"):
        create_model("umt_tinny")
    assert isinstance(model, UMT) and model.layer_id("video_encoder.blocks.2.mlp.fc1.weight") == 3


def test_official_stage1_checkpoint_loads_into_umt_b16():
    from leanvl.models.checkpoints import convert_umt_pretrain
    from tests.test_checkpoints import reference_state  # names and shapes of the official file

    with torch.device("meta"):
        model = create_model("umt_b16", stage=1, teacher="b16")
    student, heads = convert_umt_pretrain({"model": reference_state("umt_pretrain_b16_keys.txt")})
    assert model.video_encoder.load_state_dict(student, strict=True, assign=True)
    assert model.uta_heads.load_state_dict(heads, strict=True, assign=True)


def test_teacher_with_another_patch_size_sees_the_student_grid():
    # a CLIP-L/14-like teacher of a 16-pixel-patch student: frames resized 32 -> 28 pixels
    model = create_model("umt_tiny", stage=1, teacher="tiny",
                         teacher_kwargs={"image_size": 28, "patch_size": 14})
    batch = _batch(frames=2, size=32)
    assert model.teacher_input(batch["video"]).shape[-2:] == (28, 28)
    assert set(model.pretrain_losses(batch)) == {"uta"}


def test_stage1_file_with_alignment_heads_starts_a_teacherless_stage2(tmp_path):
    from leanvl.config import ModelConfig
    from leanvl.engine.checkpoint import save_pretrained
    from leanvl.tasks.build import build_model

    stage1 = create_model("umt_tiny", stage=1, **TEACHER)
    save_pretrained(stage1, tmp_path / "s1", exclude_prefixes=("teacher.",))  # keeps uta_heads
    cfg = ModelConfig(name="umt_tiny", pretrained=str(tmp_path / "s1"),
                      kwargs={"stage": 2, "mask_type": "random"})
    stage2 = build_model(cfg)
    assert torch.equal(stage2.video_encoder.blocks[1].attn.qkv.weight,
                       stage1.video_encoder.blocks[1].attn.qkv.weight)
    assert not hasattr(stage2, "uta_heads") and stage2.text_encoder is not None


def test_stage2_weights_start_a_video_only_model(tmp_path):
    """Fine-tuning an action classifier from stage-2 weights: the text side, the projections
    and the bare log_temperature parameter are left out, the video encoder loads."""
    from leanvl.config import ModelConfig
    from leanvl.engine.checkpoint import save_pretrained
    from leanvl.tasks.build import build_model

    stage2 = create_model("umt_tiny", stage=2, mask_type="random", text={"vocab_size": 64})
    save_pretrained(stage2, tmp_path / "s2")
    video_only = build_model(ModelConfig(name="umt_tiny", pretrained=str(tmp_path / "s2"),
                                         kwargs={"stage": 1, "mask_type": "random"}))
    assert torch.equal(video_only.video_encoder.blocks[1].attn.qkv.weight,
                       stage2.video_encoder.blocks[1].attn.qkv.weight)
    assert video_only.text_encoder is None and not hasattr(video_only, "log_temperature")


def test_truncated_vocabulary_remaps_specials_and_sizes_the_text_side():
    from leanvl.nn.text import BERT_SPECIALS

    kept = [0, 100, 101, 102, 103] + list(range(1000, 1095))  # BERT specials, then 95 words
    model = create_model("umt_tiny", mask_type="random", text_vocab_ids=kept)
    assert model.text_encoder.config.vocab_size == 100
    assert model.specials == {name: kept.index(token) for name, token in BERT_SPECIALS.items()}
    batch = _batch()
    batch["text_ids"] = torch.randint(5, 100, batch["text_ids"].shape)
    batch["text_ids"][:, 0], batch["text_ids"][:, -1] = 2, 3  # [CLS], [SEP] in the new ids
    losses = model.pretrain_losses(batch)
    assert set(losses) == {"vtc", "vtm", "mlm"} and all(v.isfinite() for v in losses.values())
    with pytest.raises(ValueError, match="lacks the special tokens"):
        create_model("umt_tiny", mask_type="random", text_vocab_ids=list(range(1000, 1100)))


def test_match_scores_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    model = create_model("umt_tiny", mask_type="random").eval()
    batch = _batch()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        video = model.encode_video(batch["video"])
        text = model.encode_text(batch["text_ids"], batch["text_mask"])
        scores = model.match(video, text)
    assert scores.dtype == torch.float32


def test_pretrained_text_side_takes_dropout_and_rejects_other_sizes(tmp_path):
    from transformers import BertModel

    from leanvl.nn.text import bert_config

    BertModel(bert_config(vocab_size=120, hidden_size=64, num_layers=3, num_heads=4,
                          intermediate_size=128, max_positions=40),
              add_pooling_layer=False).save_pretrained(tmp_path / "bert")
    model = create_model("umt_tiny", stage=2, text_pretrained=str(tmp_path / "bert"),
                         text={"text_layers": 2, "fusion_layers": 1, "dropout": 0.0})
    assert model.text_encoder.config.hidden_dropout_prob == 0.0
    assert model.text_encoder.config.attention_probs_dropout_prob == 0.1  # the checkpoint's
    with pytest.raises(ValueError, match="hidden_size"):
        create_model("umt_tiny", stage=2, text_pretrained=str(tmp_path / "bert"),
                     text={"hidden_size": 32})


def test_negative_captions_join_vtc_and_vtm_as_negatives_of_their_clip():
    model = create_model("umt_tiny", stage=2, mask_type="random")
    batch = _batch()
    false = torch.randint(1000, 3000, (2, 8))
    false[:, 0], false[:, -1] = 101, 102
    with_negatives = {**batch, "negative_text_ids": false,
                      "negative_text_mask": torch.ones_like(false),
                      "negative_owner": torch.tensor([1, 3])}
    pairs = []
    original = model.match

    def match(video, text):
        pairs.append((video.embedding.shape[0], text.embedding.shape[0]))
        return original(video, text)

    model.match = match
    torch.manual_seed(0)
    plain = model.pretrain_losses(batch)
    assert pairs == [(4, 4)] * 3
    pairs.clear()
    torch.manual_seed(0)
    losses = model.pretrain_losses(with_negatives)
    # B positives, B hard-text and B hard-video negatives, (clip 1, its false caption), (clip 3, ...)
    assert sorted(pairs) == [(2, 2)] + [(4, 4)] * 3
    assert losses["vtc"] > plain["vtc"]  # more columns in each video's softmax
    sum(losses.values()).backward()


def test_reversed_clips_join_vtc_and_vtm_as_negatives_of_their_captions():
    # clips 0 and 2 are flagged: each is played backwards through the student with the visible
    # patches of the forward clip, then scored against its own caption as a negative
    model = create_model("umt_tiny", stage=2, mask_type="random").eval()  # no dropout
    batch = {**_batch(frames=3), "reversal_negative": torch.tensor([True, False, True, False])}
    seen = []
    original_match, original_encoder = model.match, model.video_encoder.forward

    def match(video, text):
        seen.append((video.tokens.detach().clone(), text.tokens.detach().clone()))
        return original_match(video, text)

    def encoder(video, mask=None):
        seen.append(("encoder", video.clone(), None if mask is None else mask.clone()))
        return original_encoder(video, mask)

    model.match, model.video_encoder.forward = match, encoder
    torch.manual_seed(0)
    plain = model.pretrain_losses({k: v for k, v in batch.items() if k != "reversal_negative"})
    seen.clear()
    torch.manual_seed(0)
    losses = model.pretrain_losses(batch)
    (_, backwards, mask), *matches = seen
    assert torch.equal(backwards, batch["video"][[0, 2]].flip(1))
    # the forward step's mask of clips 0 and 2, frame order reversed
    torch.manual_seed(0)
    forward_mask = model.make_mask(batch["video"], None)[[0, 2]]
    assert torch.equal(mask, forward_mask.reshape(2, 3, -1).flip(1).reshape(2, -1))
    assert len(matches) == 4
    # the one pair scored for clips 0 and 2 only: their reversals against their own captions
    (reversed_video, captions), = [m for m in matches if m[0].shape[0] == 2]
    expected = original_encoder(backwards, mask)
    torch.testing.assert_close(reversed_video, expected)
    text = model.encode_text(batch["text_ids"][[0, 2]], batch["text_mask"][[0, 2]])
    torch.testing.assert_close(captions, text.tokens)
    assert losses["vtc"] > plain["vtc"]  # two more columns in each caption's softmax
    assert losses["vtm"] != plain["vtm"]
    sum(losses.values()).backward()
    # images (one-frame videos) have no reversal, whatever the flags say
    seen.clear()
    image_batch = {**_batch(frames=1), "reversal_negative": torch.ones(4, dtype=torch.bool)}
    model.pretrain_losses(image_batch)
    assert len(seen) == 3  # three VTM calls, no clip played backwards


@pytest.mark.parametrize("mask_type", ["random", "tube"])
def test_tubelets_of_two_frames_mask_and_reverse_by_token_step(mask_type):
    model = create_model("umt_tiny", stage=2, mask_type=mask_type,
                         vision={"tubelet_size": 2}).eval()
    batch = {**_batch(frames=4), "reversal_negative": torch.tensor([True, False, True, False])}
    assert model.make_mask(batch["video"], None).shape == (4, 2 * 4)  # 2 steps x 2 x 2 patches
    losses = model.pretrain_losses(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    semantic = create_model("umt_tiny", stage=1, vision={"tubelet_size": 2}, **TEACHER)
    with pytest.raises(ValueError, match="tubelet_size=1"):
        semantic.pretrain_losses({"video": batch["video"]})


def test_reverse_mask_reverses_time_steps():
    from leanvl.masking import reverse_mask

    mask = torch.tensor([[1, 0, 0, 0, 1, 1]], dtype=torch.bool)  # 3 steps of 2 patches
    assert reverse_mask(mask, 3).tolist() == [[True, True, False, False, True, False]]
    with pytest.raises(ValueError, match="T=4"):
        reverse_mask(mask, 4)


@pytest.mark.parametrize("center", [True, False])
def test_centred_uta_targets_ignore_what_a_clip_shares(center):
    # a teacher vector added to every token of a clip changes nothing once targets are centred
    from leanvl.models.teachers import TeacherOutput

    torch.manual_seed(0)
    model = create_model("umt_tiny", stage=1, uta_center=center, mask_type="random", **TEACHER)
    video = torch.randn(2, 2, 3, 32, 32)
    plain = model.teacher.forward
    shift = 5 * torch.randn(2, 1, model.teacher.out_dim)

    def uta(shifted: bool) -> torch.Tensor:
        def forward(frames):
            output = plain(frames)
            return TeacherOutput([t + shift for t in output.layers] if shifted else output.layers,
                                 output.attention)
        model.teacher.forward = forward
        torch.manual_seed(1)  # the same random mask
        return model.pretrain_losses({"video": video})["uta"]

    same = torch.allclose(uta(False), uta(True), atol=1e-5)
    assert same == center
