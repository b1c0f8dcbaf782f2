"""Tests for the ``data`` package: image I/O, labels, dataset loading, synthetic data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from data.datasets import DatasetError, load_dataset
from data.io import IMAGE_EXTENSIONS, ImageReadError, read_image, write_image
from data.labels import SCHEMES, canonical_label, class_names, decode, encode, map_labels, supported_schemes
from data.synthetic import make_image, write_dataset

# ==========================================================================
# io
# ==========================================================================


def _rgb(h=6, w=7, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_image_extensions():
    assert set(IMAGE_EXTENSIONS) == {".jpg", ".jpeg", ".png", ".tif", ".tiff"}


def test_read_8bit_tiff_exact(tmp_path):
    rgb = _rgb()
    tifffile.imwrite(tmp_path / "a.tif", rgb, photometric="rgb")
    out = read_image(tmp_path / "a.tif")
    assert out.dtype == np.uint8 and out.shape == (6, 7, 3)
    np.testing.assert_array_equal(out, rgb)


def test_read_16bit_tiff_scales_by_dtype_range(tmp_path):
    k = np.arange(256, dtype=np.uint16)
    values = np.stack([257 * k, 257 * k[::-1], np.full(256, 65535, np.uint16)], axis=-1).reshape(16, 16, 3)
    tifffile.imwrite(tmp_path / "a16.tif", values, photometric="rgb")
    out = read_image(tmp_path / "a16.tif")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0].ravel(), k)  # 257 * k -> k
    np.testing.assert_array_equal(out[..., 1].ravel(), k[::-1])
    assert (out[..., 2] == 255).all()  # 65535 -> 255


def test_read_16bit_is_not_contrast_stretched(tmp_path):
    # A dim 16-bit image stays dim: scaling uses the dtype range, not min/max.
    gray = np.array([[0, 128, 129, 1000]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "dim.tif", gray)
    out = read_image(tmp_path / "dim.tif")
    assert out.shape == (1, 4, 3)
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 4])  # round(v / 257)
    assert (out == out[..., :1]).all()


def test_read_gray_png_replicates_channels(tmp_path):
    gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
    write_image(tmp_path / "g.png", gray)
    out = read_image(tmp_path / "g.png")
    assert out.shape == (6, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_read_16bit_png(tmp_path):
    write_image(tmp_path / "g16.png", np.array([[0, 257 * 10, 65535]], dtype=np.uint16))
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png")[0, :, 1], [0, 10, 255])


def test_read_rgba_png_composites_on_white(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = (0, 128, 255)
    write_image(tmp_path / "a.png", rgba)
    out = read_image(tmp_path / "a.png")
    assert out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent -> white
    np.testing.assert_array_equal(out[0, 2], [200, 100, 50])  # opaque -> colour
    a = 128 / 255
    np.testing.assert_array_equal(out[0, 1], np.rint(np.array([200, 100, 50]) * a + 255 * (1 - a)))


@pytest.mark.parametrize("extrasample", ["unassalpha", "assocalpha"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_read_rgba_tiff_respects_alpha_kind(tmp_path, extrasample, dtype):
    colour = np.array([[[200, 100, 50]] * 3], np.float64)
    alpha = np.array([[0, 128, 255]], np.float64)[..., None]
    stored = colour * alpha / 255 if extrasample == "assocalpha" else colour  # premultiplied or straight
    m = 257 if dtype == np.uint16 else 1
    data = np.rint(np.concatenate([stored, alpha], axis=-1) * m).astype(dtype)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="rgb", extrasamples=[extrasample])
    expected = np.rint(colour * alpha / 255 + 255 * (1 - alpha / 255))
    np.testing.assert_allclose(read_image(tmp_path / "a.tif"), expected, atol=1)


def test_read_palette_and_gray_alpha_png(tmp_path):
    rgb = _rgb(8, 8)
    pal = Image.fromarray(rgb).quantize(colors=16)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png"), np.asarray(pal.convert("RGB")))
    la = np.dstack([np.full((2, 2), 40, np.uint8), np.full((2, 2), 255, np.uint8)])
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert (read_image(tmp_path / "la.png") == 40).all()


def test_tiff_opencv_cannot_decode_falls_back_to_tifffile(tmp_path):
    rgb = _rgb(9, 11)
    tifffile.imwrite(tmp_path / "lzma.tif", rgb, photometric="rgb", compression="lzma")
    np.testing.assert_array_equal(read_image(tmp_path / "lzma.tif"), rgb)


def test_jpeg_round_trip_is_close(tmp_path):
    y, x = np.mgrid[0:64, 0:80]
    smooth = np.stack([y * 3, x * 3, 255 - y * 2], axis=-1).astype(np.uint8)
    write_image(tmp_path / "s.jpg", smooth)
    out = read_image(tmp_path / "s.jpg")
    assert out.shape == smooth.shape
    assert np.abs(out.astype(int) - smooth).mean() < 2.0


def test_png_round_trip_keeps_rgb_order(tmp_path):
    rgb = _rgb()
    rgb[0, 0] = (255, 0, 0)
    write_image(tmp_path / "sub" / "r.png", rgb)  # parent folder is created
    out = read_image(tmp_path / "sub" / "r.png")
    np.testing.assert_array_equal(out, rgb)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])


def _bad_file(kind: str, folder: Path) -> Path:
    """Create an unreadable 'image' of the given kind in `folder`."""
    if kind in ("missing", "dir"):
        return folder / "missing.png" if kind == "missing" else folder
    if kind.startswith("truncated"):
        path = write_image(folder / f"cut.{kind.split('-')[1]}", _rgb(64, 64))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path
    name, content = {
        "empty": ("empty.png", b""),
        "text-as-tiff": ("text.tif", b"not an image"),
        "junk-jpg": ("junk.jpg", bytes(range(256)) * 4),
    }[kind]
    (folder / name).write_bytes(content)
    return folder / name


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("empty", "file is empty"),
        ("text-as-tiff", "not a decodable image"),
        ("junk-jpg", "not a decodable image"),
        ("truncated-png", "not a decodable image"),
        ("truncated-jpg", "not a decodable image"),
        ("truncated-tif", "corrupt or unsupported TIFF"),
        ("missing", "no such file"),
        ("dir", "is a directory"),
    ],
)
def test_unreadable_files_raise_image_read_error(tmp_path, kind, reason):
    path = _bad_file(kind, tmp_path)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == str(path)
    assert str(err).startswith(f"cannot read image '{path}': ")
    assert reason in err.reason


def test_image_read_error_pickles():
    err = pickle.loads(pickle.dumps(ImageReadError("x.tif", "file is empty (0 bytes)")))
    assert (err.path, err.reason) == ("x.tif", "file is empty (0 bytes)")
    assert str(err) == "cannot read image 'x.tif': file is empty (0 bytes)"


# ==========================================================================
# labels
# ==========================================================================


def test_schemes_and_class_order():
    assert SCHEMES == {
        "bach4": ("normal", "benign", "insitu", "invasive"),
        "bmc3": ("benign", "insitu", "invasive"),
        "binary": ("non-carcinoma", "carcinoma"),
        "breakhis2": ("benign", "malignant"),
        "breakhis8": ("adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma",
                      "ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma"),
    }
    assert class_names("bmc3") == ("benign", "insitu", "invasive")
    with pytest.raises(ValueError, match="bach4, bmc3, binary"):
        class_names("five")


@pytest.mark.parametrize(
    "raw, canon",
    [
        ("Normal", "normal"), (" benign ", "benign"), ("BENIGN", "benign"),
        ("InSitu", "insitu"), ("in_situ", "insitu"), ("in situ", "insitu"), ("In-Situ", "insitu"),
        ("Invasive", "invasive"), ("non-carcinoma", "non-carcinoma"), ("noncarcinoma", "non-carcinoma"),
        ("Non_Carcinoma", "non-carcinoma"), ("carcinoma", "carcinoma"),
    ],
)
def test_canonical_label(raw, canon):
    assert canonical_label(raw) == canon


def test_canonical_label_unknown_lists_accepted():
    with pytest.raises(ValueError) as info:
        canonical_label("tumour")
    msg = str(info.value)
    assert "'tumour'" in msg
    for name in ("normal", "benign", "insitu", "invasive", "non-carcinoma", "carcinoma"):
        assert name in msg


BACH4 = ["normal", "benign", "insitu", "invasive"]


@pytest.mark.parametrize(
    "scheme, expected",
    [
        ("bach4", ["normal", "benign", "insitu", "invasive"]),
        ("bmc3", ["benign", "benign", "insitu", "invasive"]),
        ("binary", ["non-carcinoma", "non-carcinoma", "carcinoma", "carcinoma"]),
    ],
)
def test_map_bach4_labels_to_every_scheme(scheme, expected):
    out = map_labels(["Normal", "Benign", "in situ", "Invasive"], scheme)
    assert isinstance(out, np.ndarray)
    assert out.tolist() == expected


def test_map_bmc3_labels():
    bmc3 = ["benign", "insitu", "invasive", "benign"]
    assert map_labels(bmc3, "bmc3").tolist() == bmc3
    assert map_labels(bmc3, "binary").tolist() == ["non-carcinoma", "carcinoma", "carcinoma", "non-carcinoma"]
    # bmc3 'benign' may include normal tissue: bach4 is ambiguous.
    with pytest.raises(ValueError, match="support only 'bmc3', 'binary'"):
        map_labels(bmc3, "bach4")
    assert supported_schemes(bmc3) == ("bmc3", "binary")
    # ...unless the caller states these are bach4 labels.
    assert map_labels(bmc3, "bach4", source_scheme="bach4").tolist() == bmc3
    # Without 'benign' nothing is ambiguous.
    assert map_labels(["insitu", "invasive"], "bach4").tolist() == ["insitu", "invasive"]


def test_map_binary_labels_only_to_binary():
    labels = ["Carcinoma", "non carcinoma"]
    assert map_labels(labels, "binary").tolist() == ["carcinoma", "non-carcinoma"]
    for scheme in ("bach4", "bmc3"):
        with pytest.raises(ValueError, match="support only 'binary'"):
            map_labels(labels, scheme)


def test_map_labels_errors_and_edge_cases():
    with pytest.raises(ValueError, match="unknown label 'cancer'"):
        map_labels(["normal", "cancer"], "bach4")
    with pytest.raises(ValueError, match="unknown label scheme"):
        map_labels(["normal"], "bach5")
    with pytest.raises(ValueError, match="not classes of source scheme 'bmc3'"):
        map_labels(["normal"], "binary", source_scheme="bmc3")
    assert map_labels([], "bach4").shape == (0,)
    assert map_labels(pd.Series(["Normal", "Normal"]), "bmc3").tolist() == ["benign", "benign"]


def test_encode_decode():
    np.testing.assert_array_equal(encode(["invasive", "Normal", "InSitu", "benign"], "bach4"), [3, 0, 2, 1])
    np.testing.assert_array_equal(encode(["normal", "benign", "insitu", "invasive"], "binary"), [0, 0, 1, 1])
    np.testing.assert_array_equal(encode(["normal", "invasive"], "bmc3"), [0, 2])
    # Already-mapped subsets (no 'normal') still encode in bach4.
    np.testing.assert_array_equal(encode(["benign", "insitu"], "bach4"), [1, 2])
    assert encode(["carcinoma"], "binary").dtype == np.int64
    assert decode([3, 0], "bach4").tolist() == ["invasive", "normal"]
    with pytest.raises(ValueError):
        decode([4], "bach4")


# ==========================================================================
# datasets
# ==========================================================================


def _tiny(path: Path, value: int = 100) -> Path:
    return write_image(path, np.full((4, 4, 3), value, np.uint8))


@pytest.fixture
def tree(tmp_path) -> Path:
    """Class folders with odd spellings, nesting, hidden and non-image files."""
    root = tmp_path / "ds"
    _tiny(root / "Normal" / "n1.png", 10)
    _tiny(root / "Normal" / "sub" / "n2.PNG", 20)
    _tiny(root / "InSitu" / "s1.jpg", 30)
    _tiny(root / "invasive" / "i1.tif", 40)
    _tiny(root / "benign" / "b1.png", 50)
    (root / "benign" / "README.txt").write_text("notes")
    (root / "benign" / "._b1.png").write_bytes(b"\x00")  # macOS resource fork
    (root / "labels.csv").write_text("path,label\n")
    (root / "notes").mkdir()  # unrelated folder without images
    return root


def test_load_folder(tree):
    df = load_dataset(tree)
    assert list(df.columns) == ["image_id", "path", "label", "group"]
    assert df["image_id"].tolist() == [
        "InSitu/s1.jpg", "Normal/n1.png", "Normal/sub/n2.PNG", "benign/b1.png", "invasive/i1.tif",
    ]
    assert df["label"].tolist() == ["insitu", "normal", "normal", "benign", "invasive"]
    assert (df["group"] == df["image_id"]).all()
    for image_id, path in zip(df["image_id"], df["path"]):
        assert Path(path).is_absolute() and Path(path) == tree / image_id
    assert load_dataset(str(tree), scheme="binary").equals(df)


def test_load_synthetic_folder_and_manifest(synthetic_dir):
    by_folder = load_dataset(synthetic_dir, scheme="bach4")
    by_csv = load_dataset(synthetic_dir / "manifest.csv", scheme="bach4")
    assert len(by_folder) == 16
    assert by_folder["label"].value_counts().to_dict() == dict.fromkeys(BACH4, 4)
    assert by_folder[["image_id", "path", "label"]].equals(by_csv[["image_id", "path", "label"]])
    assert by_csv.loc[by_csv["image_id"] == "insitu/insitu_3.png", "group"].item() == "insitu_p1"
    assert by_csv["group"].nunique() == 8  # two images per patient
    assert read_image(by_folder["path"][0]).shape == (192, 256, 3)


def test_load_manifest_relative_absolute_and_groups(tmp_path):
    root = tmp_path / "m"
    _tiny(root / "imgs" / "a.png", 1)
    _tiny(root / "imgs" / "b.png", 2)
    outside = _tiny(tmp_path / "elsewhere" / "c.png", 3)
    (root / "list.csv").write_text(
        "Path, Label ,group\n"  # header spelling/spacing is tolerated
        f"imgs/b.png,Invasive,007\n"
        f"imgs\\a.png,in situ,\n"  # backslash separator, empty group
        f"{outside},Normal,p2\n"
    )
    df = load_dataset(root / "list.csv")
    assert df["image_id"].tolist() == [outside.as_posix(), "imgs/a.png", "imgs/b.png"]
    assert df["label"].tolist() == ["normal", "insitu", "invasive"]
    assert df["group"].tolist() == ["p2", "imgs/a.png", "007"]  # empty -> image_id; ids keep leading zeros
    assert df["path"].tolist() == [str(outside), str(root / "imgs" / "a.png"), str(root / "imgs" / "b.png")]


def test_load_manifest_without_group_column(tmp_path):
    _tiny(tmp_path / "x.png")
    (tmp_path / "m.csv").write_text("path,label\nx.png,benign\n")
    df = load_dataset(tmp_path / "m.csv")
    assert df.to_dict("records") == [
        {"image_id": "x.png", "path": str(tmp_path / "x.png"), "label": "benign", "group": "x.png"}
    ]


def _manifest(tmp_path: Path, text: str) -> Path:
    for value, name in enumerate(("a.png", "b.png", "c.png")):
        _tiny(tmp_path / name, value)
    path = tmp_path / "m.csv"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, patterns",
    [
        ("file,label\na.png,normal\n", ["lacks column(s) path", "found file, label"]),
        ("path,label\n", ["lists no images"]),
        ("path,label\na.png,normal\nb.png,Normal cells\nc.png,normal-cells\n", ["'Normal cells' and 'normal-cells'"]),
        ("path,label\na.png,normal\n,benign\n", ["empty path or label", "line(s) 3"]),
        ("path,label\na.png,normal\n./a.png,benign\n", ["duplicate path", "lines 2 and 3"]),
        ("path,label\na.png,normal\nnotes.txt,benign\n", ["not image files", "notes.txt"]),
        (
            "path,label\na.png,normal\n" + "".join(f"gone{i}.png,benign\n" for i in range(7)),
            ["7 of 8 listed files do not exist", "gone0.png, gone1.png", "gone4.png, ... (+2 more)"],
        ),
    ],
    ids=["missing-column", "no-rows", "misspelt-label", "blank-cell", "duplicate", "not-image", "missing-files"],
)
def test_manifest_errors(tmp_path, text, patterns):
    csv_path = _manifest(tmp_path, text)
    with pytest.raises(DatasetError) as info:
        load_dataset(csv_path)
    msg = str(info.value)
    assert str(csv_path) in msg
    for pattern in patterns:
        assert pattern in msg


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders with images"):
        load_dataset(tmp_path / "empty")
    # Pointing at a class folder instead of the dataset root.
    _tiny(tmp_path / "flat" / "a.png")
    with pytest.raises(DatasetError, match="found 1 images directly in it"):
        load_dataset(tmp_path / "flat")
    # A class folder without images.
    _tiny(tmp_path / "ds" / "normal" / "a.png")
    (tmp_path / "ds" / "benign").mkdir()
    (tmp_path / "ds" / "benign" / "README").write_text("todo")
    with pytest.raises(DatasetError, match="class folder 'benign' contains no images"):
        load_dataset(tmp_path / "ds")
    # Two folders whose names differ only in case: one class misspelt.
    _tiny(tmp_path / "ds2" / "Tumour" / "a.png")
    _tiny(tmp_path / "ds2" / "tumour" / "b.png", 90)
    with pytest.raises(DatasetError, match=r"'Tumour' and 'tumour' differ only in case.*Tumour \(1\), tumour \(1\)"):
        load_dataset(tmp_path / "ds2")
    (tmp_path / "list.txt").write_text("path,label\n")
    with pytest.raises(DatasetError, match="directory of class folders or a .csv manifest"):
        load_dataset(tmp_path / "list.txt")


def test_scheme_validation(tmp_path):
    _tiny(tmp_path / "bmc" / "benign" / "a.png", 1)
    _tiny(tmp_path / "bmc" / "invasive" / "b.png", 2)
    assert len(load_dataset(tmp_path / "bmc", scheme="binary")) == 2
    with pytest.raises(DatasetError, match="support only 'bmc3', 'binary'"):
        load_dataset(tmp_path / "bmc", scheme="bach4")
    _tiny(tmp_path / "bin" / "carcinoma" / "a.png")
    with pytest.raises(DatasetError, match=r"bin'.*support only 'binary'"):
        load_dataset(tmp_path / "bin", scheme="bmc3")


# ==========================================================================
# synthetic
# ==========================================================================


def _hematoxylin_fraction(rgb: np.ndarray) -> float:
    """Share of dark purple (nuclear) pixels."""
    r, b = rgb[..., 0].astype(int), rgb[..., 2].astype(int)
    return float(((r < 150) & (b > r)).mean())


def test_make_image_shape_and_determinism():
    a = make_image("insitu", np.random.default_rng(5), (120, 90))
    b = make_image("InSitu", np.random.default_rng(5), (120, 90))
    c = make_image("insitu", np.random.default_rng(6), (120, 90))
    assert a.shape == (120, 90, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    with pytest.raises(ValueError):
        make_image("carcinoma", np.random.default_rng(0), (64, 64))


def test_classes_differ_measurably():
    def mean_fraction(label):
        images = [make_image(label, np.random.default_rng(seed), (192, 256)) for seed in range(4)]
        return np.mean([_hematoxylin_fraction(img) for img in images])

    f = {label: mean_fraction(label) for label in BACH4}
    assert f["normal"] < 0.08
    assert f["invasive"] > 0.2
    assert f["normal"] < f["benign"] < f["invasive"]
    assert f["normal"] < f["insitu"] < f["invasive"]


def test_tumour_region_paints_invasive_tissue():
    img = make_image("normal", np.random.default_rng(1), (256, 384), tumour_region=(64, 96, 192, 288))
    inside = _hematoxylin_fraction(img[64:192, 96:288])
    outside = _hematoxylin_fraction(np.concatenate([img[:64].reshape(-1, 3), img[192:].reshape(-1, 3)])[None])
    assert inside > 0.15 and outside < 0.08
    with pytest.raises(ValueError, match="empty"):
        make_image("normal", np.random.default_rng(1), (64, 64), tumour_region=(70, 0, 90, 10))


def test_write_dataset_is_deterministic(tmp_path, synthetic_dir):
    again = write_dataset(tmp_path / "again", n_per_class=4, size=(192, 256), seed=0, groups=True)
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(synthetic_dir) for p in synthetic_dir.rglob("*") if p.is_file())
    assert len(files) == 17  # 16 images + manifest
    for rel in files:
        assert (again / rel).read_bytes() == (synthetic_dir / rel).read_bytes(), rel
    manifest = pd.read_csv(again / "manifest.csv", dtype=str)
    assert manifest.iloc[0].to_dict() == {"path": "normal/normal_0.png", "label": "normal", "group": "normal_p0"}
    other_seed = write_dataset(tmp_path / "seed1", n_per_class=1, seed=1)
    assert (other_seed / "normal" / "normal_0.png").read_bytes() != (again / "normal" / "normal_0.png").read_bytes()


@pytest.mark.parametrize("scheme", ["bmc3", "binary"])
def test_write_dataset_other_schemes_and_formats(tmp_path, scheme):
    out = write_dataset(tmp_path / scheme, n_per_class=2, size=(48, 64), fmt="jpg", scheme=scheme)
    assert pd.read_csv(out / "manifest.csv").columns.tolist() == ["path", "label"]
    df = load_dataset(out / "manifest.csv", scheme=scheme)
    assert df["label"].value_counts().to_dict() == dict.fromkeys(SCHEMES[scheme], 2)
    assert all(p.endswith(".jpg") for p in df["path"])
    assert read_image(df["path"][0]).shape == (48, 64, 3)
