import math

import pytest
import torch
import torch.nn.functional as F

from leanvl.losses import mlm_loss, sample_hard_negatives, uta_loss, vtc_loss, vtm_loss


def test_vtc_is_low_for_aligned_pairs_and_matches_hand_computation():
    torch.manual_seed(0)
    video = F.normalize(torch.randn(6, 16), dim=-1)
    aligned = vtc_loss(video, video.clone(), 0.05)
    shuffled = vtc_loss(video, video.roll(1, 0), 0.05)
    assert aligned < 0.1 < shuffled
    text = F.normalize(torch.randn(6, 16), dim=-1)
    logits = video @ text.t() / 0.07
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    assert torch.allclose(vtc_loss(video, text, 0.07), expected)


def test_vtc_ids_spread_target_over_shared_videos():
    video = F.normalize(torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]]), dim=-1)
    ids = torch.tensor([7, 7, 3])
    # two captions of the same video: with ids the duplicate is not a negative
    with_ids = vtc_loss(video, video, 0.1, ids=ids)
    # rows 0 and 1 put half the target on each copy; row 2 has one positive (logits 0, 0, 10)
    row_shared = math.log(2 * math.exp(10) + 1) - 10  # -(0.5 lsm_0 + 0.5 lsm_1)
    row_single = math.log(2 + math.exp(10)) - 10
    assert math.isclose(with_ids.item(), (2 * row_shared + row_single) / 3, rel_tol=1e-6)
    # two different clips of video 7: each caption's target is split over both clips
    video = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.5], [0.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[1.0, 0.4], [1.0, 0.1], [0.1, 1.0]]), dim=-1)
    target = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    logits = video @ text.t() / 0.1
    expected = (-(F.log_softmax(logits, 1) * target).sum(1).mean()
                - (F.log_softmax(logits.t(), 1) * target).sum(1).mean()) / 2
    assert torch.allclose(vtc_loss(video, text, 0.1, ids=ids), expected)
    assert not torch.allclose(vtc_loss(video, text, 0.1), expected)


def test_vtc_negative_texts_are_extra_video_to_text_columns():
    torch.manual_seed(1)
    video = F.normalize(torch.randn(4, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    false = F.normalize(torch.randn(3, 8), dim=-1)
    logits = video @ text.t() / 0.1
    wide = torch.cat([logits, video @ false.t() / 0.1], dim=1)
    expected = (F.cross_entropy(wide, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    assert torch.allclose(vtc_loss(video, text, 0.1, negative_text=false), expected)
    assert torch.allclose(vtc_loss(video, text, 0.1, ids=torch.arange(4), negative_text=false),
                          expected)
    # a caption of each clip's reversal that resembles the clip raises the loss
    assert vtc_loss(video, text, 0.1, negative_text=video) > vtc_loss(video, text, 0.1)
    assert torch.allclose(vtc_loss(video, text, 0.1, negative_text=false[:0]),
                          vtc_loss(video, text, 0.1))


def test_vtc_negative_videos_are_extra_text_to_video_columns():
    torch.manual_seed(2)
    video = F.normalize(torch.randn(4, 8), dim=-1)
    text = F.normalize(torch.randn(4, 8), dim=-1)
    backwards = F.normalize(torch.randn(2, 8), dim=-1)
    false = F.normalize(torch.randn(3, 8), dim=-1)
    logits = video @ text.t() / 0.1
    wide_t2v = torch.cat([logits.t(), text @ backwards.t() / 0.1], dim=1)
    wide_v2t = torch.cat([logits, video @ false.t() / 0.1], dim=1)
    expected = (F.cross_entropy(wide_v2t, torch.arange(4))
                + F.cross_entropy(wide_t2v, torch.arange(4))) / 2
    both = vtc_loss(video, text, 0.1, negative_text=false, negative_video=backwards)
    assert torch.allclose(both, expected)
    assert torch.allclose(vtc_loss(video, text, 0.1, ids=torch.arange(4), negative_text=false,
                                   negative_video=backwards), expected)
    # a reversed clip that looks like the caption's own clip raises the loss
    assert vtc_loss(video, text, 0.1, negative_video=text[:2]) > vtc_loss(video, text, 0.1)
    assert torch.allclose(vtc_loss(video, text, 0.1, negative_video=backwards[:0]),
                          vtc_loss(video, text, 0.1))


def test_hard_negatives_never_positive_and_prefer_similar():
    generator = torch.Generator().manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 2] = 10.0  # video 0 is very similar to text 2
    picks = [sample_hard_negatives(sim, generator=generator)[0][0].item() for _ in range(50)]
    assert set(picks) == {2}
    for _ in range(20):
        neg_text, neg_video = sample_hard_negatives(torch.randn(5, 5), generator=generator)
        assert (neg_text != torch.arange(5)).all() and (neg_video != torch.arange(5)).all()
    ids = torch.tensor([0, 0, 1, 1])
    neg_text, _ = sample_hard_negatives(torch.randn(4, 4), ids=ids, generator=generator)
    assert (ids[neg_text] != ids).all()
    with pytest.raises(ValueError, match="no negative"):
        sample_hard_negatives(torch.randn(2, 2), ids=torch.tensor([1, 1]))


def test_vtm_mlm_uta_values():
    assert vtm_loss(torch.tensor([20.0]), torch.tensor([-20.0])) < 1e-6
    assert math.isclose(vtm_loss(torch.zeros(3), torch.zeros(3)).item(), math.log(2), rel_tol=1e-6)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    labels[0, 1] = 4
    assert torch.allclose(mlm_loss(logits, labels), F.cross_entropy(logits[0, 1:2], torch.tensor([4])))
    assert mlm_loss(logits, torch.full((2, 5), -100)).item() == 0.0
    x = torch.randn(2, 7, 8)
    assert uta_loss([x], [3 * x]).item() < 1e-6  # scale-invariant
    assert math.isclose(uta_loss([x], [-x]).item(), 4.0, rel_tol=1e-5)
    with pytest.raises(ValueError, match="as many"):
        uta_loss([x], [x, x])
