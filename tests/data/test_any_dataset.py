"""Any data set: classes as found, mapping files, BreakHis names and tree, BACH's layout, duplicates."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from data.breakhis import parse_name
from data.datasets import DatasetError, load_dataset
from data.io import write_image
from data.labels import check_class_names, class_order, normalise_label
from data.mapping import LabelScheme, MappingError, builtin_scheme, groupings, load_mapping, resolve_scheme
from data.synthetic import write_breakhis, write_dataset

# ==========================================================================
# classes as found
# ==========================================================================


def test_class_order_known_first_then_natural():
    assert class_order(["grade10", "grade2", "Grade1"]) == ("Grade1", "grade2", "grade10")
    assert class_order(["invasive", "insitu", "benign", "normal"]) == ("normal", "benign", "insitu", "invasive")
    assert class_order(["malignant", "benign"]) == ("benign", "malignant")
    assert class_order(["IDC", "normal", "DCIS"]) == ("normal", "DCIS", "IDC")


def test_normalise_label_keeps_unknown_names():
    assert normalise_label(" In Situ ") == "insitu"
    assert normalise_label("Ductal Carcinoma") == "ductal_carcinoma"
    assert normalise_label("  IDC   grade  2 ") == "IDC grade 2"
    with pytest.raises(ValueError, match="empty"):
        normalise_label("  ")


def test_check_class_names_misspelling_error_and_small_class_warning(caplog):
    with pytest.raises(ValueError, match=r"'Grade-1' and 'grade1' differ only .*(?=.*Grade-1 \(3\))(?=.*grade1 \(40\))"):
        check_class_names({"grade1": 40, "Grade-1": 3, "grade2": 38}, "dataset 'x'")
    with caplog.at_level(logging.WARNING):
        warnings = check_class_names({"grade1": 40, "grade2": 38, "grade3": 3}, "dataset 'x'")
    assert len(warnings) == 1
    assert "class 'grade3' has only 3 image(s)" in warnings[0] and "misspelling of 'grade" in warnings[0]
    assert warnings[0] in caplog.text
    assert check_class_names({"a": 2, "b": 2}, "x") == []


def _img(path: Path, value: int) -> Path:
    rng = np.random.default_rng(value)
    return write_image(path, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))


def test_folder_with_arbitrary_classes(tmp_path):
    for k, name in enumerate(["grade3", "grade1", "grade2"]):
        for i in range(2):
            _img(tmp_path / "ds" / name / f"{i}.png", 10 * k + i)
    df = load_dataset(tmp_path / "ds", scheme="classes")
    assert df["label"].value_counts().to_dict() == {"grade1": 2, "grade2": 2, "grade3": 2}
    scheme = resolve_scheme("auto", df["label"])
    assert (scheme.name, scheme.classes) == ("classes", ("grade1", "grade2", "grade3"))
    with pytest.raises(DatasetError, match="leaves label"):
        load_dataset(tmp_path / "ds", scheme="bach4")


def test_manifest_with_own_labels_and_misspelling(tmp_path):
    for i in range(3):
        _img(tmp_path / f"{i}.png", i)
    (tmp_path / "m.csv").write_text("path,label\n0.png,benign\n1.png,Tumour\n2.png,tumour \n")
    with pytest.raises(DatasetError, match=r"'Tumour' and 'tumour'.*benign \(1\), Tumour \(1\), tumour \(1\)"):
        load_dataset(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("path,label\n0.png,benign\n1.png,malignant\n2.png,malignant\n")
    df = load_dataset(tmp_path / "m.csv", scheme="auto")
    assert df["label"].tolist() == ["benign", "malignant", "malignant"]
    assert resolve_scheme("auto", df["label"]).name == "breakhis2"


# ==========================================================================
# mapping files
# ==========================================================================

BREAKHIS2 = {"benign": ["adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma"],
             "malignant": ["ductal_carcinoma", "lobular_carcinoma", "mucinous_carcinoma", "papillary_carcinoma"]}


def _mapping(tmp_path: Path, content, name="map.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_mapping_file_maps_and_keeps_its_class_order(tmp_path):
    path = _mapping(tmp_path, {"high": ["grade3"], "low": ["Grade 1", "grade2"]})
    scheme = load_mapping(path)
    assert scheme.classes == ("high", "low") and scheme.source == str(path)
    assert scheme.map(["grade2", "grade3", "low"]).tolist() == ["low", "high", "low"]
    assert LabelScheme.from_dict(json.loads(json.dumps(scheme.to_dict()))) == scheme
    assert resolve_scheme(str(path), ["grade1", "grade3"]) == scheme


@pytest.mark.parametrize("content, pattern", [
    ({"benign": ["adenosis"], "malignant": ["adenosis"]}, "label 'adenosis' is mapped twice, to 'benign' and to 'malignant'"),
    ('{"benign": ["a"], "benign": ["b"], "m": ["c"]}', "class(es) 'benign' given twice"),
    ({"benign": ["a"], "Benign": ["b"]}, "class 'benign' given twice"),
    ("{not json", "is not valid JSON"),
    ({"benign": ["a"]}, "at least two classes"),
    ({"benign": [1], "m": ["c"]}, "must list its labels"),
    ({"a": ["b"], "b": ["c"]}, "'b' is a class and also mapped to 'a'"),
])
def test_bad_mapping_files_name_the_file(tmp_path, content, pattern):
    path = _mapping(tmp_path, content)
    with pytest.raises(MappingError) as info:
        load_mapping(path)
    assert str(path) in str(info.value) and pattern in str(info.value)


def test_mapping_that_leaves_a_class_unmapped(tmp_path):
    path = _mapping(tmp_path, {"low": ["grade1"], "high": ["grade3"]})
    with pytest.raises(MappingError, match=r"map.json' leaves label\(s\) of the data unmapped: 'grade2' \(2 images\)"):
        resolve_scheme(str(path), ["grade1", "grade2", "grade2", "grade3"])
    with pytest.raises(MappingError, match="cannot be read"):
        resolve_scheme(str(tmp_path / "missing.json"), ["grade1"])
    with pytest.raises(ValueError, match="unknown label scheme 'bach5'"):
        resolve_scheme("bach5", ["normal"])


def test_auto_scheme_and_groupings(tmp_path):
    assert resolve_scheme(None, ["normal", "benign", "insitu", "invasive"]).name == "bach4"
    assert resolve_scheme(None, ["benign", "insitu", "invasive"]).name == "bmc3"
    assert resolve_scheme(None, ["adenosis", "ductal_carcinoma"]).name == "breakhis2"
    assert [g.name for g in groupings(builtin_scheme("bach4"))] == ["bmc3", "binary"]
    assert [g.name for g in groupings(builtin_scheme("breakhis8"))] == ["breakhis2"]
    assert groupings(builtin_scheme("binary")) == []
    grades = resolve_scheme("classes", ["grade1", "grade2", "grade3"])
    coarse = load_mapping(_mapping(tmp_path, {"low": ["grade1", "grade2"], "high": ["grade3"]}))
    assert groupings(grades) == [] and groupings(grades, [coarse]) == [coarse]
    bach_to_bh = load_mapping(_mapping(tmp_path, {"benign": ["non-carcinoma"], "malignant": ["carcinoma"]}, "x.json"))
    assert groupings(grades, [bach_to_bh]) == []  # does not map grades


# ==========================================================================
# BreakHis
# ==========================================================================


@pytest.mark.parametrize("name, expected", [
    ("SOB_B_A-14-22549AB-40-001.png", ("benign", "adenosis", "14-22549AB", "14-22549", "40", 1)),
    ("SOB_B_F-14-9133-100-012.png", ("benign", "fibroadenoma", "14-9133", "14-9133", "100", 12)),
    ("SOB_B_PT-14-22704-200-003.png", ("benign", "phyllodes_tumor", "14-22704", "14-22704", "200", 3)),
    ("SOB_B_TA-14-3411F-40-001.png", ("benign", "tubular_adenoma", "14-3411F", "14-3411", "40", 1)),
    ("SOB_M_DC-14-2523-40-010.png", ("malignant", "ductal_carcinoma", "14-2523", "14-2523", "40", 10)),
    ("SOB_M_LC-14-12204-40-001.png", ("malignant", "lobular_carcinoma", "14-12204", "14-12204", "40", 1)),
    ("SOB_M_MC-14-13418DE-400-007.png", ("malignant", "mucinous_carcinoma", "14-13418DE", "14-13418", "400", 7)),
    ("SOB_M_PC-15-190EF-100-020.png", ("malignant", "papillary_carcinoma", "15-190EF", "15-190", "100", 20)),
])
def test_parse_breakhis_names(name, expected):
    parsed = parse_name(f"some/folder/{name}")
    assert (parsed.tumour, parsed.subtype, parsed.slide, parsed.number, parsed.magnification, parsed.index) == expected
    assert parsed.patient("slide") == expected[2] and parsed.patient() == expected[3]


@pytest.mark.parametrize("name, pattern", [
    ("SOB_B_A-14-22549AB-40.png", "does not parse"),
    ("SOB_B_XX-14-22549AB-40-001.png", "unknown subtype 'XX'"),
    ("SOB_M_A-14-22549AB-40-001.png", "adenosis) is benign, but the name says M"),
    ("SOB_B_A-14-22549AB-50-001.png", "magnification 50 is not one of 40, 100, 200, 400"),
    ("SOB_B_A-14-22549AB-40-001 (1).png", "does not parse"),
])
def test_unparseable_breakhis_names(name, pattern):
    with pytest.raises(ValueError, match=pattern.replace("(", r"\(").replace(")", r"\)")):
        parse_name(name)


@pytest.fixture(scope="module")
def breakhis_tree(tmp_path_factory) -> Path:
    return write_breakhis(tmp_path_factory.mktemp("bh"), patients_per_subtype=2, images_per_magnification=1,
                          magnifications=("40", "100"), size=(23, 35))


def test_breakhis_tree_labels_patients_magnification(breakhis_tree):
    df = load_dataset(breakhis_tree)
    assert list(df.columns) == ["image_id", "path", "label", "group", "magnification"]
    assert len(df) == 8 * 2 * 2
    assert df["label"].value_counts().to_dict() == dict.fromkeys(
        ["adenosis", "fibroadenoma", "phyllodes_tumor", "tubular_adenoma", "ductal_carcinoma", "lobular_carcinoma",
         "mucinous_carcinoma", "papillary_carcinoma"], 4)
    assert resolve_scheme("auto", df["label"]).classes == ("benign", "malignant")
    # Strict grouping (default) joins 14-22549AB (adenosis) and 14-22549CD (fibroadenoma).
    assert df["group"].nunique() == 15
    assert set(df.loc[df["group"] == "14-22549", "label"]) == {"adenosis", "fibroadenoma"}
    by_slide = load_dataset(breakhis_tree, breakhis_patients="slide")
    assert by_slide["group"].nunique() == 16 and "14-22549AB" in set(by_slide["group"])
    assert df["magnification"].value_counts().to_dict() == {"40": 16, "100": 16}
    at40 = load_dataset(breakhis_tree, magnification="40X")
    assert len(at40) == 16 and set(at40["magnification"]) == {"40"}
    assert len(load_dataset(breakhis_tree, magnification=[40, 100])) == 32


def test_breakhis_errors_before_work(breakhis_tree, tmp_path):
    with pytest.raises(DatasetError, match=r"magnification 400 is not in the data set \(magnifications found: 40, 100\)"):
        load_dataset(breakhis_tree, magnification=400)
    with pytest.raises(DatasetError, match="unknown BreakHis patient grouping"):
        load_dataset(breakhis_tree, breakhis_patients="folder")
    tree = tmp_path / "bh"
    shutil.copytree(breakhis_tree, tree)
    one = next(tree.rglob("*-40-001.png"))
    one.rename(one.with_name(one.stem + " (copy).png"))
    with pytest.raises(DatasetError, match=r"1 BreakHis file name\(s\) do not parse: .*\(copy\)\.png"):
        load_dataset(tree)
    with pytest.raises(DatasetError, match="records no magnification"):
        load_dataset(write_dataset(tmp_path / "plain", n_per_class=1, size=(16, 16)), magnification=40)


def test_breakhis_manifest_without_label_column(breakhis_tree, tmp_path):
    files = sorted(breakhis_tree.rglob("*.png"))[:4]
    (tmp_path / "m.csv").write_text("path\n" + "".join(f"{p}\n" for p in files))
    df = load_dataset(tmp_path / "m.csv")
    assert df["label"].tolist() == ["adenosis"] * 4
    assert set(df["group"]) == {"14-22549", "14-29960"} and set(df["magnification"]) == {"40", "100"}
    # The manifest's own label and group win; its magnification column is normalised.
    (tmp_path / "m2.csv").write_text("path,label,group,magnification\n"
                                     f"{files[0]},benign,p1,40x\n{files[2]},benign,,\n")
    df = load_dataset(tmp_path / "m2.csv")
    assert df["label"].tolist() == ["benign", "benign"] and df["group"].tolist() == ["p1", "14-29960"]
    assert df["magnification"].tolist() == ["40", "100"]


# ==========================================================================
# BACH as distributed
# ==========================================================================


def test_bach_official_layout(tmp_path):
    src = write_dataset(tmp_path / "src", n_per_class=2, size=(16, 24), fmt="tif")
    photos = tmp_path / "ICIAR2018_BACH_Challenge" / "Photos"
    lines = []
    for folder, prefix in (("Normal", "n"), ("Benign", "b"), ("InSitu", "is"), ("Invasive", "iv")):
        for i in range(2):
            target = photos / folder / f"{prefix}{i + 1:03d}.tif"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / normalise_label(folder) / f"{normalise_label(folder)}_{i}.tif", target)
            lines.append(f"{target.name},{folder}\n")
    (photos / "microscopy_ground_truth.csv").write_text("".join(lines))
    (tmp_path / "ICIAR2018_BACH_Challenge" / "WSI").mkdir()
    for source in (tmp_path / "ICIAR2018_BACH_Challenge", photos):
        df = load_dataset(source, scheme="bach4")
        assert len(df) == 8 and df["image_id"].iloc[0] == "Benign/b001.tif"
        assert df["label"].value_counts().to_dict() == dict.fromkeys(["normal", "benign", "insitu", "invasive"], 2)
    (photos / "microscopy_ground_truth.csv").write_text("".join(lines).replace("b001.tif,Benign", "b001.tif,Normal"))
    with pytest.raises(DatasetError, match=r"in another class folder than their label: Benign/b001.tif"):
        load_dataset(photos)
    (photos / "microscopy_ground_truth.csv").write_text("".join(lines) + "x.tif,Normal\n")
    with pytest.raises(DatasetError, match=r"1 listed file\(s\) are not under .*: x.tif"):
        load_dataset(photos)


# ==========================================================================
# duplicates
# ==========================================================================


def test_copies_share_one_group_and_are_listed(tmp_path, caplog):
    root = tmp_path / "ds"
    for i in range(3):
        _img(root / "a" / f"{i}.png", i)
        _img(root / "b" / f"{i}.png", 10 + i)
    shutil.copy(root / "a" / "1.png", root / "a" / "copy_of_1.png")
    shutil.copy(root / "b" / "2.png", root / "b" / "renamed.png")
    (root / "m.csv").write_text("path,label,group\n" + "".join(
        f"{c}/{n},{c},{c}{n[0] if n[0].isdigit() else 'x'}\n" for c in "ab"
        for n in sorted(p.name for p in (root / c).iterdir())))
    with caplog.at_level(logging.WARNING):
        df = load_dataset(root / "m.csv")
    assert df.attrs["duplicates"] == [["a/1.png", "a/copy_of_1.png"], ["b/2.png", "b/renamed.png"]]
    group = df.set_index("image_id")["group"]
    assert group["a/1.png"] == group["a/copy_of_1.png"] == "a1"  # patients a1 and ax joined
    assert group["b/2.png"] == group["b/renamed.png"]
    assert df["group"].nunique() == 6
    assert "2 image(s) are present more than once" in caplog.text
    assert load_dataset(root / "m.csv", duplicates=False)["group"].nunique() == 8
