import numpy as np
import pytest
import torch

from leanvl.config import DataConfig
from leanvl.data.annotations import AnnotationError, write_annotations
from leanvl.data.datasets import (
    BadSampleTracker,
    ClassificationDataset,
    Collator,
    ImageTextDataset,
    LengthGroupedBatchSampler,
    MixedLoader,
    MultipleChoiceDataset,
    TooManyBadSamples,
    VideoQADataset,
    VideoTextDataset,
    build_dataset,
    make_loader,
)
from leanvl.data.text import TextEncoder
from leanvl.data.video import VideoDecodeError

SMALL = dict(num_frames=4, size=32)


@pytest.fixture(scope="module")
def text():
    return TextEncoder(max_len=12, pad_to_max=True)


def test_video_text_training_samples_vary_and_eval_is_fixed(clip_folder):
    root, anno = clip_folder
    train = VideoTextDataset(anno, root, train=True, **SMALL)
    sample = train[2]
    assert sample["video"].shape == (4, 3, 32, 32) and sample["video"].dtype == torch.float32
    assert sample["caption"] in ("clip number 2", "video 2") and sample["skipped"] == []
    captions = set()
    for epoch in range(12):
        train.set_epoch(epoch)
        captions.add(train[2]["caption"])
    assert captions == {"clip number 2", "video 2"}
    evaluation = VideoTextDataset(anno, root, train=False, sampling="middle", **SMALL)
    assert torch.equal(evaluation[1]["video"], evaluation[1]["video"])
    assert evaluation[1]["caption"] == "clip number 1"
    texts, owners = evaluation.texts()
    assert len(texts) == 12 and owners[:4] == [0, 0, 1, 1]


def test_frames_come_in_temporal_order(clip_folder):
    root, anno = clip_folder
    dataset = VideoTextDataset(anno, root, train=False, sampling="middle", normalization="custom",
                               mean=(0, 0, 0), std=(1, 1, 1), **SMALL)
    brightness = dataset[0]["video"][:, 1, 24:, 24:].mean(dim=(1, 2))  # ramp region, frames 1,3,5,7
    assert torch.all(brightness[1:] > brightness[:-1])


def _corrupt_folder(root, anno_records):
    (root / "broken.mp4").write_bytes(b"\x00" * 500)
    records = anno_records + [{"video": "broken.mp4", "caption": "broken"}]
    return write_annotations(records, root / "with_bad.jsonl")


def test_corrupt_clip_is_skipped_counted_and_never_blank(clip_folder, text):
    root, anno = clip_folder
    from leanvl.data.annotations import load_annotations

    path = _corrupt_folder(root, load_annotations(anno))
    dataset = VideoTextDataset(path, root, train=True, **SMALL)
    sample = dataset[6]
    assert len(sample["skipped"]) == 1 and "broken.mp4" in sample["skipped"][0]
    assert sample["video"].abs().sum() > 0 and sample["index"] != 6
    # two worker processes: skip reports reach the main process inside the batch
    loader = make_loader(dataset, 7, Collator(text), train=False, num_workers=2)
    tracker = BadSampleTracker(max_fraction=0.2, dataset_size=len(dataset))
    for batch in loader:
        tracker.update(batch)
    assert tracker.num_bad == 1 and tracker.seen == 8
    with pytest.raises(TooManyBadSamples, match="max_bad_fraction=0.1"):
        BadSampleTracker(max_fraction=0.1, dataset_size=len(dataset)).update(
            {"index": torch.arange(7), "skipped": sample["skipped"]})
    # evaluation never substitutes a test item
    evaluation = VideoTextDataset(path, root, train=False, **SMALL)
    with pytest.raises(VideoDecodeError, match="broken.mp4.*record 6"):
        evaluation[6]


def test_stream_tracker_waits_for_min_seen():
    tracker = BadSampleTracker(max_fraction=0.01, min_seen=1000)
    tracker.update({"index": torch.arange(8), "skipped": ["a.mp4: bad"]})  # 1 of 1000: fine
    with pytest.raises(TooManyBadSamples):
        for i in range(20):
            tracker.update({"index": torch.arange(8), "skipped": [f"b{i}.mp4: bad"]})


def test_qa_mc_classification_batches(clip_folder, text):
    root, _ = clip_folder
    qa = write_annotations([{"video": f"clip{i}.mp4", "question": f"what is clip {i}?",
                             "answer": ["yes", "no", "maybe"][i % 3]} for i in range(4)], root / "qa.json")
    dataset = VideoQADataset(qa, root, answers=["no", "yes"], train=False, **SMALL)
    batch = Collator(text)([dataset[i] for i in range(4)])
    assert batch["answer_index"].tolist() == [1, 0, -1, 1]
    assert batch["text_ids"].shape == (4, 12) and batch["answer"][2] == "maybe"

    mc = write_annotations([{"video": f"clip{i}.mp4", "caption": [f"o{j}" for j in range(5)],
                             "answer": i} for i in range(3)], root / "mc.json")
    batch = Collator(text)([MultipleChoiceDataset(mc, root, train=False, **SMALL)[i] for i in range(3)])
    assert batch["option_ids"].shape == (3, 5, 12) and batch["answer"].tolist() == [0, 1, 2]
    assert torch.equal(batch["option_ids"][0, 3], text(["o3"])["text_ids"][0])
    assert batch["option_count"].tolist() == [5, 5, 5]
    # an item with fewer options is padded with empty ones up to the batch's most
    short = write_annotations([{"video": "clip0.mp4", "caption": ["a", "b"], "answer": 1}],
                              root / "short.json")
    items = [MultipleChoiceDataset(mc, root, train=False, **SMALL)[0],
             MultipleChoiceDataset(short, root, train=False, **SMALL)[0]]
    batch = Collator(text)(items)
    assert batch["option_ids"].shape == (2, 5, 12) and batch["option_count"].tolist() == [5, 2]
    assert batch["options"][1] == ["a", "b"]
    assert torch.equal(batch["option_ids"][1, 2], text([""])["text_ids"][0])

    cls = write_annotations([{"video": f"clip{i}.mp4", "label": ["walk", "run"][i % 2]}
                             for i in range(4)], root / "cls.json")
    dataset = ClassificationDataset(cls, root, train=False, **SMALL)
    assert dataset.classes == ["run", "walk"]
    assert Collator(text)([dataset[i] for i in range(4)])["label"].tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError, match="label 'run' is not among"):
        ClassificationDataset(cls, root, classes=["walk"], train=False, **SMALL)[1]


def test_negative_captions_are_drawn_in_training_and_batched_with_their_owner(clip_folder,
                                                                            text):
    root, _ = clip_folder
    anno = write_annotations(
        [{"video": f"clip{i}.mp4", "caption": f"clip {i} rises",
          **({"negative_caption": [f"clip {i} sinks", f"clip {i} falls"]} if i % 2 else {})}
         for i in range(4)], root / "negatives.json")
    train = VideoTextDataset(anno, root, train=True, **SMALL)
    assert train[0]["negative_caption"] is None
    drawn = set()
    for epoch in range(10):
        train.set_epoch(epoch)
        drawn.add(train[1]["negative_caption"])
    assert drawn == {"clip 1 sinks", "clip 1 falls"}
    batch = Collator(text)([train[i] for i in range(4)])
    assert batch["negative_owner"].tolist() == [1, 3]
    assert batch["negative_text_ids"].shape == (2, 12)
    assert torch.equal(batch["negative_text_ids"][1],
                       text([batch["negative_caption"][1]])["text_ids"][0])
    assert batch["negative_caption"][1].startswith("clip 3")
    # evaluation never sees them; batches without any have no negative keys
    assert "negative_caption" not in VideoTextDataset(anno, root, train=False, **SMALL)[1]
    assert "negative_owner" not in Collator(text)([train[0], train[2]])


def test_reversal_flags_are_batched_in_training_only(clip_folder, text):
    root, _ = clip_folder
    anno = write_annotations([{"video": f"clip{i}.mp4", "caption": f"clip {i} rises",
                               "reversal_negative": i in (1, 2)} for i in range(4)],
                             root / "reversal.json")
    train = VideoTextDataset(anno, root, train=True, **SMALL)
    assert [train[i]["reversal_negative"] for i in range(4)] == [False, True, True, False]
    assert Collator(text)([train[i] for i in range(4)])["reversal_negative"].tolist() == \
        [False, True, True, False]
    assert "reversal_negative" not in Collator(text)([train[0], train[3]])
    assert "reversal_negative" not in VideoTextDataset(anno, root, train=False, **SMALL)[1]
    with pytest.raises(AnnotationError, match="record 0: field 'reversal_negative': must be "
                                              "true or false"):
        write_annotations([{"video": "clip0.mp4", "caption": "c", "reversal_negative": "yes"}],
                          root / "bad.json")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_images_are_one_frame_videos_and_mix_with_video_batches(clip_folder, text):
    from torchvision.io import write_png

    root, anno = clip_folder
    for i in range(4):
        write_png(torch.full((3, 24, 24), 40 * i, dtype=torch.uint8), str(root / f"im{i}.png"))
    images = write_annotations([{"image": f"im{i}.png", "caption": f"image {i}"} for i in range(4)],
                               root / "images.json")
    image_set = ImageTextDataset(images, root, train=True, **SMALL)
    assert image_set[0]["video"].shape == (1, 3, 32, 32)
    collate = Collator(text)
    loaders = {"video": make_loader(VideoTextDataset(anno, root, **SMALL), 2, collate, train=True),
               "image": make_loader(image_set, 2, collate, train=True)}
    mixed = MixedLoader(loaders, seed=0)
    sources = [(batch["source"], batch["video"].shape[1]) for batch in mixed]
    assert sorted(sources) == [("image", 1)] * 2 + [("video", 4)] * 3
    assert len(mixed) == 5
    schedules = []
    for epoch in range(6):
        mixed.set_epoch(epoch)
        schedules.append(tuple(mixed.schedule()))
        assert sorted(schedules[-1]) == ["image"] * 2 + ["video"] * 3
    assert len(set(schedules)) > 1  # reshuffled across epochs (seeded, so deterministic)
    mixed.set_epoch(0)
    assert tuple(mixed.schedule()) == schedules[0]
    weighted = MixedLoader(loaders, ratios={"video": 3, "image": 1})
    assert weighted.sizes == {"video": 4, "image": 1}


def test_build_dataset_from_config(clip_folder):
    root, anno = clip_folder
    cfg = DataConfig(num_frames=2, size=32, test_sampling="uniform")
    dataset = build_dataset(anno, str(root), cfg, train=False)
    assert isinstance(dataset, VideoTextDataset) and dataset[0]["video"].shape == (2, 3, 32, 32)
    np.testing.assert_equal(dataset.reader.sampling, "uniform")


def _grouped_epoch(lengths, batch_size, epoch, **kwargs):
    sampler = LengthGroupedBatchSampler(lengths, batch_size, seed=3, **kwargs)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_length_grouped_batches_cover_the_data_once_with_alike_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=203).astype(float)
    batches = _grouped_epoch(lengths, 8, epoch=0, group=4)
    assert len(batches) == 203 // 8 == len(LengthGroupedBatchSampler(lengths, 8))
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 25 * 8  # every record at most once, 3 dropped
    assert all(len(b) == 8 for b in batches)
    # each batch spans a small part of the length range; random batches span most of it
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    random_spread = np.mean([np.ptp(lengths[rng.permutation(203)[:8]]) for _ in range(200)])
    assert spread < 0.4 * random_spread
    # the order is a function of (seed, epoch): same epoch, same batches; next epoch, new ones
    assert batches == _grouped_epoch(lengths, 8, epoch=0, group=4)
    assert batches != _grouped_epoch(lengths, 8, epoch=1, group=4)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        LengthGroupedBatchSampler(lengths[:5], 8)


def test_length_grouped_batches_split_global_batches_across_ranks():
    lengths = np.arange(100, dtype=float)[::-1]
    single = _grouped_epoch(lengths, 8, epoch=2)
    ranks = [_grouped_epoch(lengths, 4, epoch=2, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for whole, first, second in zip(single, *ranks):
        assert first + second == whole  # rank r holds the r-th half of the global batch


def test_group_by_length_loader_and_text_lengths(clip_folder, text):
    root, anno = clip_folder
    videos = VideoTextDataset(anno, root, **SMALL)
    assert videos.text_lengths() == [2.5] * 6  # mean of 'clip number 0' and 'video 0'
    loader = make_loader(videos, 2, Collator(text), train=True, group_by_length=True)
    assert isinstance(loader.batch_sampler, LengthGroupedBatchSampler) and len(loader) == 3
    assert sorted(i for b in loader for i in b["index"].tolist()) == list(range(6))
    with pytest.raises(ValueError, match="training loaders"):
        make_loader(videos, 2, Collator(text), train=False, group_by_length=True)
    labels = ClassificationDataset([{"video": "clip0.mp4", "label": "a"}] * 2, root, **SMALL)
    with pytest.raises(ValueError, match="no text to group batches by"):
        make_loader(labels, 2, Collator(text), train=True, group_by_length=True)
