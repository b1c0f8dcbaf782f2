"""Estimators for the feature-store rows and the choice of XGBoost's device.

Two classifiers, both following scikit-learn's estimator API
(``fit`` / ``predict_proba`` / ``predict`` / ``classes_`` / ``get_params``), and the boosters
with early stopping of :mod:`classifiers.feature.boosting` (``xgboost-es``, ``lightgbm``):

* :class:`XGBoostFeatureClassifier` -- gradient boosted trees (the classifier
  of El Agouri et al. 2022; Rakhlin et al. 2018 used LightGBM), modest
  defaults so that a 6-fold run on a few hundred images stays fast on 2 cores;
* :func:`make_logreg` -- a regularised logistic regression on standardised
  features, a linear baseline reported beside the trees; ``logreg-sqrt`` is the
  same after a signed square root of every feature (:class:`SignedSquareRoot`).

:func:`make_classifier` builds any of them by name.  The device for XGBoost is
chosen explicitly by :func:`resolve_xgboost_device`, which probes for a GPU and
never lets XGBoost fall back silently from ``cuda`` to the CPU.
"""

from __future__ import annotations

import json
import logging
import numbers
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import LabelEncoder, StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

logger = logging.getLogger(__name__)

#: Classifiers of one feature vector per row: trained, saved and cross-validated (``--classifier``).
CLASSIFIER_NAMES = ("xgboost", "logreg", "logreg-sqrt", "xgboost-es", "lightgbm")
#: Classifiers that choose their number of rounds by early stopping on a grouped inner split of
#: the rows they are fitted on (:mod:`classifiers.feature.boosting`): ``fit`` takes ``groups``.
EARLY_STOPPING_NAMES = ("xgboost-es", "lightgbm")
#: Classifiers that train with XGBoost, on the device of :func:`resolve_xgboost_device`.
XGBOOST_NAMES = ("xgboost", "xgboost-es")
#: The classifiers a cross-validation compares when none is named.
DEFAULT_CLASSIFIERS = ("xgboost", "logreg")
#: Classifiers of bags of instances (instance stores, ``--instances cells-AxB``): cross-validated.
INSTANCE_CLASSIFIER_NAMES = ("mil",)
#: Every name :func:`make_classifier` builds.
CV_CLASSIFIER_NAMES = CLASSIFIER_NAMES + INSTANCE_CLASSIFIER_NAMES
#: Values accepted for the XGBoost ``device`` parameter.
DEVICE_CHOICES = ("auto", "cpu", "cuda")


class DeviceUnavailableError(RuntimeError):
    """The requested XGBoost device cannot be used."""


@dataclass(frozen=True)
class DeviceChoice:
    """The device XGBoost will train on, and why.

    Attributes
    ----------
    device : str
        ``"cuda"`` or ``"cpu"``.
    reason : str
        Plain explanation, written to the log and the report.
    detail : str
        The library's own words (e.g. XGBoost's warning), logged at DEBUG level only.
    """

    device: str
    reason: str
    detail: str = field(default="", compare=False)


def booster_device(booster) -> str:
    """Device a trained booster actually used, read from its saved config."""
    config = json.loads(booster.save_config())
    return str(config["learner"]["generic_param"]["device"])


def probe_xgboost_gpu() -> DeviceChoice:
    """Find out whether XGBoost can train on a GPU here.

    Checks ``xgboost.build_info()['USE_CUDA']`` and then trains a one-tree
    booster with ``device="cuda"``: a CUDA build on a machine without a visible
    GPU only *warns* and trains on the CPU, so the device the booster really
    used is read back from its configuration.

    Returns
    -------
    DeviceChoice
        ``cuda`` if the probe booster ran on the GPU, else ``cpu`` with the
        reason.
    """
    import xgboost

    if not xgboost.build_info().get("USE_CUDA", False):
        return DeviceChoice("cpu", "xgboost was built without CUDA")
    X = np.array([[0.0], [1.0], [0.0], [1.0]], dtype=np.float32)
    y = np.array([0, 1, 0, 1], dtype=np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            booster = xgboost.train(
                {"device": "cuda", "tree_method": "hist", "verbosity": 1},
                xgboost.DMatrix(X, label=y),
                num_boost_round=1,
            )
        except xgboost.core.XGBoostError as exc:  # broken driver etc.
            return DeviceChoice("cpu", f"xgboost CUDA probe failed: {exc}")
    used = booster_device(booster)
    if used.startswith("cuda"):
        return DeviceChoice("cuda", f"xgboost probe trained on {used}")
    # "[21:34:56] WARNING: /src/context.cc:53: No visible GPU ..." -> "No visible GPU ..."
    messages = [re.sub(r"^\[[\d:]+\]\s*WARNING:\s*\S+:\d+:\s*", "", str(w.message).strip()) for w in caught]
    detail = messages[0] if messages else "no detail"
    return DeviceChoice("cpu", "no GPU visible to XGBoost", detail=f"XGBoost with CUDA support: {detail}")


def resolve_xgboost_device(requested: str = "auto") -> DeviceChoice:
    """Turn a requested device into the one that will be used.

    Parameters
    ----------
    requested : {"auto", "cpu", "cuda"}
        ``auto`` takes the GPU when :func:`probe_xgboost_gpu` finds one and
        the CPU otherwise; ``cuda`` requires a GPU.

    Returns
    -------
    DeviceChoice

    Raises
    ------
    ValueError
        If ``requested`` is not one of :data:`DEVICE_CHOICES`.
    DeviceUnavailableError
        If ``cuda`` was requested and no GPU is usable.
    """
    if requested not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {requested!r}")
    if requested == "cpu":
        choice = DeviceChoice("cpu", "cpu requested")
    else:
        probe = probe_xgboost_gpu()
        if requested == "cuda" and probe.device != "cuda":
            raise DeviceUnavailableError(
                f"device='cuda' was requested but XGBoost cannot use a GPU: {probe.reason}. "
                "Use device='auto' or 'cpu' on this machine."
            )
        choice = probe
    logger.info("XGBoost runs on the %s: %s", "GPU" if choice.device == "cuda" else "CPU", choice.reason)
    if choice.detail:
        logger.debug("XGBoost device probe: %s", choice.detail)
    return choice


def check_int(name: str, value, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_nonnegative(name: str, value) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number (not a bool) >= 0."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def check_fraction(name: str, value, *, open_low: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in (0, 1] (``open_low=False``: [0, 1])."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    ok = ok and (0 < value <= 1 if open_low else 0 <= value <= 1)
    if not ok:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def training_data(estimator, X, y):
    """Validated ``(X float32, y, fitted LabelEncoder)`` for ``estimator.fit``: finite features,
    classification targets of at least two classes (sets ``estimator.n_features_in_``)."""
    X, y = validate_data(estimator, X, y, dtype=np.float32, ensure_all_finite=True)
    check_classification_targets(y)  # rejects continuous targets with a clear message
    encoder = LabelEncoder().fit(y)
    if len(encoder.classes_) < 2:
        raise ValueError(
            f"{type(estimator).__name__} needs at least 2 classes in y, got one class: "
            f"{encoder.classes_.tolist()}"
        )
    return X, y, encoder


class XGBoostFeatureClassifier(ClassifierMixin, BaseEstimator):
    """XGBoost on CNN feature vectors, with explicit device and threads.

    Labels may be any hashable values (strings such as ``"invasive"``); they
    are encoded internally and ``predict_proba`` columns follow ``classes_``
    (sorted labels, as in scikit-learn).

    Parameters
    ----------
    n_estimators : int, default=250
        Boosting rounds.  No early stopping: a fixed number of rounds means
        nothing is tuned on the test fold (and no inner split is needed).
    max_depth : int, default=3
        Shallow trees; with ~2000 correlated CNN features and a few hundred
        images deeper trees overfit the augmentations of the training images.
    learning_rate : float, default=0.1
    subsample : float, default=0.8
        Row subsampling per tree.
    colsample_bytree : float, default=0.8
        Feature subsampling per tree.
    min_child_weight : float, default=1.0
    reg_lambda : float, default=1.0
        L2 penalty on leaf weights (XGBoost's default).
    n_jobs : int, default=2
        CPU threads; explicit so runs on shared machines are predictable.
        On cores shared with other jobs, run with ``OMP_WAIT_POLICY=PASSIVE``
        (``pipeline.cv_report`` sets it): busy-waiting OpenMP threads made
        small multi-threaded fits ~100x slower in our measurements.
    random_state : int, default=0
        Seed for XGBoost's row/column subsampling.
    device : {"auto", "cpu", "cuda"}, default="auto"
        Resolved at ``fit`` by :func:`resolve_xgboost_device`; pass the
        resolved value (``"cpu"``/``"cuda"``) to avoid re-probing per fit.
        ``tree_method`` is always ``"hist"``.

    Attributes
    ----------
    classes_ : ndarray
        Class labels in the order of ``predict_proba`` columns.
    n_features_in_ : int
    device_ : str
        Device the booster actually trained on.
    booster_ : xgboost.XGBClassifier
        The fitted XGBoost estimator.
    """

    def __init__(
        self,
        n_estimators: int = 250,
        max_depth: int = 3,
        learning_rate: float = 0.1,
        subsample: float = 0.8,
        colsample_bytree: float = 0.8,
        min_child_weight: float = 1.0,
        reg_lambda: float = 1.0,
        n_jobs: int = 2,
        random_state: int = 0,
        device: str = "auto",
    ):
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.min_child_weight = min_child_weight
        self.reg_lambda = reg_lambda
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.device = device

    def _validate_params(self) -> None:
        check_int("n_estimators", self.n_estimators, 1)
        check_int("max_depth", self.max_depth, 1)
        check_int("n_jobs", self.n_jobs, 1)
        check_int("random_state", self.random_state, 0)
        check_fraction("subsample", self.subsample)
        check_fraction("colsample_bytree", self.colsample_bytree)
        for name in ("learning_rate", "min_child_weight", "reg_lambda"):
            check_nonnegative(name, getattr(self, name))
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.device not in DEVICE_CHOICES:
            raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {self.device!r}")

    def fit(self, X, y):
        """Fit on feature rows ``X`` (n_rows, n_features) and labels ``y``.

        Raises
        ------
        ValueError
            On bad parameters, non-finite features, mismatched lengths, or
            fewer than two classes.
        DeviceUnavailableError
            If ``device="cuda"`` and the booster did not train on a GPU.
        """
        import xgboost

        X, y, encoder = self._training_data(X, y)
        device = self.device
        if device == "auto":
            device = resolve_xgboost_device("auto").device
        model = xgboost.XGBClassifier(**self.booster_params(device), n_jobs=self.n_jobs)
        model.fit(X, encoder.transform(y))
        used = booster_device(model.get_booster())
        if device == "cuda" and not used.startswith("cuda"):
            raise DeviceUnavailableError(f"XGBoost was asked for device='cuda' but trained on {used!r}")
        self.booster_ = model
        self.classes_ = encoder.classes_
        self.device_ = used
        return self

    def _training_data(self, X, y):
        """Validated ``(X float32, y, fitted LabelEncoder)``; at least two classes."""
        self._validate_params()
        return training_data(self, X, y)

    def booster_params(self, device: str) -> dict:
        """Keyword arguments of the XGBoost estimator (local or Dask) on ``device``."""
        return dict(
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            learning_rate=self.learning_rate,
            subsample=self.subsample,
            colsample_bytree=self.colsample_bytree,
            min_child_weight=self.min_child_weight,
            reg_lambda=self.reg_lambda,
            random_state=self.random_state,
            tree_method="hist",
            device=device,
        )

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (n_rows, n_classes), columns = ``classes_``."""
        check_is_fitted(self)
        # reset=False checks the feature count against fit (clear message on mismatch).
        X = validate_data(self, X, dtype=np.float32, ensure_all_finite=True, reset=False)
        with warnings.catch_warnings():
            # A GPU booster predicting from host memory warns about copying; harmless.
            warnings.filterwarnings("ignore", message=".*mismatched devices.*")
            return np.asarray(self.booster_.predict_proba(X), dtype=np.float64)

    def predict(self, X) -> np.ndarray:
        """Most probable class label per row."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class SignedSquareRoot(TransformerMixin, BaseEstimator):
    """Power normalisation ``sign(x) * sqrt(|x|)`` of every feature (stateless).

    Pooled CNN activations are heavy-tailed: a few channels fire strongly on a few images.
    The square root compresses those bursts so that a linear model weighs many moderate
    activations rather than a few large ones (Perronnin et al. 2010, improved Fisher vectors;
    Arandjelovic & Zisserman 2013).  It has no parameters, so fitting it learns nothing from
    the rows it is given.
    """

    def fit(self, X, y=None):
        """Check ``X``; nothing is learnt."""
        validate_data(self, X, dtype=(np.float64, np.float32), ensure_all_finite=True)
        return self

    def transform(self, X) -> np.ndarray:
        """``sign(X) * sqrt(|X|)``, same shape and float dtype."""
        check_is_fitted(self, "n_features_in_")
        X = validate_data(self, X, dtype=(np.float64, np.float32), ensure_all_finite=True, reset=False)
        return np.sign(X) * np.sqrt(np.abs(X))


def make_logreg(C: float = 0.1, max_iter: int = 2000, tol: float = 1e-4, random_state: int = 0,
                signed_sqrt: bool = False) -> Pipeline:
    """Standardised, L2-regularised multinomial logistic regression.

    Parameters
    ----------
    C : float, default=0.1
        Inverse L2 strength; stronger than scikit-learn's 1.0 because the
        ~2000 CNN features are many compared with the number of *images* (the
        40 augmentations of an image are strongly correlated rows, so the
        effective sample size is the image count).
    max_iter : int, default=2000
        lbfgs iterations; standardised inputs converge well within this.
    tol : float, default=1e-4
    random_state : int, default=0
        Unused by lbfgs, set for reproducibility if the solver changes.
    signed_sqrt : bool, default=False
        Put :class:`SignedSquareRoot` before the scaler (classifier ``logreg-sqrt``).

    Returns
    -------
    sklearn.pipeline.Pipeline
        ``[SignedSquareRoot ->] StandardScaler -> LogisticRegression``; the scaler is refitted
        on every training fold with the model, so nothing leaks from test folds.
    """
    if not isinstance(C, numbers.Real) or isinstance(C, bool) or C <= 0:
        raise ValueError(f"C must be a positive number, got {C!r}")
    check_int("max_iter", max_iter, 1)
    steps = [("sqrt", SignedSquareRoot())] if signed_sqrt else []
    return Pipeline(
        steps + [
            ("scale", StandardScaler()),
            ("logreg", LogisticRegression(C=C, max_iter=max_iter, tol=tol, random_state=random_state)),
        ]
    )


def make_classifier(name: str, *, seed: int = 0, n_jobs: int = 2, device: str = "auto"):
    """Build an unfitted classifier by name with the documented defaults.

    Parameters
    ----------
    name : {"xgboost", "logreg", "logreg-sqrt", "xgboost-es", "lightgbm", "mil"}
        ``xgboost-es`` and ``lightgbm``: :mod:`classifiers.feature.boosting`, whose ``fit`` takes
        ``groups`` for the inner split of early stopping.  ``mil``: :class:`classifiers.feature.mil.AttentionMILClassifier`, which takes bags
        ``(n_rows, n_instances, n_features)`` and ``groups`` in ``fit``.
    seed : int
        Random seed passed to the estimator.
    n_jobs : int
        Threads for XGBoost and LightGBM (logistic regression with lbfgs is single-threaded).
    device : {"auto", "cpu", "cuda"}
        XGBoost device (``xgboost``, ``xgboost-es``); pass a resolved ``"cpu"``/``"cuda"`` when fitting many
        times.

    Returns
    -------
    estimator
        An unfitted scikit-learn compatible classifier.
    """
    if name == "xgboost":
        return XGBoostFeatureClassifier(random_state=seed, n_jobs=n_jobs, device=device)
    if name == "xgboost-es":
        from classifiers.feature.boosting import XGBoostEarlyStoppingClassifier

        return XGBoostEarlyStoppingClassifier(random_state=seed, n_jobs=n_jobs, device=device)
    if name == "lightgbm":
        from classifiers.feature.boosting import LightGBMFeatureClassifier

        return LightGBMFeatureClassifier(random_state=seed, n_jobs=n_jobs)
    if name in ("logreg", "logreg-sqrt"):
        return make_logreg(random_state=seed, signed_sqrt=name == "logreg-sqrt")
    if name == "mil":
        from classifiers.feature.mil import AttentionMILClassifier

        return AttentionMILClassifier(random_state=seed)
    raise ValueError(f"unknown classifier {name!r}; choose from {CV_CLASSIFIER_NAMES}")
