import numpy as np
import pytest
import torch

from leanvl.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN
from leanvl.data.transforms import ClipTransform, resolve_normalization, to_tensor_clip


def test_normalizations_and_custom_values():
    assert resolve_normalization("clip")[0] == CLIP_MEAN
    assert resolve_normalization("imagenet")[0] == IMAGENET_MEAN
    assert resolve_normalization("custom", (0.5,) * 3, (0.25,) * 3) == ((0.5,) * 3, (0.25,) * 3)
    with pytest.raises(ValueError, match="unknown normalization"):
        resolve_normalization("clipp")


def test_eval_resizes_short_side_and_centre_crops():
    clip = torch.zeros(2, 3, 40, 80, dtype=torch.uint8)
    clip[..., 14:66] = 255  # a centred bright band wider than the crop
    out = ClipTransform(20, train=False, mean=(0, 0, 0), std=(1, 1, 1))(clip)
    assert out.shape == (2, 3, 20, 20)
    assert out.min() > 0.95  # the centre crop sees only the band


def test_train_crop_is_shared_by_all_frames_and_seeded():
    rng = np.random.default_rng(0)
    frame = torch.randint(0, 255, (3, 48, 64), dtype=torch.uint8)
    clip = frame.expand(4, -1, -1, -1).contiguous()
    transform = ClipTransform(32, train=True, mean=CLIP_MEAN, std=CLIP_STD, flip=True)
    out = transform(clip, rng)
    assert out.shape == (4, 3, 32, 32)
    assert all(torch.equal(out[0], out[t]) for t in range(4))
    again = transform(clip, np.random.default_rng(0))
    assert torch.equal(out, again)
    different = transform(clip, np.random.default_rng(1))
    assert not torch.equal(out, different)


def test_normalise_then_denormalise_round_trips():
    clip = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)
    transform = ClipTransform(16, train=False, mean=CLIP_MEAN, std=CLIP_STD)
    assert torch.equal(transform.denormalize(transform(clip)), clip)


def test_to_tensor_clip_layout():
    frames = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    clip = to_tensor_clip(frames)
    assert clip.shape == (2, 3, 4, 5) and clip[1, 2, 3, 4] == frames[1, 3, 4, 2]
    with pytest.raises(ValueError, match="T x H x W x 3"):
        to_tensor_clip(frames[0])
