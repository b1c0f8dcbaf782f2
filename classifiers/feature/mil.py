"""Attention-based multiple-instance pooling (Ilse et al. 2018, gated attention) on bags of
instance features: each augmented image is a bag of the cells of its feature map
(``features.store`` instance stores, ``--instances cells-AxB``).

The network is the small one of Ilse et al. (and CLAM's single-branch head): standardised
instances, a dense projection, gated attention (``tanh`` and ``sigmoid`` branches multiplied,
one score per instance, softmax over the bag), the attention-weighted mean of the projected
instances, dropout, and a softmax layer.  It learns which cells of an image to trust instead of
averaging them all (``mean``) or favouring strong responses (``pnorm3``).

Hand-written rather than taken from a library: no well-kept scikit-learn-style MIL estimator
exists for Keras, and the network is twenty lines; the training loop is explicit so that every
random draw comes from the given seed (a rerun gives the same numbers).
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.preprocessing import LabelEncoder
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted


def _check_number(name, value, low, high=None, *, integer=False, open_low=False):
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool)
    ok = ok and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + ("" if high is None else f" and <= {high}")
        raise ValueError(f"`{name}` must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")


def check_bags(X, where: str = "X") -> np.ndarray:
    """``X`` as a float32 ``(n_bags, n_instances, n_features)`` array of finite values."""
    X = np.asarray(X, dtype=np.float32)
    if X.ndim != 3 or 0 in X.shape:
        raise ValueError(f"{where} must be bags of instances, shape (n_bags, n_instances, n_features), got "
                         f"shape {X.shape}; extract an instance store (pipeline.extract --mode whole "
                         "--instances cells-4x3)")
    if not np.isfinite(X).all():
        raise ValueError(f"{where} holds non-finite values")
    return X


class AttentionMILClassifier(ClassifierMixin, BaseEstimator):
    """Gated-attention multiple-instance classifier (Ilse et al. 2018) on bags of features.

    Parameters
    ----------
    hidden : int, default=128
        Units of the instance projection (ReLU).
    attention : int, default=64
        Units of each attention branch.
    dropout : float, default=0.25
        Dropout on the projected instances and on the pooled bag vector.
    weight_decay : float, default=1e-4
        Decoupled weight decay of AdamW.
    learning_rate : float, default=1e-3
    max_epochs : int, default=40
        Epochs at most; with ``validation_fraction`` the number is chosen by early stopping.
    batch_size : int, default=32
        Bags per step.
    validation_fraction : float, default=0.2
        Share of the training bags held out, grouped (all bags of a group, e.g. the colour
        augmentations of one image, on one side) and stratified: training stops when their loss
        has not decreased for ``patience`` epochs and the weights of the epoch of lowest loss are
        kept (early stopping, as Ilse et al. and CLAM do).  0: train ``max_epochs`` on all bags,
        no inner split.
    refit : bool, default=False
        With the inner split, train a fresh network on all bags for the chosen number of epochs
        (uses every bag, twice the time) instead of keeping the early-stopped one.
    patience : int, default=8
        Epochs without a lower validation loss before stopping.
    random_state : int, default=0
        Seed of the initial weights, dropout, the inner split and the batch order.

    Attributes
    ----------
    classes_ : ndarray
    n_features_in_ : int
    n_epochs_ : int
        Epochs of the kept network (chosen on the inner split, else ``max_epochs``).
    history_ : dict
        ``train_loss`` and (with the inner split) ``val_loss`` per epoch of the search.
    model_ : keras.Model
    """

    def __init__(self, hidden: int = 128, attention: int = 64, dropout: float = 0.25,
                 weight_decay: float = 1e-4, learning_rate: float = 1e-3, max_epochs: int = 40,
                 batch_size: int = 32, validation_fraction: float = 0.2, refit: bool = False,
                 patience: int = 8, random_state: int = 0):
        self.hidden = hidden
        self.attention = attention
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.learning_rate = learning_rate
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.refit = refit
        self.patience = patience
        self.random_state = random_state

    def _validate_params(self) -> None:
        if not isinstance(self.refit, (bool, np.bool_)):
            raise ValueError(f"`refit` must be True or False, got {self.refit!r}")
        for name in ("hidden", "attention", "max_epochs", "batch_size", "patience"):
            _check_number(name, getattr(self, name), 1, integer=True)
        _check_number("random_state", self.random_state, 0, integer=True)
        _check_number("dropout", self.dropout, 0, 0.9)
        _check_number("weight_decay", self.weight_decay, 0)
        _check_number("learning_rate", self.learning_rate, 0, open_low=True)
        _check_number("validation_fraction", self.validation_fraction, 0, 0.5)

    # -- network ------------------------------------------------------------------------------

    def _build(self, mean, variance, n_classes: int):
        import keras
        from keras import layers

        seed = int(self.random_state)
        init = [keras.initializers.GlorotUniform(seed=seed + i) for i in range(5)]
        bags = keras.Input((None, len(mean)), name="bags")
        x = layers.Normalization(axis=-1, mean=mean, variance=variance, name="standardise")(bags)
        h = layers.Dense(self.hidden, activation="relu", kernel_initializer=init[0], name="project")(x)
        h = layers.Dropout(self.dropout, seed=seed + 10, name="instance_dropout")(h)
        a = layers.Dense(self.attention, activation="tanh", kernel_initializer=init[1], name="attention_v")(h)
        g = layers.Dense(self.attention, activation="sigmoid", kernel_initializer=init[2], name="attention_u")(h)
        score = layers.Dense(1, kernel_initializer=init[3], name="attention_w")(layers.Multiply()([a, g]))
        weights = layers.Softmax(axis=1, name="attention")(score)  # (bags, instances, 1)
        pooled = layers.Flatten()(layers.Dot(axes=1)([weights, h]))  # sum of weight * instance
        pooled = layers.Dropout(self.dropout, seed=seed + 11, name="bag_dropout")(pooled)
        out = layers.Dense(n_classes, activation="softmax", kernel_initializer=init[4], name="classes")(pooled)
        model = keras.Model(bags, out, name="attention_mil")
        model.compile(optimizer=keras.optimizers.AdamW(self.learning_rate, weight_decay=self.weight_decay),
                      loss="sparse_categorical_crossentropy")
        return model

    def _train(self, X, y, epochs: int, rng, X_val=None, y_val=None):
        """Train a fresh network; returns it and the per-epoch losses (the best epoch's weights
        restored when a validation set is given)."""
        flat = X.reshape(-1, X.shape[-1]).astype(np.float64)
        model = self._build(flat.mean(0), np.maximum(flat.var(0), 1e-6), len(self.classes_))
        history, best, best_weights, since = {"train_loss": [], "val_loss": []}, np.inf, None, 0
        for _epoch in range(epochs):
            order, losses = rng.permutation(len(X)), []
            for start in range(0, len(X), self.batch_size):
                batch = order[start:start + self.batch_size]
                losses.append(float(np.asarray(model.train_on_batch(X[batch], y[batch]))))
            history["train_loss"].append(float(np.mean(losses)))
            if X_val is None:
                continue
            loss = _log_loss(self._proba(model, X_val), y_val)
            history["val_loss"].append(loss)
            if loss < best - 1e-6:
                best, best_weights, since = loss, model.get_weights(), 0
            else:
                since += 1
                if since >= self.patience:
                    break
        if best_weights is not None:
            model.set_weights(best_weights)
        return model, history

    @staticmethod
    def _proba(model, X, chunk: int = 256) -> np.ndarray:
        return np.concatenate([np.asarray(model.predict_on_batch(X[i:i + chunk]), dtype=np.float64)
                               for i in range(0, len(X), chunk)])

    # -- scikit-learn API ----------------------------------------------------------------------

    def fit(self, X, y, groups=None):
        """Fit on bags ``X`` ``(n_bags, n_instances, n_features)`` and bag labels ``y``.

        Parameters
        ----------
        groups : array-like (n_bags,), optional
            Group of every bag (the image, or patient): the inner split keeps a group on one
            side.  Required when ``validation_fraction > 0``.
        """
        import keras

        self._validate_params()
        X = check_bags(X)
        y = np.asarray(y)
        if len(y) != len(X):
            raise ValueError(f"X has {len(X)} bags but y has {len(y)} labels")
        check_classification_targets(y)
        encoder = LabelEncoder().fit(y)
        if len(encoder.classes_) < 2:
            raise ValueError(f"AttentionMILClassifier needs at least 2 classes in y, got {encoder.classes_.tolist()}")
        self.classes_, self.n_features_in_ = encoder.classes_, X.shape[-1]
        codes = encoder.transform(y).astype(np.int32)
        keras.utils.set_random_seed(int(self.random_state))  # TF ops' own seeds; weights are seeded above
        rng = np.random.default_rng(self.random_state)
        if self.validation_fraction == 0:
            self.model_, self.history_ = self._train(X, codes, self.max_epochs, rng)
            self.n_epochs_ = self.max_epochs
            return self
        train, val = self._inner_split(codes, groups, rng)
        self.model_, self.history_ = self._train(X[train], codes[train], self.max_epochs, rng, X[val], codes[val])
        self.n_epochs_ = int(np.argmin(self.history_["val_loss"])) + 1
        if self.refit:
            self.model_, _ = self._train(X, codes, self.n_epochs_, rng)
        return self

    def _inner_split(self, codes, groups, rng):
        if groups is None:
            raise ValueError("AttentionMILClassifier.fit needs `groups` (the image of every bag) for its inner "
                             "split, or validation_fraction=0")
        groups = np.asarray(groups)
        if len(groups) != len(codes):
            raise ValueError(f"groups has {len(groups)} entries for {len(codes)} bags")
        n_splits = max(2, int(round(1 / self.validation_fraction)))
        splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=int(rng.integers(2**31)))
        train, val = next(splitter.split(np.zeros(len(codes)), codes, groups))
        return train, val

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities ``(n_bags, n_classes)``, columns in ``classes_`` order."""
        check_is_fitted(self, "model_")
        X = check_bags(X)
        if X.shape[-1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[-1]} features per instance, the model was fitted on "
                             f"{self.n_features_in_}")
        return self._proba(self.model_, X)

    def predict(self, X) -> np.ndarray:
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def attention_weights(self, X) -> np.ndarray:
        """Attention of every instance in its bag, ``(n_bags, n_instances)``, rows summing to 1."""
        import keras

        check_is_fitted(self, "model_")
        X = check_bags(X)
        inner = keras.Model(self.model_.input, self.model_.get_layer("attention").output)
        return np.asarray(inner.predict_on_batch(X), dtype=np.float64)[..., 0]


def _log_loss(proba: np.ndarray, codes: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(proba[np.arange(len(codes)), codes], 1e-12, 1.0))))
