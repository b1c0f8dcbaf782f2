import numpy as np
import pytest

from features.config import ExtractionConfig
from features.extract import FeatureExtractor, MapBatcher
from features.feature_maps import pool_windows, window_cells


def test_window_cells_round_to_the_grid_and_stay_inside():
    assert window_cells(0, 0, 64, 32, 10, 10) == (0, 2, 0, 2)
    assert window_cells(40, 90, 64, 32, 10, 10) == (1, 3, 3, 5)
    assert window_cells(300, 300, 64, 32, 10, 10) == (8, 10, 8, 10)  # clipped at the border
    assert window_cells(0, 0, 10, 32, 4, 4) == (0, 1, 0, 1)  # at least one cell


def test_pool_windows_equals_direct_means():
    fmap = np.random.default_rng(0).random((6, 8, 5))
    windows = np.array([[0, 0, 64], [32, 64, 96], [100, 150, 64]])
    got = pool_windows(fmap, windows, 32)
    np.testing.assert_allclose(got[0], fmap[0:2, 0:2].mean((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(got[1], fmap[1:4, 2:5].mean((0, 1)), rtol=1e-6)
    np.testing.assert_allclose(got[2], fmap[3:5, 5:7].mean((0, 1)), rtol=1e-6)


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(ExtractionConfig(weights="none", crop_size=64), batch_size=2)


def test_shared_map_of_a_whole_image_window_equals_the_exact_feature(extractor):
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    exact = extractor.features(images[:, :, 16:80])
    batcher = MapBatcher(extractor)
    for img in images:
        batcher.add(img, np.array([[0, 16, 64]]))
    shared = batcher.finish()
    # A 64-pixel window at x=16 is cells 0-1 x 0-1 of the 2x3 map: not the crop's own map,
    # so only similar; a window covering the whole image equals global pooling exactly.
    cos = (exact * shared).sum(1) / np.linalg.norm(exact, axis=1) / np.linalg.norm(shared, axis=1)
    assert cos.min() > 0.5
    whole = MapBatcher(extractor)
    whole.add(images[0][:, :64], np.array([[0, 0, 64]]))
    np.testing.assert_allclose(whole.finish()[0], extractor.features(images[:1, :, :64])[0],
                               rtol=1e-4, atol=1e-5)


def test_bfloat16_features_are_close_to_float32():
    from features.augment import ColorAugmentation, augmented_crops
    from data.synthetic import make_image

    image = make_image("invasive", np.random.default_rng(0), size=(96, 96))
    crops = augmented_crops(image, seed=0, image_id="x", aug_index=1, n_crops=4, crop_size=64,
                            color=ColorAugmentation())
    f32 = FeatureExtractor(ExtractionConfig(weights="none", crop_size=64), batch_size=4)
    bf16 = FeatureExtractor(ExtractionConfig(weights="none", crop_size=64, precision="bfloat16"),
                            batch_size=4)
    a, b = f32.features(crops), bf16.features(crops)
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98
    import keras
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored


def test_map_batches_are_padded_to_the_augmentations_not_the_batch_size(extractor, monkeypatch):
    shapes = []
    original = extractor.pooled_maps

    def spy(images, windows, pooling="mean", pad_to=None):
        shapes.append((len(images), pad_to))
        return original(images, windows, pooling, pad_to)

    monkeypatch.setattr(extractor, "pooled_maps", spy)
    batcher = MapBatcher(extractor, per_image=1)  # extractor.batch_size is 2
    image = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    batcher.add(image, None)
    whole = batcher.finish()
    assert shapes == [(1, 1)] and whole.shape == (1, 1280)
    np.testing.assert_allclose(whole[0], extractor.features(image[None])[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "max", "pnorm3"])
def test_pooling_in_the_graph_equals_pooling_on_the_host(extractor, pooling):
    # What shared mode computed before pooling moved into the graph: maps to the host, float64
    # summed-area table per window, then pool_features over each image's windows.
    from features.pooling import pool_features

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (2, 100, 140, 3), dtype=np.uint8)
    windows = np.stack([np.column_stack([rng.integers(0, 37, 5), rng.integers(0, 77, 5),
                                         np.full(5, 64)]) for _ in images])
    maps = extractor.feature_maps(images)
    host = np.stack([pool_features(pool_windows(m, w, extractor.spec.stride), pooling)
                     for m, w in zip(maps, windows)])
    device = extractor.pooled_maps(images, windows, pooling)
    assert device.shape == (2, 1280) and device.dtype == np.float32
    np.testing.assert_allclose(device, host, rtol=1e-6, atol=1e-7)
    print(f"{pooling}: {np.mean(device == host):.4f} of the values bit-identical")
    # One image of a padded batch: same vector as in a full batch.
    np.testing.assert_array_equal(extractor.pooled_maps(images[:1], windows[:1], pooling), device[:1])
    whole = extractor.pooled_maps(images, None)
    np.testing.assert_allclose(whole, maps.mean(axis=(1, 2), dtype=np.float64), rtol=1e-6, atol=1e-7)


def test_augmentation_in_the_graph_equals_the_hosts(extractor):
    # The image goes to the device once; colour tables and crop windows are drawn on the host
    # from the same seeded generators: the features equal the host-augmented ones bit for bit.
    from features.augment import ColorAugmentation, augmented_crops, draw_augmentation

    image = np.random.default_rng(4).integers(0, 256, (100, 140, 3), dtype=np.uint8)
    color = ColorAugmentation()
    draws = [draw_augmentation(seed=0, image_id="x", aug_index=a, height=100, width=140, n_crops=3,
                               crop_size=64, color=color) for a in range(2)]
    assert draws[1].table().shape == (256, 3) and draws[1].table().dtype == np.uint8
    on_device = extractor.to_device(image)
    luts, windows = np.stack([d.table() for d in draws]), np.stack([d.windows for d in draws])
    copies = np.stack([color.apply(image, d.gain, d.shift) for d in draws])
    for pooling in ("mean", "pnorm3"):
        np.testing.assert_array_equal(extractor.augmented_pooled(on_device, luts, windows, pooling),
                                      extractor.pooled_maps(copies, windows, pooling))
    np.testing.assert_array_equal(extractor.augmented_pooled(on_device, luts, None),
                                  extractor.pooled_maps(copies, None))
    crops = augmented_crops(image, seed=0, image_id="x", aug_index=1, n_crops=3, crop_size=64,
                            color=color)
    device = extractor.crop_features(on_device, luts[[1, 1]], draws[1].windows[:2])
    assert device.shape == (2, 1280)
    np.testing.assert_array_equal(device, extractor.run_batch(crops[:2]))
    # A padded batch (one crop of two) gives that crop's features.
    np.testing.assert_array_equal(extractor.crop_features(on_device, luts[[1]], draws[1].windows[2:]),
                                  extractor.run_batch(crops[2:]))
