import io

import numpy as np
import pytest

from leanvl.data.video import (
    PyAVReader,
    VideoDecodeError,
    read_all_frames,
    read_frames,
    read_image,
    sample_frame_indices,
    write_video,
)
from tests.conftest import ramp_frames


@pytest.fixture(scope="module")
def full_decodes(bikes_path, bunny_path):
    return {path: read_all_frames(path) for path in (bikes_path, bunny_path)}


def test_rand_picks_one_frame_in_each_equal_segment():
    rng = np.random.default_rng(0)
    for _ in range(200):
        indices = sample_frame_indices(8, 100, "rand", rng=rng)
        starts = [0, 12, 25, 37, 50, 62, 75, 87]  # floor of 100 * k / 8
        segments = [int(np.searchsorted(starts, i, side="right")) - 1 for i in indices]
        assert segments == list(range(8))
    seen = {sample_frame_indices(8, 100, "rand", rng=rng)[0] for _ in range(300)}
    assert seen == set(range(12))  # every frame of the first segment gets drawn


def test_middle_and_uniform_are_deterministic_and_cover_the_clip():
    assert sample_frame_indices(4, 16, "middle") == [1, 5, 9, 13]
    assert sample_frame_indices(4, 16, "uniform") == [0, 5, 10, 15]
    assert sample_frame_indices(3, 10, "uniform", first=2, last=8) == [2, 5, 8]
    # within a segment given by first/last
    indices = sample_frame_indices(4, 100, "rand", first=40, last=59, rng=np.random.default_rng(1))
    assert all(40 <= i <= 59 for i in indices) and indices == sorted(indices)


def test_short_clip_repeats_frames_instead_of_failing():
    indices = sample_frame_indices(8, 3, "middle")
    assert len(indices) == 8 and set(indices) == {0, 1, 2} and indices == sorted(indices)
    assert sample_frame_indices(8, 3, "rand", rng=np.random.default_rng(0)) == sorted(
        sample_frame_indices(8, 3, "rand", rng=np.random.default_rng(0)))
    with pytest.raises(ValueError, match="unknown frame sampling"):
        sample_frame_indices(4, 10, "random")


@pytest.mark.parametrize("sampling", ["rand", "middle", "uniform"])
@pytest.mark.parametrize("num_frames", [1, 4, 8, 16])
def test_sampled_frames_equal_full_decode_on_real_h264(full_decodes, sampling, num_frames):
    for path, full in full_decodes.items():
        rng = np.random.default_rng(num_frames)
        frames, indices = read_frames(path, num_frames, sampling, rng=rng)
        assert frames.dtype == np.uint8 and frames.shape == (num_frames, *full.shape[1:])
        np.testing.assert_array_equal(frames, full[indices])


def test_start_end_segment_and_tchw_layout(full_decodes, bikes_path):
    full = full_decodes[bikes_path]  # 25 fps
    frames, indices = read_frames(bikes_path, 4, "uniform", start=2.0, end=4.0, layout="TCHW")
    assert indices == [50, 67, 83, 100]
    assert frames.shape == (4, 3, 272, 640)
    np.testing.assert_array_equal(frames.transpose(0, 2, 3, 1), full[indices])


def test_reader_seeks_instead_of_decoding_everything(bikes_path, full_decodes):
    reader = PyAVReader(bikes_path)
    decoded = []

    class CountingContainer:
        def __init__(self, container):
            self.container = container

        def __getattr__(self, name):
            return getattr(self.container, name)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded.append(frame.pts)
                yield frame

    reader.container = CountingContainer(reader.container)
    frames = reader.get_frames([240, 245])
    np.testing.assert_array_equal(frames, full_decodes[bikes_path][[240, 245]])
    assert len(decoded) < 125, f"decoded {len(decoded)} of 250 frames to reach the end"


def test_bytes_and_file_objects_decode_like_paths(bikes_path):
    data = open(bikes_path, "rb").read()
    from_path, _ = read_frames(bikes_path, 4, "middle")
    from_bytes, _ = read_frames(data, 4, "middle")
    from_file, _ = read_frames(io.BytesIO(data), 4, "middle")
    np.testing.assert_array_equal(from_path, from_bytes)
    np.testing.assert_array_equal(from_path, from_file)


def test_write_video_round_trip(tmp_path):
    frames = ramp_frames(10, 32, 48)
    path = write_video(tmp_path / "x.mp4", frames, fps=5)
    decoded = read_all_frames(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 4
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", ramp_frames(2, 31, 48))


def test_bad_sources_raise_errors_naming_the_file(tmp_path):
    with pytest.raises(VideoDecodeError, match="missing.mp4: file not found"):
        read_frames(tmp_path / "missing.mp4", 4)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoDecodeError, match="empty.mp4: empty file"):
        read_frames(tmp_path / "empty.mp4", 4)
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
    with pytest.raises(VideoDecodeError, match="junk.mp4: cannot open"):
        read_frames(tmp_path / "junk.mp4", 4)


def test_truncated_file_is_an_error_not_a_blank_clip(tmp_path):
    path = write_video(tmp_path / "full.mp4", ramp_frames(16, 64, 64), fps=8)
    data = path.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        read_frames(tmp_path / "cut.mp4", 4, "middle")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_read_image_as_one_frame_clip(tmp_path):
    import torch
    from torchvision.io import write_png

    image = torch.randint(0, 255, (3, 20, 30), dtype=torch.uint8)
    write_png(image, str(tmp_path / "a.png"))
    clip = read_image(tmp_path / "a.png")
    assert clip.shape == (1, 20, 30, 3)
    np.testing.assert_array_equal(clip[0], image.permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(read_image((tmp_path / "a.png").read_bytes()), clip)


def test_matroska_without_a_frame_count_is_read_by_seeking(tmp_path):
    """An .mkv stores no frame count: the container's duration gives it, so a clip of a long
    video does not decode the whole file; the frames are those of a full decode."""
    import av

    path = tmp_path / "clip.mkv"
    frames = ramp_frames(40, 32, 32)
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    everything = read_all_frames(path)
    with PyAVReader(path) as reader:
        assert reader.num_frames == len(everything) == 40
        np.testing.assert_array_equal(reader.get_frames([3, 39]), everything[[3, 39]])
        assert reader._all is None  # found by seeking, not by decoding every frame
    clip, indices = read_frames(path, 4, "middle")
    np.testing.assert_array_equal(clip, everything[indices])
