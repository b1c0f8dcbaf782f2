import numpy as np
import pytest

from features.augment import (
    ColorAugmentation, augmentation_rng, augmented_crops, crop_positions, effective_crop_size,
)
from features.pooling import pool_features


def _image(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rng_depends_only_on_seed_image_and_index():
    a = augmentation_rng(0, "benign/x.png", 3).random(4)
    b = augmentation_rng(0, "benign/x.png", 3).random(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, augmentation_rng(0, "benign/x.png", 4).random(4))
    assert not np.array_equal(a, augmentation_rng(1, "benign/x.png", 3).random(4))
    assert not np.array_equal(a, augmentation_rng(0, "benign/y.png", 3).random(4))


def test_color_transform_is_the_documented_affine_map():
    aug = ColorAugmentation(gain_range=0.1, shift_range=20)
    image = np.array([[[0, 128, 255]]], dtype=np.uint8)
    out = aug.apply(image, np.array([1.1, 0.9, 1.0]), np.array([10.0, -5.0, 20.0]))
    # 1.1*(0-128)+128+10 = -2.8 -> 0 ; 0.9*0+128-5 = 123 ; 255+20 -> 255
    np.testing.assert_array_equal(out, [[[0, 123, 255]]])
    gains, shifts = zip(*(aug.sample(np.random.default_rng(s)) for s in range(200)))
    assert 0.9 <= np.min(gains) and np.max(gains) <= 1.1
    assert -20 <= np.min(shifts) and np.max(shifts) <= 20


def test_augmentation_zero_keeps_colours_and_crops_are_deterministic():
    image = _image()
    kw = dict(seed=0, image_id="a", n_crops=3, crop_size=16, color=ColorAugmentation())
    crops0 = augmented_crops(image, aug_index=0, **kw)
    assert crops0.shape == (3, 16, 16, 3)
    # each identity crop must be found verbatim in the image
    for crop in crops0:
        found = any(
            np.array_equal(image[y:y + 16, x:x + 16], crop)
            for y in range(40 - 15) for x in range(60 - 15)
        )
        assert found
    np.testing.assert_array_equal(crops0, augmented_crops(image, aug_index=0, **kw))
    crops1 = augmented_crops(image, aug_index=1, **kw)
    assert not np.array_equal(crops0, crops1)


def test_small_image_uses_its_shorter_side():
    assert effective_crop_size(300, 500, 750) == 300
    assert effective_crop_size(1024, 768, 750) == 750
    crops = augmented_crops(_image(20, 30), seed=0, image_id="a", aug_index=2, n_crops=2,
                            crop_size=750, color=ColorAugmentation())
    assert crops.shape == (2, 20, 20, 3)


def test_crop_positions_stay_inside_the_image():
    pos = crop_positions(np.random.default_rng(0), 100, 70, 50, 500)
    assert pos[:, 0].min() == 0 and pos[:, 0].max() == 50
    assert pos[:, 1].min() == 0 and pos[:, 1].max() == 20


def test_pooling_values():
    x = np.array([[0.0, 3.0], [2.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(pool_features(x, "mean"), [1.0, 1.0])
    np.testing.assert_allclose(pool_features(x, "max"), [2.0, 3.0])
    np.testing.assert_allclose(pool_features(x, "pnorm3"), [np.cbrt(9 / 3), np.cbrt(27 / 3)],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_features(x, "median")
