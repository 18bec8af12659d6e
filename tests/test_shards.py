import json

import numpy as np
import torch

from leanvl.data.annotations import load_annotations
from leanvl.data.datasets import Collator, VideoTextDataset, make_loader
from leanvl.data.shards import ShardDataset, shard_urls, write_shards

SMALL = dict(num_frames=4, size=32, sampling="middle", train=False)


def test_round_trip_frames_and_captions_equal_file_reads(clip_folder, tmp_path):
    root, anno = clip_folder
    index = write_shards(anno, root, tmp_path / "shards", max_count=4, progress=False)
    assert index["samples"] == 6 and [s["samples"] for s in index["shards"]] == [4, 2]
    files = VideoTextDataset(anno, root, **SMALL)
    stream = ShardDataset(tmp_path / "shards", resampled=False, **SMALL)
    assert len(stream) == 6
    samples = {s["index"]: s for s in stream}
    assert sorted(samples) == list(range(6))
    for i in range(6):
        assert torch.equal(samples[i]["video"], files[i]["video"])
        assert samples[i]["caption"] == files[i]["caption"]


def test_split_by_worker_covers_each_sample_once(clip_folder, tmp_path):
    root, anno = clip_folder
    write_shards(anno, root, tmp_path / "s", max_count=2, progress=False)  # 3 shards
    stream = ShardDataset(tmp_path / "s", resampled=False, **SMALL)
    loader = make_loader(stream, 1, Collator(None), train=False, num_workers=2)
    seen = [int(batch["index"]) for batch in loader]
    assert sorted(seen) == list(range(6))


def test_resampled_stream_draws_epoch_length_with_replacement(clip_folder, tmp_path):
    root, anno = clip_folder
    write_shards(anno, root, tmp_path / "s", max_count=2, progress=False)
    stream = ShardDataset(tmp_path / "s", num_frames=2, size=32, train=True, shuffle=4, seed=1)
    first = [s["index"] for s in stream]
    assert len(first) == 6 and set(first) <= set(range(6))
    assert [s["index"] for s in stream] == first  # same seed and epoch: same draw
    stream.set_epoch(1)
    assert [s["index"] for s in stream] != first


def test_missing_media_skipped_when_sharding_and_corrupt_media_skipped_when_reading(clip_folder, tmp_path):
    root, anno = clip_folder
    records = load_annotations(anno)
    (root / "bad.mp4").write_bytes(b"junk" * 100)
    records += [{"video": "gone.mp4", "caption": "x"}, {"video": "bad.mp4", "caption": "y"}]
    path = root / "more.json"
    path.write_text(json.dumps(records))
    index = write_shards(path, root, tmp_path / "s", progress=False)
    assert index["samples"] == 7 and index["missing"] == [str(root / "gone.mp4")]
    samples = list(ShardDataset(tmp_path / "s", resampled=False, **SMALL))
    assert len(samples) == 6
    skipped = [name for s in samples for name in s["skipped"]]
    assert len(skipped) == 1 and "000000007" in skipped[0]
    assert all(np.isfinite(s["video"].numpy()).all() for s in samples)
    assert shard_urls(str(tmp_path / "s" / "shard-{000000..000000}.tar")) == [
        str(tmp_path / "s" / "shard-000000.tar")]
