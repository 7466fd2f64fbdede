"""Train/eval pipelines: shapes, pad values, nearest labels, seeded repeatability."""

import numpy as np
import pytest

from seg.data.transforms import apply_transform, build_eval_transform, build_train_transform
from seg.errors import ConfigError

VALID = set(range(5)) | {255}


def _pair(h=32, w=64, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.choice([0, 1, 2, 3, 4, 255], size=(h, w)).astype(np.uint8)
    return image, label


def test_train_output_shape_and_dtype():
    t = build_train_transform(crop_size=[48, 40], scale_range=[0.5, 2.0])
    image, label = _pair()
    for seed in range(5):
        out_image, out_label = apply_transform(t, image, label, seed)
        assert out_image.shape == (48, 40, 3) and out_image.dtype == np.uint8
        assert out_label.shape == (48, 40) and out_label.dtype == np.uint8
        assert set(np.unique(out_label)) <= VALID  # nearest: no blended label values


def test_padding_uses_zero_image_and_ignore_label():
    # A small image and a large crop: the border must be padding.
    t = build_train_transform(
        crop_size=[64, 128], scale_range=[1.0, 1.0], brightness=0, contrast=0, saturation=0
    )
    image = np.full((16, 32, 3), 200, np.uint8)
    label = np.ones((16, 32), np.uint8)
    out_image, out_label = apply_transform(t, image, label, 0)
    assert (out_label == 255).sum() == 64 * 128 - 16 * 32
    assert (out_label == 1).sum() == 16 * 32
    assert np.all(out_image[out_label == 255] == 0)
    assert np.all(out_image[out_label == 1] == 200)


def test_same_seed_same_augmentation_different_seed_differs():
    t = build_train_transform(crop_size=[32, 32], scale_range=[0.5, 2.0])
    image, label = _pair()
    a = apply_transform(t, image, label, 123)
    b = apply_transform(t, image, label, 123)
    c = apply_transform(t, image, label, 124)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_eval_is_identity_by_default_and_resize_is_nearest():
    image, label = _pair()
    out_image, out_label = apply_transform(build_eval_transform(), image, label, None)
    assert np.array_equal(out_image, image) and np.array_equal(out_label, label)
    out_image, out_label = apply_transform(
        build_eval_transform(resize=[16, 24]), image, label, None
    )
    assert out_image.shape == (16, 24, 3) and out_label.shape == (16, 24)
    assert set(np.unique(out_label)) <= VALID


def test_bad_config_values():
    with pytest.raises(ConfigError, match="scale_range"):
        build_train_transform(crop_size=[32, 32], scale_range=[2.0, 1.0])
    with pytest.raises(ConfigError, match="crop_size"):
        build_train_transform(crop_size=[32])
