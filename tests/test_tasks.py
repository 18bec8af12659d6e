"""Task evaluations against fake models whose scores are set by hand, so every expected rank,
accuracy and re-ranking call is known in advance."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from leanvl.config import EvalConfig
from leanvl.engine.precision import autocast
from leanvl.models.base import TextFeatures, VideoFeatures, VideoLanguageModel
from leanvl.tasks.classify import (
    ClassificationHead,
    VideoClassifier,
    evaluate_classification,
    linear_probe,
    train_linear_probe,
    vit_layer_id,
)
from leanvl.tasks.mc import evaluate_mc
from leanvl.tasks.qa import QAHead, VideoQAClassifier, answer_vocabulary, evaluate_qa, qa_loss
from leanvl.tasks.retrieval import (
    encode_texts,
    evaluate_retrieval,
    paragraph_texts,
    reranked_scores,
    similarity_matrix,
)

FRAMES = (2, 3, 4, 4)  # T x 3 x H x W of the in-memory clips


class FakeText:
    """Tokeniser stand-in: each distinct string gets the next id (B x 2 ids, full mask)."""

    def __init__(self):
        self.strings: list[str] = []
        self.ids: dict[str, int] = {}
        self.seen: list[str] = []

    def __call__(self, texts):
        self.seen.extend(texts)
        ids = []
        for text in texts:
            if text not in self.ids:
                self.ids[text] = len(self.strings)
                self.strings.append(text)
            ids.append(self.ids[text])
        ids = torch.tensor(ids)[:, None].repeat(1, 2)
        return {"text_ids": ids, "text_mask": torch.ones_like(ids)}


class FakeModel(VideoLanguageModel):
    """Video i is a clip filled with the value i; scores come from Python functions of
    (video id, text string); every ``match`` pair is recorded."""

    def __init__(self, text: FakeText, sim_fn=None, match_fn=None, answers_fn=None):
        super().__init__()
        self.text, self.sim_fn, self.match_fn = text, sim_fn, match_fn
        self.weight = nn.Parameter(torch.zeros(1))
        self.calls: list[tuple[int, str]] = []

    @staticmethod
    def video_ids(video: VideoFeatures) -> list[int]:
        return video.embedding[:, 0].round().long().tolist()

    def strings(self, text: TextFeatures) -> list[str]:
        return [self.text.strings[i] for i in text.embedding[:, 0].round().long().tolist()]

    def encode_video(self, video):
        ids = video.flatten(1)[:, 0]
        return VideoFeatures(ids[:, None, None].expand(-1, 3, 4).clone(), ids[:, None].clone())

    def encode_text(self, text_ids, text_mask):
        ids = text_ids[:, 0].float()
        return TextFeatures(ids[:, None, None].expand(-1, 2, 4).clone(), text_mask, ids[:, None])

    def similarity(self, video, text):
        strings = self.strings(text)
        return torch.tensor([[float(self.sim_fn(v, s)) for s in strings]
                             for v in self.video_ids(video)])

    def match(self, video, text):
        pairs = list(zip(self.video_ids(video), self.strings(text)))
        self.calls.extend(pairs)
        return torch.tensor([float(self.match_fn(v, s)) for v, s in pairs])


class MemoryDataset(Dataset):
    """In-memory stand-in for the clip datasets: same records and sample keys."""

    def __init__(self, records, kind="retrieval"):
        self.records, self.kind = records, kind

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        sample = {"video": torch.full(FRAMES, float(record.get("id", index))), "index": index}
        if self.kind == "retrieval":
            captions = record["caption"]
            sample["caption"] = captions[0] if isinstance(captions, list) else captions
        elif self.kind == "mc":
            sample["options"], sample["answer"] = record["caption"], record["answer"]
        elif self.kind == "qa":
            sample["question"], sample["answer"] = record["question"], record["answer"]
        elif self.kind == "classification":
            sample["label"] = record["label"]
        return sample

    def texts(self):
        texts, owners = [], []
        for video, record in enumerate(self.records):
            captions = record["caption"]
            for caption in captions if isinstance(captions, list) else [captions]:
                texts.append(caption)
                owners.append(video)
        return texts, owners


# -- retrieval ---------------------------------------------------------------------------------

# Five videos, caption "t{i}" belongs to video i. Dual scores put each caption's video second,
# except caption t0 whose video is third (outside a top-2 re-ranking); VTM knows the truth.
DUAL = torch.zeros(5, 5)
for _i in range(5):
    DUAL[_i, (_i + 1) % 5], DUAL[_i, _i] = 1.0, 0.5
DUAL[0, 0], DUAL[0, 2] = 0.2, 0.4


def _retrieval_setup():
    text = FakeText()
    model = FakeModel(text, sim_fn=lambda v, s: DUAL[int(s[1:]), v],
                      match_fn=lambda v, s: 5.0 if int(s[1:]) == v else 0.0)
    dataset = MemoryDataset([{"caption": f"t{i}"} for i in range(5)])
    return model, dataset, text


def test_dual_and_reranked_metrics_differ_exactly_as_constructed():
    model, dataset, text = _retrieval_setup()
    result = evaluate_retrieval(model, dataset, text, EvalConfig(rerank_k=2), batch_size=2,
                                progress_bar=False, return_scores=True)
    assert result["num_videos"] == 5 and result["num_texts"] == 5
    # dual: t2v ranks [3, 2, 2, 2, 2]; v2t ranks [2, 2, 2, 2, 2]
    assert result["dual/t2v/R@1"] == 0.0 and result["dual/t2v/R@5"] == 100.0
    assert result["dual/t2v/MnR"] == pytest.approx(11 / 5) and result["dual/t2v/MdR"] == 2.0
    assert result["dual/v2t/R@1"] == 0.0 and result["dual/v2t/MdR"] == 2.0
    # re-ranked: every correct pair inside the top-2 moves to rank 1; t0's video stays third
    assert result["rerank/t2v/R@1"] == 80.0 and result["rerank/t2v/MnR"] == pytest.approx(7 / 5)
    assert result["rerank/v2t/R@1"] == 100.0 and result["rerank/v2t/MnR"] == 1.0
    scores = result["scores"]
    assert scores["dual"].shape == (5, 5) and scores["rerank_v2t"].shape == (5, 5)
    # outside the top-k the dual order is kept, below every re-scored candidate
    row = scores["rerank_t2v"][0]
    assert row[1] == row[2] == 0.0 and row[0] > row[3] == row[4] and row[0] < 0.0
    assert isinstance(result["seconds"], float)  # timings are reported, not checked


def test_reranking_only_scores_the_top_k_pairs():
    model, dataset, text = _retrieval_setup()
    evaluate_retrieval(model, dataset, text, EvalConfig(rerank_k=2), progress_bar=False)
    calls = [(v, int(s[1:])) for v, s in model.calls]
    expected_t2v = {(v, t) for t in range(5) for v in DUAL[t].topk(2).indices.tolist()}
    expected_v2t = {(v, t) for v in range(5) for t in DUAL[:, v].topk(2).indices.tolist()}
    assert len(calls) == 5 * 2 * 2
    assert set(calls[:10]) == expected_t2v and set(calls[10:]) == expected_v2t
    assert (0, 0) not in expected_t2v  # t0's video is never re-scored for t0


def test_rerank_off_and_k_above_the_candidate_count():
    model, dataset, text = _retrieval_setup()
    off = evaluate_retrieval(model, dataset, text, EvalConfig(rerank_k=0), progress_bar=False)
    assert not any(k.startswith("rerank/") for k in off) and model.calls == []
    everything = evaluate_retrieval(model, dataset, text, EvalConfig(rerank_k=128),
                                    progress_bar=False)
    assert everything["rerank/t2v/R@1"] == 100.0 and everything["rerank/v2t/R@1"] == 100.0
    assert len(model.calls) == 2 * 25
    assert everything["dual/t2v/R@1"] == off["dual/t2v/R@1"]


def test_reranked_scores_keep_the_dual_order_outside_the_top_k():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.3]])
    top = torch.tensor([[0, 2]])
    final = reranked_scores(scores, top, torch.tensor([[-7.0, 2.0]]))
    assert final[0, 0] == -7.0 and final[0, 2] == 2.0
    assert final[0, 3] == final[0, 4] < -7.0 and final[0, 1] < final[0, 3]


class EmbeddingModel(VideoLanguageModel):
    """The base contract's dot-product similarity over fixed random embeddings."""

    temperature = 0.5

    def __init__(self, num_videos=7, num_texts=11, dim=6):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.video_table = torch.randn(num_videos, dim, generator=generator)
        self.text_table = torch.randn(num_texts, dim, generator=generator)

    def encode_video(self, video):
        ids = video.flatten(1)[:, 0].long()
        return VideoFeatures(self.video_table[ids][:, None], self.video_table[ids])

    def encode_text(self, text_ids, text_mask):
        ids = text_ids[:, 0]
        return TextFeatures(self.text_table[ids][:, None], text_mask, self.text_table[ids])


def test_chunked_similarity_equals_unchunked():
    model = EmbeddingModel()
    video = model.encode_video(torch.arange(7).float()[:, None, None, None, None])
    text = model.encode_text(torch.arange(11)[:, None], torch.ones(11, 1, dtype=torch.long))
    direct = text.embedding @ video.embedding.t() / 0.5
    for chunk in (1, 3, 4, 100):
        torch.testing.assert_close(similarity_matrix(model, video, text, chunk), direct)
    dataset = MemoryDataset([{"caption": [f"c{i}a", f"c{i}b"]} for i in range(5)])
    small = evaluate_retrieval(model, dataset, FakeText(), EvalConfig(rerank_k=0, chunk_size=2),
                               progress_bar=False, return_scores=True)
    large = evaluate_retrieval(model, dataset, FakeText(), EvalConfig(rerank_k=0),
                               progress_bar=False, return_scores=True)
    torch.testing.assert_close(small["scores"]["dual"], large["scores"]["dual"])
    assert small["num_texts"] == 10 and small["dual/t2v/R@1"] == large["dual/t2v/R@1"]


def test_paragraph_mode_joins_all_captions_of_a_video():
    records = [{"caption": ["a man", "runs fast"]}, {"caption": "a dog"},
               {"caption": ["one", "two", "three"]}]
    dataset = MemoryDataset(records)
    assert paragraph_texts(dataset) == (["a man runs fast", "a dog", "one two three"], [0, 1, 2])
    text = FakeText()
    model = FakeModel(text, sim_fn=lambda v, s: float(text.ids[s] == v),
                      match_fn=lambda v, s: float(text.ids[s] == v))
    result = evaluate_retrieval(model, dataset, text, EvalConfig(paragraph=True, rerank_k=2),
                                progress_bar=False)
    assert text.seen[:3] == ["a man runs fast", "a dog", "one two three"]
    assert result["num_texts"] == 3 and result["paragraph"] is True
    assert result["dual/t2v/R@1"] == 100.0 and result["rerank/v2t/R@1"] == 100.0


class ClipOracle(VideoLanguageModel):
    """For the real mp4 dataset: a video's id is its nearest reference clip; a caption's id is
    the digit token in it. Dual scores prefer the *next* clip; VTM knows the truth."""

    def __init__(self, references: torch.Tensor, digit_ids: list[int]):
        super().__init__()
        self.references = references.flatten(1)
        self.digits = torch.tensor(digit_ids)

    def encode_video(self, video):
        ids = torch.cdist(video.flatten(1), self.references).argmin(dim=1).float()
        return VideoFeatures(ids[:, None, None], ids[:, None])

    def encode_text(self, text_ids, text_mask):
        hits = text_ids[:, :, None] == self.digits[None, None, :]
        ids = hits.any(dim=1).float().argmax(dim=1).float()
        return TextFeatures(ids[:, None, None], text_mask, ids[:, None])

    def similarity(self, video, text):
        v, t = video.embedding[:, :1], text.embedding[:, 0][None, :]
        return (v == (t + 1) % 6).float() + 0.5 * (v == t).float()

    def match(self, video, text):
        return 5.0 * (video.embedding[:, 0] == text.embedding[:, 0]).float()


def test_evaluate_retrieval_end_to_end_on_real_clips(clip_folder):
    from leanvl.data.datasets import VideoTextDataset
    from leanvl.data.text import TextEncoder

    root, anno = clip_folder
    dataset = VideoTextDataset(anno, root, num_frames=2, size=32, train=False, sampling="middle")
    text_encoder = TextEncoder(max_len=8)
    references = torch.stack([dataset[i]["video"] for i in range(len(dataset))])
    digits = text_encoder.tokenizer.convert_tokens_to_ids([str(i) for i in range(6)])
    model = ClipOracle(references, digits)
    result = evaluate_retrieval(model, dataset, text_encoder, EvalConfig(rerank_k=4),
                                batch_size=4, num_workers=0, progress_bar=False)
    assert result["num_videos"] == 6 and result["num_texts"] == 12
    # dual: each caption's clip is second (t2v); each clip's two captions sit behind the two
    # captions of the previous clip (v2t rank 3)
    assert result["dual/t2v/R@1"] == 0.0 and result["dual/t2v/MdR"] == 2.0
    assert result["dual/v2t/R@1"] == 0.0 and result["dual/v2t/MdR"] == 3.0
    assert result["dual/v2t/R@5"] == 100.0
    assert result["rerank/t2v/R@1"] == 100.0 and result["rerank/v2t/R@1"] == 100.0


def test_encode_texts_batches_in_order():
    text = FakeText()
    model = FakeModel(text)
    feats = encode_texts(model, [f"s{i}" for i in range(7)], text, batch_size=3,
                         progress_bar=False)
    assert model.strings(feats) == [f"s{i}" for i in range(7)]


# -- multiple choice ---------------------------------------------------------------------------

def test_mc_accuracy_overall_and_per_kind():
    records = [
        {"caption": ["right0", "x", "y"], "answer": 0, "kind": "static"},
        {"caption": ["x", "right1", "y"], "answer": 1, "kind": "static"},
        {"caption": ["x", "y", "right2"], "answer": 2, "kind": "temporal"},
        {"caption": ["wrong3", "y", "x"], "answer": 0, "kind": "temporal"},
    ]
    text = FakeText()
    # VTM: options starting with "right" match; "x" is the dual encoder's favourite
    model = FakeModel(text, sim_fn=lambda v, s: 3.0 if s == "x" else 0.0,
                      match_fn=lambda v, s: 4.0 if s.startswith("right") else -4.0)
    dataset = MemoryDataset(records, kind="mc")
    vtm = evaluate_mc(model, dataset, text, EvalConfig(mc_vtm_weight=1.0), batch_size=3,
                      progress_bar=False, return_predictions=True)
    assert vtm["accuracy"] == 75.0 and vtm["num_items"] == 4
    assert vtm["accuracy/static"] == 100.0 and vtm["accuracy/temporal"] == 50.0
    assert vtm["num_items/temporal"] == 2
    assert vtm["predictions"][:3] == [0, 1, 2]
    # item 3: every option scores the same under VTM -> a tie, counted as wrong
    assert len(set(vtm["scores"][3])) == 1
    dual = evaluate_mc(model, dataset, text, EvalConfig(mc_vtm_weight=0.0), progress_bar=False,
                       return_predictions=True)
    # the dual encoder always picks "x": right only where "x" is the answer (never here)
    assert dual["accuracy"] == 0.0 and dual["predictions"] == [1, 0, 0, 2]
    mixed = evaluate_mc(model, dataset, text, EvalConfig(mc_vtm_weight=0.7), progress_bar=False,
                        return_predictions=True)
    # 0.7*sigmoid(4) + 0.3*softmax(0 | 3, 0) beats 0.7*sigmoid(-4) + 0.3*softmax(3 | ...)
    assert mixed["predictions"][:3] == [0, 1, 2] and mixed["accuracy"] == 75.0
    s = mixed["scores"][0]
    sig, soft = torch.sigmoid(torch.tensor([4.0, -4.0, -4.0])), torch.tensor([0.0, 3, 0]).softmax(0)
    torch.testing.assert_close(torch.tensor(s), 0.7 * sig + 0.3 * soft)


def test_mc_items_with_fewer_options_share_a_batch():
    # a 2-option item beside 3-option ones: its padded option neither wins nor takes a share
    # of the dual softmax, and the scores equal those of items scored one at a time
    records = [
        {"caption": ["right0", "x", "y"], "answer": 0},
        {"caption": ["x", "right1"], "answer": 1},
        {"caption": ["y", "x", "right2"], "answer": 2},
    ]
    text = FakeText()
    model = FakeModel(text, sim_fn=lambda v, s: 3.0 if s == "x" else 0.0,
                      match_fn=lambda v, s: 4.0 if s.startswith("right") else -4.0)
    dataset = MemoryDataset(records, kind="mc")
    together, alone = (evaluate_mc(model, dataset, text, EvalConfig(mc_vtm_weight=0.7),
                                   batch_size=size, progress_bar=False, return_predictions=True)
                       for size in (3, 1))
    assert [len(row) for row in together["scores"]] == [3, 2, 3]
    for row, expected in zip(together["scores"], alone["scores"], strict=True):
        torch.testing.assert_close(torch.tensor(row), torch.tensor(expected))
    assert together["accuracy"] == 100.0 and together["predictions"] == [0, 1, 2]
    dual = evaluate_mc(model, dataset, text, EvalConfig(mc_vtm_weight=0.0), batch_size=3,
                       progress_bar=False, return_predictions=True)
    torch.testing.assert_close(torch.tensor(dual["scores"][1]),
                               torch.tensor([3.0, 0.0]).softmax(0))


# -- question answering ------------------------------------------------------------------------

QA_RECORDS = [
    {"question": "q0", "answer": "red"},
    {"question": "q1", "answer": "blue"},
    {"question": "q2", "answer": "purple"},  # not in the vocabulary: always wrong
    {"question": "q3", "answer": "green"},
    {"question": "q4", "answer": "red"},
]
ANSWERS = ["red", "blue", "green"]


class TableQAModel(FakeModel):
    """qa_logits from a per-question table."""

    def __init__(self, text, table):
        super().__init__(text)
        self.table = table

    def qa_logits(self, video, text):
        return torch.stack([self.table[s] for s in self.strings(text)])


def test_qa_classification_accuracy_counts_unknown_answers_as_wrong():
    text = FakeText()
    one_hot = torch.eye(3)
    table = {"q0": one_hot[0], "q1": one_hot[1], "q2": one_hot[0], "q3": one_hot[1],
             "q4": one_hot[0]}
    model = TableQAModel(text, table)
    dataset = MemoryDataset(QA_RECORDS, kind="qa")
    result = evaluate_qa(model, dataset, text, EvalConfig(qa_mode="classify"), answers=ANSWERS,
                         batch_size=2, progress_bar=False, return_predictions=True)
    assert result["accuracy"] == 60.0 and result["num_out_of_vocabulary"] == 1
    assert result["predictions"] == ["red", "blue", "red", "blue", "red"]
    assert answer_vocabulary(QA_RECORDS, size=2) == ["red", "blue"]
    with pytest.raises(ValueError, match="answer list"):
        evaluate_qa(model, dataset, text, progress_bar=False)


def test_qa_rank_mode_scores_question_answer_pairs_with_vtm():
    text = FakeText()
    truth = {r["question"]: r["answer"] for r in QA_RECORDS}
    truth["q3"] = "red"  # the model believes a wrong answer for q3
    model = FakeModel(text, sim_fn=lambda v, s: {"red": 2.0, "blue": 1.0}.get(s, 0.0),
                      match_fn=lambda v, s: 1.0 if s.split(" ", 1)[1] == truth[s.split()[0]]
                      else 0.0)
    dataset = MemoryDataset(QA_RECORDS, kind="qa")
    result = evaluate_qa(model, dataset, text, EvalConfig(qa_mode="rank", rerank_k=0),
                         answers=ANSWERS, progress_bar=False, return_predictions=True)
    assert result["predictions"] == ["red", "blue", "red", "red", "red"]
    assert result["accuracy"] == 60.0  # q0, q1, q4
    assert len(model.calls) == 5 * 3 and ("q1 blue" in {s for _, s in model.calls})
    model.calls.clear()
    # pre-filter to the 2 answers closest to the video: "green" is never scored
    top2 = evaluate_qa(model, dataset, text, EvalConfig(qa_mode="rank", rerank_k=2),
                       answers=ANSWERS, progress_bar=False)
    assert len(model.calls) == 5 * 2
    assert not any(s.endswith("green") for _, s in model.calls)
    assert top2["accuracy"] == 60.0


class HeadOnlyQAModel(VideoLanguageModel):
    """An answer head and nothing to rank answers with (no match, no answer_scores)."""

    def __init__(self, text, table):
        super().__init__()
        self.inner = TableQAModel(text, table)
        self.weight = nn.Parameter(torch.zeros(1))

    def encode_video(self, video):
        return self.inner.encode_video(video)

    def encode_text(self, text_ids, text_mask):
        return self.inner.encode_text(text_ids, text_mask)

    def qa_logits(self, video, text):
        return self.inner.qa_logits(video, text)


def test_qa_mode_auto_classifies_with_an_answer_head_and_ranks_without():
    text = FakeText()
    table = {f"q{i}": torch.eye(3)[i % 2] for i in range(5)}
    dataset = MemoryDataset(QA_RECORDS, kind="qa")
    assert EvalConfig().qa_mode == "auto"
    head = evaluate_qa(TableQAModel(text, table), dataset, text, EvalConfig(), answers=ANSWERS,
                       progress_bar=False)
    assert head["mode"] == "classify" and head["accuracy"] == 60.0
    ranker = FakeModel(text, sim_fn=lambda v, s: 0.0, match_fn=lambda v, s: 0.0)
    assert evaluate_qa(ranker, dataset, text, EvalConfig(rerank_k=0), answers=ANSWERS,
                       progress_bar=False)["mode"] == "rank"
    # an explicit mode wins over auto: the table model also matches, so it can rank
    both = TableQAModel(text, table)
    both.match_fn = lambda v, s: 0.0
    forced = evaluate_qa(both, dataset, text, EvalConfig(qa_mode="rank", rerank_k=0),
                         answers=ANSWERS, progress_bar=False)
    assert forced["mode"] == "rank" and len(both.calls) == 5 * 3
    with pytest.raises(TypeError, match="qa_mode=classify"):
        evaluate_qa(HeadOnlyQAModel(text, table), dataset, text,
                    EvalConfig(qa_mode="rank", rerank_k=0), answers=ANSWERS, progress_bar=False)
    with pytest.raises(TypeError, match="qa_mode=rank"):
        evaluate_qa(ranker, dataset, text, EvalConfig(qa_mode="classify"), answers=ANSWERS,
                    progress_bar=False)
    with pytest.raises(ValueError, match="qa_mode must be one of auto, classify, rank"):
        evaluate_qa(ranker, dataset, text, EvalConfig(qa_mode="generate"), answers=ANSWERS,
                    progress_bar=False)


class FusedModel(FakeModel):
    """fused_cls: a fixed random vector per question (separable by construction)."""

    fused_dim = 8

    def __init__(self, text):
        super().__init__(text)
        self.codes = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
        self.layers = nn.ModuleList([nn.Linear(1, 1)])

    def fused_cls(self, video, text):
        return self.codes[text.embedding[:, 0].long()] + 0 * self.layers[0].weight.sum()


def test_qa_classifier_trains_ignores_unknown_answers_and_evaluates():
    text = FakeText()
    model = VideoQAClassifier(FusedModel(text), num_answers=3)
    dataset = MemoryDataset(QA_RECORDS, kind="qa")
    tokens = text([r["question"] for r in QA_RECORDS])
    batch = {"video": torch.stack([dataset[i]["video"] for i in range(5)]), **tokens,
             "answer_index": torch.tensor([0, 1, -1, 2, 0])}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = model.losses(batch)["qa"]
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first
    result = evaluate_qa(model, dataset, text, answers=ANSWERS, progress_bar=False)
    assert result["accuracy"] == 80.0  # 4 answerable items right, "purple" wrong
    none = qa_loss(torch.randn(2, 3, requires_grad=True), torch.tensor([-1, -1]))
    assert none.item() == 0.0 and none.requires_grad
    assert model.layer_id("head.classifier.weight") == 1
    assert model.layer_id("model.layers.0.weight") == 1
    assert QAHead(8, 5)(torch.randn(3, 8)).shape == (3, 5)


# -- classification ----------------------------------------------------------------------------

def _blobs(centres, n_per_class, generator):
    labels = torch.arange(len(centres)).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), centres.shape[1], generator=generator), labels


def test_linear_probe_learns_a_separable_problem():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator) * 3
    train_x, train_y = _blobs(centres, 40, generator)
    test_x, test_y = _blobs(centres, 20, generator)
    probe = train_linear_probe(train_x * 100 + 50, train_y, 3, epochs=30)  # scale-free
    accuracy = (probe(test_x * 100 + 50).argmax(1) == test_y).float().mean()
    assert accuracy >= 0.95


class PixelBackbone(VideoLanguageModel):
    """Video tokens = the clip's pixels per frame (T tokens of 3*H*W)."""

    num_layers = 2
    video_dim = 48

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(48, 48), nn.Linear(48, 48)])
        self.patch_embed = nn.Linear(48, 48)

    def encode_video(self, video):
        tokens = video.flatten(2)
        return VideoFeatures(tokens, tokens.mean(1))


class BlobClips(Dataset):
    """Classification clips whose pixels are a class centre plus noise."""

    def __init__(self, n_per_class, seed):
        generator = torch.Generator().manual_seed(seed)
        centres = torch.randn(3, 48, generator=torch.Generator().manual_seed(99)) * 2
        self.labels = torch.arange(3).repeat_interleave(n_per_class)
        self.clips = centres[self.labels][:, None] + torch.randn(len(self.labels), 2, 48,
                                                                 generator=generator)
        self.records = [{"video": f"v{i // 2}", "label": int(c)} for i, c in
                        enumerate(self.labels)]
        self.classes = [0, 1, 2]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return {"video": self.clips[index].view(2, 3, 4, 4), "index": index,
                "label": int(self.labels[index])}


def test_linear_probe_end_to_end_on_frozen_features():
    test = BlobClips(10, 1)
    result = linear_probe(PixelBackbone(), BlobClips(20, 0), test, epochs=30,
                          progress_bar=False, return_predictions=True)
    assert result["top1"] >= 90.0 and result["top5"] == 100.0
    assert result["num_train"] == 60 and result["num_test"] == 30
    assert result["targets"] == test.labels.tolist()
    hits = sum(p == t for p, t in zip(result["predictions"], result["targets"], strict=True))
    assert 100 * hits / 30 == pytest.approx(result["top1"])
    assert "predictions" not in linear_probe(PixelBackbone(), BlobClips(20, 0), test, epochs=1,
                                             progress_bar=False)
    # inside a caller's bf16 autocast the probe still fits and predicts in float32 (bf16
    # logits of a freshly fitted probe tie, and argmax then names one class for every clip)
    with autocast("bf16", "cpu"):
        under = linear_probe(PixelBackbone(), BlobClips(20, 0), test, epochs=30,
                             progress_bar=False, return_predictions=True)
    assert under["top1"] >= 90.0 and len(set(under["predictions"])) == 3


def test_video_classifier_head_layer_ids_and_multi_view_evaluation():
    classifier = VideoClassifier(PixelBackbone(), num_classes=3, init_scale=0.001)
    assert classifier.head.head.weight.abs().max() < 0.01
    assert classifier.layer_id("model.patch_embed.weight") == 0
    assert classifier.layer_id("model.blocks.1.weight") == 2
    assert classifier.layer_id("head.head.weight") == 3
    assert vit_layer_id("encoder.blocks.11.attn.qkv.weight", 12) == 12
    assert vit_layer_id("norm.weight", 12) == 13
    data = BlobClips(10, 0)
    batch = {"video": torch.stack([data[i]["video"] for i in range(len(data))]),
             "label": data.labels}
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=0.05)
    for _ in range(40):
        loss = classifier.losses(batch)["classify"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    single = evaluate_classification(classifier, BlobClips(10, 1), progress_bar=False)
    grouped = evaluate_classification(classifier, BlobClips(10, 1), group_by="video",
                                      progress_bar=False, return_predictions=True)
    assert single["top1"] >= 90.0 and single["num_items"] == 30
    assert grouped["num_items"] == 15 and grouped["top1"] >= 90.0
    assert "predictions" not in single
    # one prediction per video when grouped, aligned with its label
    assert len(grouped["predictions"]) == len(grouped["targets"]) == 15
    hits = sum(p == t for p, t in zip(grouped["predictions"], grouped["targets"], strict=True))
    assert 100 * hits / 15 == pytest.approx(grouped["top1"])
    head = ClassificationHead(48, 3)
    tokens = torch.randn(2, 4, 48)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    torch.testing.assert_close(head(tokens, mask)[0], head(tokens[:1, :2].mean(1))[0])


def test_cat_features_pads_masked_text_to_common_length():
    from leanvl.tasks.common import cat_features

    a = TextFeatures(torch.ones(2, 3, 4), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 4))
    b = TextFeatures(torch.ones(1, 5, 4), torch.ones(1, 5, dtype=torch.long), torch.ones(1, 4))
    joined = cat_features([a, b])
    assert joined.tokens.shape == (3, 5, 4) and joined.mask.tolist()[0] == [1, 1, 1, 0, 0]
    assert joined.tokens[0, 3:].abs().sum() == 0
    with pytest.raises(ValueError, match="fixed number of tokens"):
        cat_features([VideoFeatures(torch.ones(1, 3, 4), torch.ones(1, 4)),
                      VideoFeatures(torch.ones(1, 5, 4), torch.ones(1, 4))])


def test_cat_features_pads_only_declared_fields_of_subclasses():
    from dataclasses import dataclass

    from leanvl.tasks.common import cat_features

    @dataclass
    class WithLatents(TextFeatures):
        latents: torch.Tensor | None = None

    # latents have as many rows as the first batch's text is long: not padded all the same
    a = WithLatents(torch.ones(2, 3, 4), torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 3, 4))
    b = WithLatents(torch.ones(1, 5, 4), torch.ones(1, 5), torch.ones(1, 4), torch.ones(1, 3, 4))
    joined = cat_features([a, b])
    assert joined.tokens.shape == (3, 5, 4) and joined.latents.shape == (3, 3, 4)
    assert type(joined.index(torch.tensor([2]))) is WithLatents


def test_similarity_is_scored_in_float32_under_bf16_autocast():
    # cosine / temperature values near 10 collapse to steps of 1/16 in bf16: ties everywhere
    model = FakeModel(FakeText())
    model.similarity = lambda v, t: v.embedding @ t.embedding.t() * 14.0
    video = VideoFeatures(torch.zeros(3, 1, 1), torch.tensor([[1.0], [0.999], [0.998]]))
    text = TextFeatures(torch.zeros(1, 1, 1), torch.ones(1, 1), torch.ones(1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = similarity_matrix(model, video, text)
    assert sim.dtype == torch.float32 and len(set(sim[0].tolist())) == 3


def test_embedding_ranking_beside_a_joint_score_is_float32_under_bf16_autocast():
    # a model whose similarity is not the dot product (e.g. mixed-stream Perceiver-VL) also gets
    # embed/ metrics; the three videos' cosines with the caption differ by less than bf16's
    # 1/256 steps near 1, so in bf16 they would tie and the pessimistic rule would miss
    from leanvl.tasks.retrieval import retrieval_from_features

    class JointScore(FakeModel):
        similarity_is_dot_product = False

    model = JointScore(FakeText())
    model.needs_rerank = False
    model.similarity = lambda v, t: torch.zeros(v.embedding.shape[0], t.embedding.shape[0])
    angles = torch.tensor([0.0, 0.02, 0.03])  # cosines 1.0, 0.9998, 0.99955
    video = VideoFeatures(torch.zeros(3, 1, 2), torch.stack([angles.cos(), angles.sin()], 1))
    text = TextFeatures(torch.zeros(1, 1, 2), torch.ones(1, 1), torch.tensor([[1.0, 0.0]]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = retrieval_from_features(model, video, text, [0], EvalConfig(rerank_k=0),
                                         progress_bar=False)
    assert result["embed/t2v/R@1"] == 100.0  # its own video has the largest cosine
    assert result["dual/t2v/R@1"] == 0.0  # the all-zero score ties, pessimistically a miss


def test_mc_dual_scores_are_float32_under_bf16_autocast():
    # the options' cosines x 14 differ by less than bf16's 1/16 steps near 14: in bf16 the
    # three would tie and the pessimistic rule would call the item wrong
    from leanvl.tasks.mc import option_scores

    model = FakeModel(FakeText())
    model.similarity = lambda v, t: v.embedding @ t.embedding.t() * 14.0
    angles = torch.tensor([0.03, 0.0, 0.02])  # option 1 is the video's own direction
    options = TextFeatures(torch.zeros(3, 1, 2), torch.ones(3, 1),
                           torch.stack([angles.cos(), angles.sin()], 1))
    video = VideoFeatures(torch.zeros(1, 1, 2), torch.tensor([[1.0, 0.0]]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = option_scores(model, video, options, num_options=3, vtm_weight=0.0)
    assert scores.dtype == torch.float32 and scores.argmax().item() == 1
    assert len(set(scores[0].tolist())) == 3


def test_models_whose_similarity_is_final_are_not_reranked():
    model, dataset, text = _retrieval_setup()
    model.needs_rerank = False
    result = evaluate_retrieval(model, dataset, text, EvalConfig(rerank_k=2), progress_bar=False)
    assert model.calls == [] and not any(k.startswith("rerank/") for k in result)
    assert "rerank_skipped" in result


def test_configure_threads_honours_data_cpu_threads(monkeypatch):
    from leanvl.tasks.build import configure_threads

    before = torch.get_num_threads()
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    try:
        configure_threads(num_workers=1)
        assert torch.get_num_threads() == 3  # automatic: one core left per loader worker
        configure_threads(num_workers=1, threads=2)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="data.cpu_threads"):
            configure_threads(num_workers=1, threads=-1)
    finally:
        torch.set_num_threads(before)


def test_streamed_test_sets_are_not_split_over_ranks(monkeypatch):
    from torch.utils.data import IterableDataset

    from leanvl.engine import distributed
    from leanvl.tasks.common import shard_dataset

    class Stream(IterableDataset):
        def __iter__(self):
            yield from ({"index": i} for i in range(4))

        def __len__(self):
            return 4

    stream = Stream()
    assert shard_dataset(stream) == (stream, slice(0, 4))  # one process: all of it
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="give data.test as an annotation file"):
        shard_dataset(stream)

