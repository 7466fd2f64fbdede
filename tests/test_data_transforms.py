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


# ------------------------------------------------------------------ crop-first pipeline
def _scene(h=96, w=192, seed=0):
    """A SynthCity scene with train-id labels: smooth regions, sharp edges, all classes."""
    from seg.data.labels import cityscapes_lookup_table
    from seg.data.synthcity import SynthCityParams, render_scene

    image, ids = render_scene(SynthCityParams(height=h, width=w), np.random.default_rng(seed))
    return image, cityscapes_lookup_table()[0][ids]


# (crop, scale range): crops smaller and larger than the rescaled image (padding), odd
# sizes, upscaling only, and no rescaling at all.
SETTINGS = [
    ([48, 96], [0.25, 2.0]),
    ([96, 96], [0.5, 2.0]),
    ([37, 53], [1.3, 1.7]),
    ([150, 300], [0.5, 1.0]),
    ([64, 100], [1.0, 1.0]),
]


@pytest.mark.parametrize(("crop", "scale"), SETTINGS)
def test_crop_first_equals_resize_then_crop_for_the_same_draws(crop, scale):
    image, label = _scene()
    no_jitter = {"brightness": 0, "contrast": 0, "saturation": 0}
    old = build_train_transform(crop, scale, crop_first=False, **no_jitter)
    new = build_train_transform(crop, scale, **no_jitter)
    for seed in range(40):
        old_image, old_label = apply_transform(old, image, label, seed)
        new_image, new_label = apply_transform(new, image, label, seed)
        assert new_image.shape == old_image.shape == (*crop, 3)
        # Same window, flip and padding; labels pick the very same source pixels.
        assert np.array_equal(new_label, old_label), seed
        # Bilinear weights are rounded differently by cv2.resize and cv2.warpAffine.
        diff = np.abs(new_image.astype(int) - old_image)
        assert diff.max() <= 1, (seed, diff.max())
        assert np.array_equal(new_image[new_label == 255] == 0, old_image[old_label == 255] == 0)
    # With colour jitter (the default) the draws still line up: same jitter factors. The
    # jitter scales the 1-level rounding differences (and contrast shifts every pixel, the
    # padding too, by the image mean, which moves with them).
    old = build_train_transform(crop, scale, crop_first=False)
    new = build_train_transform(crop, scale)
    for seed in range(10):
        old_image, old_label = apply_transform(old, image, label, seed)
        new_image, new_label = apply_transform(new, image, label, seed)
        diff = np.abs(new_image.astype(int) - old_image)
        assert np.array_equal(new_label, old_label)
        assert diff.max() <= 4 and diff.mean() < 1.0, (seed, diff.max(), diff.mean())


def test_crop_first_label_statistics_match_over_many_samples():
    """Class frequencies (padding included) over 300 samples: identical for the same draws,
    and within sampling noise for independent draws of the two pipelines."""
    image, label = _scene(seed=1)
    old = build_train_transform([64, 128], [0.25, 2.0], crop_first=False)
    new = build_train_transform([64, 128], [0.25, 2.0])

    def histogram(transform, seeds):
        counts = np.zeros(256)
        for seed in seeds:
            counts += np.bincount(
                apply_transform(transform, image, label, seed)[1].ravel(), minlength=256
            )
        return counts / counts.sum()

    same_old, same_new = histogram(old, range(300)), histogram(new, range(300))
    assert np.array_equal(same_old, same_new)
    other = histogram(new, range(1000, 1300))
    present = same_old > 0.01
    assert present.sum() >= 5  # several classes and the padding (255)
    assert np.all(np.abs(other[present] - same_old[present]) < 0.25 * same_old[present] + 0.01)


def test_crop_window_geometry():
    from seg.data.transforms import crop_window

    # 100x200 at scale 0.5 -> 50x100, centre-padded into an 80x80 crop: rows 15..65 show
    # image (pad_top 15), and h_start picks the horizontal offset within 100 - 80 + 1.
    window = crop_window((100, 200), (80, 80), 0.5, 0.3, 0.5)
    assert window.scaled == (50, 100)
    assert window.kept(0) == (15, 65) and window.top == -15
    assert window.left == int(21 * 0.5) and window.kept(1) == (0, 80)
    # Scaled image larger than the crop: no padding, offset within the image.
    window = crop_window((100, 200), (80, 80), 2.0, 0.999, 0.0)
    assert window.scaled == (200, 400) and window.top == 120 and window.left == 0
    assert window.kept(0) == (0, 80)


def test_scale_rounding_up_as_the_reference_recipe():
    """CoinCheung/BiSeNet rounds rescaled sizes up (ceil); albumentations down (int)."""
    from seg.data.transforms import crop_window

    assert crop_window((101, 203), (40, 40), 0.5, 0.0, 0.0).scaled == (50, 101)
    assert crop_window((101, 203), (40, 40), 0.5, 0.0, 0.0, round_up=True).scaled == (51, 102)
    # Up to the first whole size: a 2x scale of a whole number stays exact.
    assert crop_window((100, 200), (40, 40), 2.0, 0.0, 0.0, round_up=True).scaled == (200, 400)
    image, label = _pair(101, 203)
    out = build_train_transform([48, 96], [0.5, 0.5], scale_rounding="ceil")(
        image=image, mask=label
    )
    assert out["image"].shape == (48, 96, 3) and out["mask"].shape == (48, 96)
    with pytest.raises(ConfigError, match="scale_rounding"):
        build_train_transform([48, 96], scale_rounding="round")
    with pytest.raises(ConfigError, match="crop_first"):
        build_train_transform([48, 96], scale_rounding="ceil", crop_first=False)


def test_crop_first_resamples_only_the_kept_region(monkeypatch):
    """At scale 2 a 32x32 crop of a 128x256 image needs about 16x16 source pixels."""
    from seg.data import transforms

    regions = []
    warp = transforms._warp
    monkeypatch.setattr(
        transforms, "_warp", lambda r, m, s: (regions.append(r.shape), warp(r, m, s))[1]
    )
    image, label = _pair(128, 256)
    image.flags.writeable = label.flags.writeable = False  # as a memory-mapped cache entry
    t = build_train_transform([32, 32], [2.0, 2.0])
    out_image, out_label = apply_transform(t, image, label, 5)
    assert out_image.shape == (32, 32, 3) and out_label.shape == (32, 32)
    (shape,) = regions
    assert shape[0] <= 16 + 4 and shape[1] <= 16 + 4  # the kept region plus the margin
