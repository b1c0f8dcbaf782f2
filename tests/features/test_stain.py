import numpy as np
import pytest

from data.synthetic import make_image
from features.stain import MacenkoNormalizer, StainNormalizationError


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [make_image(label, rng, size=(128, 160)) for label in ("normal", "invasive")]


def test_fit_transform_and_params_round_trip(images):
    ref, other = images
    normalizer = MacenkoNormalizer().fit(ref)
    assert normalizer.stain_matrix.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(normalizer.stain_matrix, axis=1), 1, atol=1e-6)
    out = normalizer.transform(other)
    assert out.shape == other.shape and out.dtype == np.uint8
    rebuilt = MacenkoNormalizer.from_params(normalizer.params())
    np.testing.assert_array_equal(rebuilt.transform(other), out)


def test_normalising_towards_a_recoloured_reference_moves_colours(images):
    ref, other = images
    shifted = ref.copy()
    shifted[..., 0] = (shifted[..., 0] * 0.7).astype(np.uint8)  # a redder-poor stain target
    a = MacenkoNormalizer().fit(ref).transform(other)
    b = MacenkoNormalizer().fit(shifted).transform(other)
    assert b[..., 0].mean() < a[..., 0].mean() - 5


@pytest.mark.parametrize(
    "image, reason",
    [
        (np.full((64, 64, 3), 255, np.uint8), "tissue mask covers"),
        (np.full((64, 64, 3), 120, np.uint8), "nearly uniform"),
        (np.zeros((64, 64), np.uint8), "RGB uint8"),
    ],
)
def test_unusable_images_are_kept_with_a_reason(images, image, reason):
    normalizer = MacenkoNormalizer().fit(images[0])
    out, note = normalizer.transform_or_keep(image)
    assert reason in note
    assert out is image
    with pytest.raises(StainNormalizationError, match=reason):
        MacenkoNormalizer().fit(image)
