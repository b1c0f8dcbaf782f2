import numpy as np
import pytest

from data.synthetic import make_image
import pandas as pd

from data.io import write_image
from features.stain import StainNormalizer, StainNormalizationError, fit_stain_reference


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [make_image(label, rng, size=(128, 160)) for label in ("normal", "invasive")]


def test_fit_transform_and_params_round_trip(images):
    ref, other = images
    normalizer = StainNormalizer().fit(ref)
    assert normalizer.stain_matrix.shape == (2, 3)
    np.testing.assert_allclose(np.linalg.norm(normalizer.stain_matrix, axis=1), 1, atol=1e-6)
    out = normalizer.transform(other)
    assert out.shape == other.shape and out.dtype == np.uint8
    rebuilt = StainNormalizer.from_params(normalizer.params())
    np.testing.assert_array_equal(rebuilt.transform(other), out)


def test_normalising_towards_a_recoloured_reference_moves_colours(images):
    ref, other = images
    shifted = ref.copy()
    shifted[..., 0] = (shifted[..., 0] * 0.7).astype(np.uint8)  # a redder-poor stain target
    a = StainNormalizer().fit(ref).transform(other)
    b = StainNormalizer().fit(shifted).transform(other)
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
    normalizer = StainNormalizer().fit(images[0])
    out, note = normalizer.transform_or_keep(image)
    assert reason in note
    assert out is image
    with pytest.raises(StainNormalizationError, match=reason):
        StainNormalizer().fit(image)


def test_vahadane_estimates_stains_close_to_macenko_and_round_trips(images):
    ref, other = images
    macenko, vahadane = StainNormalizer().fit(ref), StainNormalizer(method="vahadane").fit(ref)
    # Both find the same two stains (unit optical-density vectors) up to a few degrees.
    cosines = np.sum(macenko.stain_matrix * vahadane.stain_matrix, axis=1)
    assert np.all(cosines > 0.95), cosines
    out = vahadane.transform(other)
    assert vahadane.params()["method"] == "vahadane"
    rebuilt = StainNormalizer.from_params(vahadane.params())
    assert rebuilt.method == "vahadane"
    np.testing.assert_array_equal(rebuilt.transform(other), out)
    # A brighter, paler copy is pulled back towards the reference's concentrations.
    assert abs(float(out.mean()) - float(ref.mean())) < abs(float(other.mean()) - float(ref.mean())) + 5


def test_params_without_method_are_macenko_and_unknown_methods_are_refused(images):
    params = StainNormalizer().fit(images[0]).params()
    del params["method"]  # written before the method was a choice
    assert StainNormalizer.from_params(params).method == "macenko"
    with pytest.raises(ValueError, match="unknown stain method 'reinhard'; choose one of macenko, vahadane"):
        StainNormalizer(method="reinhard")


def test_fit_stain_reference_records_the_method_in_macenko_key_order(images, tmp_path):
    paths = []
    for i, image in enumerate(images):
        write_image(tmp_path / f"{i}.png", image)
        paths.append(str(tmp_path / f"{i}.png"))
    table = pd.DataFrame({"path": paths, "image_id": ["a", "b"]})
    macenko = fit_stain_reference(table, 1.0)
    assert list(macenko) == ["method", "reference", "reference_sha256", "stain_matrix", "max_concentrations"]
    assert macenko["method"] == "macenko"
    assert fit_stain_reference(table, 1.0, method="vahadane")["method"] == "vahadane"
