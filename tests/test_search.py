"""``leanvl index`` / ``leanvl search``: windows, corrupt files, re-indexing, parity with the
retrieval task's dual ranking, re-ranking, JSON output, contact sheets, non-dot-product models."""

import json
import sys
import types

import numpy as np
import pytest
import torch

from leanvl.cli import main
from leanvl.config import load_config
from leanvl.data.video import write_video
from leanvl.tasks import search as search_module
from leanvl.tasks.search import Searcher, VideoIndex, build_index, window_bounds
from tests.conftest import ramp_frames, truncated_faststart_mp4

SETTINGS = ["data.num_frames=2", "data.size=32", "data.max_text_len=16"]


def _release(folder, name, **kwargs):
    from leanvl.models.registry import create_model
    from leanvl.tasks.build import release

    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    release(model, folder, load_config(None, SETTINGS).data)
    return folder


@pytest.fixture(scope="module")
def umt_model(tmp_path_factory):
    return _release(tmp_path_factory.mktemp("umt") / "model", "umt_tiny", stage=2,
                    mask_type="random")


@pytest.fixture(scope="module")
def umt_loaded(umt_model):
    from leanvl.engine.checkpoint import load_pretrained

    return load_pretrained(umt_model)


def _clips(folder, count=4, frames=8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        write_video(folder / f"clip{i}.mp4", ramp_frames(frames, offset=i * 40), fps=8)
    return folder


def _index(source, model_path, out, **kwargs):
    kwargs.setdefault("num_workers", 0)
    kwargs.setdefault("threads", 1)  # the suite runs on one thread (conftest)
    return build_index(source, model_path, out, progress=False, **kwargs)


def test_window_bounds_cover_the_video_and_end_at_its_end():
    assert window_bounds(3.0, 10.0, 10.0) == [(0.0, 3.0)]
    assert window_bounds(5.0, 2.0, 1.5) == [(0.0, 2.0), (1.5, 3.5), (3.0, 5.0)]
    assert window_bounds(5.0, 2.0, 2.0) == [(0.0, 2.0), (2.0, 4.0), (3.0, 5.0)]


def test_corrupt_files_are_skipped_counted_and_named(tmp_path, umt_model, umt_loaded, capsys):
    videos = _clips(tmp_path / "videos", 3)
    data = (videos / "clip0.mp4").read_bytes()
    (videos / "sub").mkdir()
    (videos / "sub" / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (videos / "empty.mp4").write_bytes(b"")
    (videos / "notes.txt").write_text("not a video")  # not a video extension: not listed
    assert main(["index", str(videos), "--model", str(umt_model), "--out",
                 str(tmp_path / "index"), "--quiet", "--workers", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 files, 3 windows" in out and "skipped 2 corrupt files" in out
    lines = out.splitlines()
    assert any("empty.mp4: empty file" in line for line in lines)
    assert any("truncated.mp4: undecodable" in line for line in lines)
    index = VideoIndex(tmp_path / "index")
    assert sorted(f["path"].rsplit("/", 1)[1] for f in index.files) == \
        ["clip0.mp4", "clip1.mp4", "clip2.mp4"]
    # a re-run does not retry them while they are unchanged, and still names them
    report = _index(videos, umt_model, tmp_path / "index", model=umt_loaded)
    assert report.encoded_files == 0 and len(report.skipped) == 2


def test_truncated_file_with_its_header_up_front_is_skipped(tmp_path, umt_model, umt_loaded):
    videos = tmp_path / "videos"
    _clips(videos, 2)
    truncated_faststart_mp4(videos / "cut.mp4", size=32, frames=24)
    report = _index(videos, umt_model, tmp_path / "index", model=umt_loaded)
    assert report.files == 2
    assert [(p.where.rsplit("/", 1)[1], p.kind) for p in report.skipped] == \
        [("cut.mp4", "truncated")]


def test_reindexing_encodes_only_new_or_changed_files_and_drops_deleted(tmp_path, umt_model,
                                                                        umt_loaded,
                                                                        monkeypatch):
    from leanvl.models.umt import UMT

    videos = _clips(tmp_path / "videos", 3)
    first = _index(videos, umt_model, tmp_path / "index", model=umt_loaded)
    assert (first.encoded_files, first.windows) == (3, 3)
    before = VideoIndex(tmp_path / "index")
    kept = before.tensors["embedding"][[f["path"].endswith("clip1.mp4")
                                        for f in before.files].index(True)]
    encoded = []
    original = UMT.encode_video
    monkeypatch.setattr(UMT, "encode_video",
                        lambda self, video: encoded.append(video.shape[0]) or original(self, video))
    write_video(videos / "new.mp4", ramp_frames(8, offset=200), fps=8)
    report = _index(videos, umt_model, tmp_path / "index", model=umt_loaded)
    assert sum(encoded) == 1 and report.encoded_files == 1 and report.kept_files == 3
    # a changed file (same name, other frames) and a deleted one
    encoded.clear()
    write_video(videos / "clip0.mp4", ramp_frames(8, offset=120), fps=8)
    (videos / "clip2.mp4").unlink()
    report = _index(videos, umt_model, tmp_path / "index", model=umt_loaded)
    assert sum(encoded) == 1 and (report.encoded_files, report.dropped_files) == (1, 1)
    after = VideoIndex(tmp_path / "index")
    names = [f["path"].rsplit("/", 1)[1] for f in after.files]
    assert names == ["clip0.mp4", "clip1.mp4", "new.mp4"] and len(after) == 3
    assert torch.equal(after.tensors["embedding"][names.index("clip1.mp4")], kept)
    assert len(list((tmp_path / "index").glob("vectors-*.safetensors"))) == 1
    # other settings are refused rather than mixed in
    with pytest.raises(ValueError, match="--rebuild"):
        _index(videos, umt_model, tmp_path / "index", model=umt_loaded, window=2.0)


def test_long_videos_are_windows_with_their_start_and_end(tmp_path, umt_model, umt_loaded):
    from leanvl.data.datasets import ClipReader
    from leanvl.data.transforms import ClipTransform, resolve_normalization

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "long.mp4", ramp_frames(40, offset=0), fps=8)  # 5 s
    write_video(videos / "short.mp4", ramp_frames(8, offset=60), fps=8)  # 1 s: one clip
    _index(videos, umt_model, tmp_path / "index", model=umt_loaded, window=2.0, stride=1.5,
           dtype="float32")
    index = VideoIndex(tmp_path / "index")
    spans = [(index.window(r).path.rsplit("/", 1)[1], index.window(r).start, index.window(r).end)
             for r in range(len(index))]
    assert spans == [("long.mp4", 0.0, 2.0), ("long.mp4", 1.5, 3.5), ("long.mp4", 3.0, 5.0),
                     ("short.mp4", 0.0, 1.0)]
    # the middle window's embedding is that of the clip read from 1.5 s to 3.5 s
    model = umt_loaded
    mean, std = resolve_normalization("clip", None, None)
    reader = ClipReader(None, 2, "middle", ClipTransform(32, False, mean, std))
    clip = reader({"video": str(videos / "long.mp4"), "start": 1.5, "end": 3.5},
                  np.random.default_rng(0))
    with torch.no_grad():
        expected = model.encode_video(clip[None]).embedding[0]
    torch.testing.assert_close(index.tensors["embedding"][1], expected, atol=1e-5, rtol=0)


def test_search_ranks_as_the_retrieval_tasks_dual_encoder(clip_folder, tmp_path, umt_model,
                                                          umt_loaded):
    from leanvl.data.datasets import VideoTextDataset
    from leanvl.tasks.build import build_text_encoder
    from leanvl.tasks.retrieval import evaluate_retrieval

    root, annotations = clip_folder
    _index(annotations, umt_model, tmp_path / "index", model=umt_loaded, dtype="float32")
    model = umt_loaded
    data = load_config(None, SETTINGS).data
    dataset = VideoTextDataset(annotations, root, num_frames=2, sampling="middle", size=32,
                               train=False)
    texts, _ = dataset.texts()
    result = evaluate_retrieval(model, dataset, build_text_encoder(data, model),
                                progress_bar=False, return_scores=True)
    expected = result["scores"]["dual"].topk(4, dim=1).indices
    hits = Searcher(tmp_path / "index", model=model).search(texts, k=4)
    paths = [str((root / r["video"]).resolve()) for r in dataset.records]
    for query, row in zip(hits, expected):
        assert [h.path for h in query] == [paths[int(i)] for i in row]
    scores = [h.score for h in hits[0]]
    assert scores == sorted(scores, reverse=True)


def test_search_json_rerank_and_sheet(clip_folder, tmp_path, umt_model, umt_loaded, capsys):

    root, annotations = clip_folder
    _index(annotations, umt_model, tmp_path / "index", model=umt_loaded)
    assert main(["search", str(tmp_path / "index"), "clip number 2", "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    hits = result["results"][0]["hits"]
    assert result["results"][0]["query"] == "clip number 2" and len(hits) == 3
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(h["match"] is None and h["score"] == h["similarity"] for h in hits)
    assert all(h["path"].endswith(".mp4") and h["end"] == 1.0 for h in hits)

    # re-ranking: the top 3 by similarity, ordered by the matching head's logit, computed here
    searcher = Searcher(tmp_path / "index", model=umt_loaded)
    plain = searcher.search(["clip number 2"], k=6)[0]
    reranked = searcher.search(["clip number 2"], k=6, rerank=3)[0]
    model = umt_loaded
    text = searcher.encode_queries(["clip number 2"])
    reader = search_module._clip_reader(load_config(None, SETTINGS).data)
    with torch.no_grad():
        clips = torch.stack([search_module.read_window(reader, searcher.index.window(h.row))
                             for h in plain[:3]])
        logits = model.match(model.encode_video(clips), text.index([0, 0, 0]))
    order = sorted(range(3), key=lambda j: -float(logits[j]))
    assert [h.row for h in reranked[:3]] == [plain[j].row for j in order]
    torch.testing.assert_close(torch.tensor([h.match for h in reranked[:3]]),
                               logits[order].float(), atol=1e-4, rtol=0)
    assert [h.row for h in reranked[3:]] == [h.row for h in plain[3:]]
    assert all(h.match is None for h in reranked[3:])

    # the contact sheet: one panel per hit
    sheet = tmp_path / "hits.png"
    assert main(["search", str(tmp_path / "index"), "clip", "-k", "2", "--rerank", "2",
                 "--sheet", str(sheet)]) == 0
    out = capsys.readouterr().out
    assert "query: clip" in out and out.count(".mp4") == 2
    import matplotlib.image

    image = matplotlib.image.imread(sheet)
    assert image.ndim == 3 and image.shape[1] > image.shape[0]  # two panels side by side


def test_faiss_backend_gives_the_torch_ranking(clip_folder, tmp_path, umt_model,
                                                             umt_loaded,
                                                             monkeypatch):
    root, annotations = clip_folder
    _index(annotations, umt_model, tmp_path / "index", model=umt_loaded)

    class FlatIP:  # faiss.IndexFlatIP's interface
        def __init__(self, dim):
            self.rows = np.zeros((0, dim), np.float32)

        def add(self, rows):
            self.rows = np.concatenate([self.rows, rows])

        def search(self, queries, k):
            scores = queries @ self.rows.T
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(scores, order, 1), order

    if search_module._faiss() is None:  # faiss is optional: its interface, as numpy
        monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=FlatIP))
    searcher = Searcher(tmp_path / "index", model=umt_loaded)
    with_faiss = searcher.search(["video 3", "clip number 1"], k=4, backend="faiss")
    plain = searcher.search(["video 3", "clip number 1"], k=4, backend="torch")
    assert [[h.row for h in q] for q in with_faiss] == [[h.row for h in q] for q in plain]


def test_a_model_whose_score_is_not_a_dot_product_keeps_its_features(clip_folder, tmp_path):
    """Perceiver-VL's mixed stream scores every pair with its decoder: the index stores its
    video features and search scores with model.similarity, as retrieval evaluation does."""
    from leanvl.engine.checkpoint import load_pretrained
    from leanvl.tasks.build import build_text_encoder
    from leanvl.tasks.retrieval import encode_texts, similarity_matrix

    root, annotations = clip_folder
    model_path = _release(tmp_path / "pvl", "perceiver_vl_tiny", image_size=32, max_frames=2)
    report = _index(annotations, model_path, tmp_path / "index", dtype="float32")
    index = VideoIndex(tmp_path / "index")
    assert index.meta["mode"] == "features" and report.windows == 6
    model = load_pretrained(model_path)
    queries = ["clip number 4", "video 0", "a red square"]
    text = encode_texts(model, queries, build_text_encoder(load_config(None, SETTINGS).data,
                                                           model), progress_bar=False)
    expected = similarity_matrix(model, index.video_features(), text).topk(6, dim=1)
    hits = Searcher(index, model=model).search(queries, k=6)
    assert [[h.row for h in q] for q in hits] == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor([[h.score for h in q] for q in hits]),
                               expected.values, atol=1e-5, rtol=0)
    assert not model.similarity_is_dot_product


def test_an_interrupted_run_keeps_the_files_it_finished(tmp_path, umt_model, umt_loaded,
                                                        monkeypatch):
    from leanvl.models.umt import UMT

    videos = _clips(tmp_path / "videos", 3)
    calls = []
    original = UMT.encode_video

    def stop_at_the_second_batch(self, video):
        calls.append(video.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, video)

    monkeypatch.setattr(UMT, "encode_video", stop_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt, match="interrupted"):
        _index(videos, umt_model, tmp_path / "index", model=umt_loaded, batch_size=1)
    assert [f["path"].rsplit("/", 1)[1] for f in VideoIndex(tmp_path / "index").files] == \
        ["clip0.mp4"]
    monkeypatch.setattr(UMT, "encode_video", original)
    report = _index(videos, umt_model, tmp_path / "index", model=umt_loaded)
    assert (report.kept_files, report.encoded_files, report.windows) == (1, 2, 3)
