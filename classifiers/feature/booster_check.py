"""Check an XGBoost JSON booster (or a LightGBM text model, at the end) before its library parses it.

XGBoost trusts the tree arrays of a model file: an out-of-range child or feature index, or a
cycle, makes it read out of bounds or loop while predicting (a crafted ``estimator-<k>.json``
with a recomputed sha256 crashed ``predict`` with a segfault).  A model directory comes from
other people, so every tree is checked here first: array lengths, child and feature indices in
range, each node reached exactly once from the root (no cycle, no shared node), numeric
(non-categorical) splits with scalar leaves, and class indices in range.
"""

from __future__ import annotations

import json
from numbers import Integral

_ROOT_PARENT = 2147483647  # XGBoost's "no parent" marker
_NODE_ARRAYS = ("left_children", "right_children", "parents", "split_indices", "split_conditions",
                "default_left", "base_weights")


class BoosterFormatError(ValueError):
    """A booster file is not a well-formed tree model; the message names the file and tree."""


def _int(value, what: str) -> int:
    # JSON numbers, or the numeric strings XGBoost writes for parameters
    try:
        number = int(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if not isinstance(number, Integral) or isinstance(number, bool):
        raise BoosterFormatError(f"{what} is not an integer ({value!r})")
    return int(number)


def _check_tree(tree: dict, num_feature: int, where: str) -> None:
    param = tree.get("tree_param") or {}
    n = _int(param.get("num_nodes"), f"{where}: num_nodes")
    if n < 1:
        raise BoosterFormatError(f"{where}: a tree needs at least one node, not {n}")
    if _int(param.get("size_leaf_vector", 1), f"{where}: size_leaf_vector") > 1:
        raise BoosterFormatError(f"{where}: vector leaves are not supported")
    for name in _NODE_ARRAYS:
        if not isinstance(tree.get(name), list) or len(tree[name]) != n:
            raise BoosterFormatError(f"{where}: {name} must be a list of {n} values")
    if any(_int(t, f"{where}: split_type") != 0 for t in tree.get("split_type", [])):
        raise BoosterFormatError(f"{where}: categorical splits are not supported")
    if tree.get("categories") or tree.get("categories_nodes"):
        raise BoosterFormatError(f"{where}: categorical splits are not supported")
    left, right = tree["left_children"], tree["right_children"]
    parents, features = tree["parents"], tree["split_indices"]
    seen, stack = set(), [(0, _ROOT_PARENT)]
    while stack:
        node, parent = stack.pop()
        if node in seen:
            raise BoosterFormatError(f"{where}: node {node} is reached twice (a cycle or a shared node)")
        seen.add(node)
        if _int(parents[node], f"{where}: parents[{node}]") != parent:
            raise BoosterFormatError(f"{where}: node {node} names parent {parents[node]}, not {parent}")
        a, b = _int(left[node], f"{where}: left child"), _int(right[node], f"{where}: right child")
        if a == -1 and b == -1:
            continue  # a leaf
        if not (0 <= a < n and 0 <= b < n):
            raise BoosterFormatError(f"{where}: node {node} has children ({a}, {b}) outside 0..{n - 1}")
        feature = _int(features[node], f"{where}: split_indices[{node}]")
        if not 0 <= feature < num_feature:
            raise BoosterFormatError(f"{where}: node {node} splits on feature {feature}, outside 0..{num_feature - 1}")
        stack += [(a, node), (b, node)]
    unreached = n - len(seen) - _int(param.get("num_deleted", 0), f"{where}: num_deleted")
    if unreached != 0:
        raise BoosterFormatError(f"{where}: {unreached} node(s) are not reached from the root")


def _refusal(source: str, kind: str, exc: Exception) -> BoosterFormatError:
    """The error naming the file: our own finding as it is, a parser's error as a malformed model."""
    what = str(exc) if isinstance(exc, BoosterFormatError) else f"malformed {kind} ({type(exc).__name__}: {exc})"
    return BoosterFormatError(f"{source}: {what}; refusing to load it (copy the model directory again, or retrain)")


def check_booster_json(raw: bytes, n_features: int, n_classes: int, source: str) -> None:
    """Raise :class:`BoosterFormatError` unless ``raw`` is a well-formed gbtree JSON model for
    ``n_features`` features and ``n_classes`` classes.

    Parameters
    ----------
    raw : bytes
        The file's content: XGBoost is then given these same bytes.
    n_features, n_classes : int
        What ``model.json`` says the estimator takes and predicts.
    source : str
        The file, for messages.
    """
    try:
        doc = json.loads(raw)
        learner = doc["learner"]
        param = learner["learner_model_param"]
        booster = learner["gradient_booster"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise BoosterFormatError(f"{source} is not an XGBoost JSON model ({type(exc).__name__}: {exc})") from None
    try:
        if booster.get("name") != "gbtree":
            raise BoosterFormatError(f"booster {booster.get('name')!r} is not supported (only gbtree)")
        num_feature = _int(param.get("num_feature"), "num_feature")
        if num_feature != n_features:
            raise BoosterFormatError(f"it takes {num_feature} features, model.json says {n_features}")
        num_class = max(_int(param.get("num_class"), "num_class"), 1)
        model = booster["model"]
        trees, info = model["trees"], model["tree_info"]
        if not isinstance(trees, list) or not isinstance(info, list) or len(trees) != len(info):
            raise BoosterFormatError("trees and tree_info differ in length")
        if _int(model["gbtree_model_param"]["num_trees"], "num_trees") != len(trees):
            raise BoosterFormatError("num_trees does not match the trees")
        if any(not 0 <= _int(c, "tree_info") < num_class for c in info):
            raise BoosterFormatError(f"tree_info names a class outside 0..{num_class - 1}")
        if n_classes > 2 and num_class != n_classes:
            raise BoosterFormatError(f"it has {num_class} classes, model.json lists {n_classes}")
        indptr = model.get("iteration_indptr", [0, len(trees)])
        bounds = [_int(i, "iteration_indptr") for i in indptr]
        if bounds[0] != 0 or bounds[-1] != len(trees) or any(a > b for a, b in zip(bounds, bounds[1:])):
            raise BoosterFormatError("iteration_indptr does not index the trees")
        for k, tree in enumerate(trees):
            if not isinstance(tree, dict):
                raise BoosterFormatError(f"tree {k} is not an object")
            _check_tree(tree, num_feature, f"tree {k}")
    except (BoosterFormatError, KeyError, TypeError, IndexError) as exc:
        raise _refusal(source, "tree model", exc) from None


# --- LightGBM text models -------------------------------------------------------------------
# LightGBM's parser trusts its model text as XGBoost does its JSON: child, leaf and feature
# indices are not range-checked, and the header's ``tree_sizes`` are byte offsets it jumps to.
# The trees are checked here, and ``tree_sizes`` is dropped so that LightGBM reads the trees in
# sequence (its parser's path for models without it) from the very text that was checked.


def _key_values(lines, where: str) -> dict:
    out = {}
    for line in lines:
        if "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _numbers(block: dict, name: str, count: int, where: str, kind=int) -> list:
    text = block.get(name, "")
    try:
        values = [kind(v) for v in text.split()] if text else []
    except ValueError:
        raise BoosterFormatError(f"{where}: {name} holds a value that is not a number") from None
    if len(values) != count:
        raise BoosterFormatError(f"{where}: {name} must hold {count} values, not {len(values)}")
    return values


def _check_lightgbm_tree(block: dict, n_features: int, where: str) -> None:
    n_leaves = _int(block.get("num_leaves"), f"{where}: num_leaves")
    if n_leaves < 1:
        raise BoosterFormatError(f"{where}: a tree needs at least one leaf, not {n_leaves}")
    if _int(block.get("num_cat", "0"), f"{where}: num_cat") != 0 or block.get("is_linear", "0") != "0":
        raise BoosterFormatError(f"{where}: categorical splits and linear trees are not supported")
    _numbers(block, "leaf_value", n_leaves, where, float)
    n_nodes = n_leaves - 1
    if n_nodes == 0:
        return
    features = _numbers(block, "split_feature", n_nodes, where)
    decisions = _numbers(block, "decision_type", n_nodes, where)
    _numbers(block, "threshold", n_nodes, where, float)
    left, right = _numbers(block, "left_child", n_nodes, where), _numbers(block, "right_child", n_nodes, where)
    if any(d & 1 for d in decisions):
        raise BoosterFormatError(f"{where}: categorical splits are not supported")
    seen_nodes, seen_leaves, stack = set(), set(), [0]
    while stack:
        node = stack.pop()
        if node in seen_nodes:
            raise BoosterFormatError(f"{where}: node {node} is reached twice (a cycle or a shared node)")
        seen_nodes.add(node)
        if not 0 <= features[node] < n_features:
            raise BoosterFormatError(f"{where}: node {node} splits on feature {features[node]}, outside "
                                     f"0..{n_features - 1}")
        for child in (left[node], right[node]):
            if child >= 0:
                if child >= n_nodes:
                    raise BoosterFormatError(f"{where}: node {node} has child {child} outside 0..{n_nodes - 1}")
                stack.append(child)
            else:
                leaf = ~child
                if leaf >= n_leaves or leaf in seen_leaves:
                    raise BoosterFormatError(f"{where}: node {node} names leaf {leaf}, outside 0..{n_leaves - 1} "
                                             "or reached twice")
                seen_leaves.add(leaf)
    if len(seen_nodes) != n_nodes or len(seen_leaves) != n_leaves:
        raise BoosterFormatError(f"{where}: {n_nodes - len(seen_nodes)} node(s) and {n_leaves - len(seen_leaves)} "
                                 "leaf/leaves are not reached from the root")


def check_lightgbm_text(raw: bytes, n_features: int, n_classes: int, source: str) -> str:
    """Check a LightGBM text model and return the text LightGBM may parse.

    Parameters
    ----------
    raw : bytes
        The file's content.
    n_features, n_classes : int
        What ``model.json`` says the estimator takes and predicts.
    source : str
        The file, for messages.

    Returns
    -------
    str
        ``raw`` without its ``tree_sizes`` line.

    Raises
    ------
    BoosterFormatError
        Anything but a well-formed numerical-split tree model of that shape.
    """
    try:
        text = raw.decode("ascii")
        head, marker, _ = text.partition("\nTree=")
        if not marker or "end of trees" not in text or not head.startswith("tree\n"):
            raise BoosterFormatError("it is not a LightGBM text model (no header, trees or 'end of trees')")
        header = _key_values(head.splitlines(), "header")
        per_iteration = 1 if n_classes == 2 else n_classes
        for key, expected in (("num_class", per_iteration), ("num_tree_per_iteration", per_iteration),
                              ("max_feature_idx", n_features - 1)):
            if _int(header.get(key), key) != expected:
                raise BoosterFormatError(f"{key} is {header.get(key)}, model.json implies {expected}")
        objective = header.get("objective", "").split(" ")[0]
        if objective not in ("binary", "multiclass"):
            raise BoosterFormatError(f"objective {objective!r} is not supported (binary or multiclass)")
        trees = text[len(head) + 1:text.index("end of trees")].split("Tree=")[1:]
        if not trees or len(trees) % per_iteration:
            raise BoosterFormatError(f"{len(trees)} trees is not a whole number of rounds of {per_iteration}")
        for k, tree in enumerate(trees):
            lines = tree.splitlines()
            if _int(lines[0], f"tree {k}: index") != k:
                raise BoosterFormatError(f"tree {k} is numbered {lines[0]}")
            _check_lightgbm_tree(_key_values(lines[1:], f"tree {k}"), n_features, f"tree {k}")
    except (BoosterFormatError, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise _refusal(source, "LightGBM model", exc) from None
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("tree_sizes="))
