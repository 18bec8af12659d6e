import math

import pytest
import torch

from leanvl.metrics import (
    accuracy,
    mean_per_class_accuracy,
    rank_summary,
    retrieval_metrics,
    text_to_video_ranks,
    topk_accuracy,
    video_to_text_ranks,
)


def test_text_to_video_ranks_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.5],   # text 0 -> video 0: rank 1
                        [0.9, 0.1, 0.5],   # text 1 -> video 2: rank 2
                        [0.2, 0.3, 0.8]])  # text 2 -> video 1: rank 2
    ranks = text_to_video_ranks(sim, [0, 2, 1])
    assert ranks.tolist() == [1, 2, 2]
    metrics = retrieval_metrics(sim, [0, 2, 1], ks=(1, 2))
    assert metrics["t2v/R@1"] == pytest.approx(100 / 3)
    assert metrics["t2v/R@2"] == 100.0
    assert metrics["t2v/MdR"] == 2.0 and metrics["t2v/MnR"] == pytest.approx(5 / 3)


def test_ties_are_pessimistic():
    # the correct video ties with two others: it is ranked after both
    sim = torch.tensor([[0.5, 0.5, 0.5, 0.1]])
    assert text_to_video_ranks(sim, [1]).tolist() == [3]
    # all-equal scores: the worst rank, never a free R@1
    flat = torch.zeros(4, 4)
    assert text_to_video_ranks(flat, [0, 1, 2, 3]).tolist() == [4, 4, 4, 4]
    assert retrieval_metrics(flat, [0, 1, 2, 3])["t2v/R@1"] == 0.0
    # -inf candidates (never scored) tie among themselves but stay below scored ones
    sim = torch.tensor([[2.0, float("-inf"), float("-inf")]])
    assert text_to_video_ranks(sim, [0]).tolist() == [1]
    assert text_to_video_ranks(sim, [2]).tolist() == [3]


def test_video_to_text_uses_the_best_of_several_captions():
    # texts 0,1 belong to video 0; texts 2,3,4 to video 1; text 5 to video 2
    owners = [0, 0, 1, 1, 1, 2]
    sim = torch.tensor([
        # v0    v1    v2
        [0.1, 0.0, 0.0],  # t0
        [0.7, 0.0, 0.0],  # t1 (video 0's best caption)
        [0.9, 0.2, 0.3],  # t2 (wrong text above video 0's best)
        [0.0, 0.2, 0.3],  # t3 (ties video 1's other caption; correct texts never push down)
        [0.0, 0.1, 0.0],  # t4
        [0.8, 0.2, 0.3],  # t5 -> video 2; ties with t2, t3 for video 2's column
    ])
    v2t = video_to_text_ranks(sim.t(), owners)
    # video 0: best correct 0.7; wrong texts >= 0.7: t2 (0.9), t5 (0.8) -> rank 3
    # video 1: best correct 0.2 (t2/t3); wrong >= 0.2: t5 (0.2, a tie) -> rank 2
    # video 2: t5 scores 0.3; wrong texts >= 0.3: t2, t3 (ties) -> rank 3
    assert v2t.tolist() == [3, 2, 3]
    t2v = text_to_video_ranks(sim, owners)
    # t0: 0.1 vs 0,0 -> 1; t1 -> 1; t2 -> v1 0.2 < 0.9, 0.3 -> 3; t3: v1 0.2 < v2 0.3 -> 2;
    # t4: v1 0.1 -> 1; t5: v2 0.3 < v0 0.8 -> 2
    assert t2v.tolist() == [1, 1, 3, 2, 1, 2]
    metrics = retrieval_metrics(sim, owners, ks=(1, 5, 10))
    assert metrics["v2t/R@1"] == 0.0 and metrics["v2t/MdR"] == 3.0
    assert metrics["v2t/MnR"] == pytest.approx(8 / 3)
    assert metrics["t2v/R@1"] == 50.0 and metrics["t2v/MdR"] == 1.5  # even count: mean of middles
    assert metrics["mean_recall"] == pytest.approx((50 + 100 + 100 + 0 + 100 + 100) / 6)


def test_separate_video_to_text_scores_and_videos_without_captions():
    sim = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # video 2 has no caption
    other = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])  # videos x texts
    metrics = retrieval_metrics(sim, [0, 1], sim_video_text=other)
    assert metrics["t2v/R@1"] == 100.0
    assert metrics["v2t/R@1"] == 0.0 and metrics["v2t/MnR"] == 2.0  # only videos 0 and 1 count
    assert video_to_text_ranks(other, [0, 1]).tolist() == [2, 2, 0]
    with pytest.raises(ValueError, match="transpose"):
        retrieval_metrics(sim, [0, 1], sim_video_text=sim)
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(sim, [0, 3])
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((2, 3), float("nan")), [0, 1])
    assert math.isnan(rank_summary(torch.tensor([0, 0]))["R@1"])


def test_video_to_text_chunks_agree_with_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    sim = torch.randn(50, 20, generator=generator).round(decimals=1)  # plenty of ties
    owners = torch.randint(0, 20, (50,), generator=generator)
    ranks = video_to_text_ranks(sim.t(), owners)
    for video in range(20):
        correct = owners == video
        if not correct.any():
            assert ranks[video] == 0
            continue
        best = sim[correct, video].max()
        assert ranks[video] == 1 + int(((sim[:, video] >= best) & ~correct).sum())


def test_accuracy_and_per_class():
    logits = torch.tensor([[2.0, 1.0, 0.0],
                           [0.0, 3.0, 1.0],
                           [1.0, 1.0, 0.0],   # tie at the top with the true class 0: a miss
                           [0.0, 0.0, 5.0],
                           [0.0, 2.0, 1.0]])
    targets = torch.tensor([0, 1, 0, 2, 2])
    assert accuracy(logits, targets) == pytest.approx(60.0)
    assert accuracy(torch.tensor([0, 1, 0, 2, 1]), targets) == pytest.approx(80.0)
    # class 0: 1/2, class 1: 1/1, class 2: 1/2
    assert mean_per_class_accuracy(logits, targets) == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)
    # -1 targets (answers outside the vocabulary) are wrong, unless ignored
    with_unknown = torch.tensor([0, 1, -1, 2, -1])
    assert accuracy(logits, with_unknown) == pytest.approx(60.0)
    assert accuracy(logits, with_unknown, ignore_index=-1) == pytest.approx(100.0)
    assert accuracy(torch.tensor([0, -1]), torch.tensor([-1, -1])) == 0.0


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.5, 0.3, 0.9],    # target 2: rank 3
                           [0.4, 0.4, 0.1, 0.0],    # target 1: tied for top -> rank 2
                           [1.0, 0.0, 0.0, 0.0]])   # target 0: rank 1
    top = topk_accuracy(logits, torch.tensor([2, 1, 0]), ks=(1, 2, 3, 10))
    assert top == {1: pytest.approx(100 / 3), 2: pytest.approx(200 / 3), 3: 100.0, 10: 100.0}
    assert topk_accuracy(logits, torch.tensor([-1, 1, 0]), ks=(10,))[10] == pytest.approx(200 / 3)
