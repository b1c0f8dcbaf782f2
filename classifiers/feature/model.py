"""The deep-feature model (CNN features + XGBoost / logistic regression) as a :class:`~classifiers.protocol.Model`.

::

    model = FeatureModel(TrainConfig(scheme="binary", classifier="logreg")).fit(dataset)
    model.save("runs/model")
    result = FeatureModel.load("runs/model").predict_images(["new/image.png"])

Training and the file format are :mod:`classifiers.feature.model_io`'s, prediction
:mod:`classifiers.feature.predict`'s; this class puts them behind the one protocol.
"""
from __future__ import annotations

from pathlib import Path

from classifiers.feature.model_io import TrainConfig, TrainedModel, load_model, save_model, train_model


class FeatureModel:
    """Deep features + classifier.

    Parameters
    ----------
    config : TrainConfig, optional
        How :meth:`fit` trains (default ``TrainConfig()``).
    trained : TrainedModel, optional
        A fitted model (what :meth:`fit` and :meth:`load` set).
    """

    kind = "features"

    def __init__(self, config: TrainConfig | None = None, trained: TrainedModel | None = None):
        self.config = config or TrainConfig()
        self.trained = trained

    @property
    def classes(self) -> tuple:
        return self._fitted().classes

    def _fitted(self) -> TrainedModel:
        if self.trained is None:
            raise ValueError("this FeatureModel is not fitted; call fit(dataset) or FeatureModel.load(directory)")
        return self.trained

    def fit(self, data, *, client=None) -> "FeatureModel":
        """Fit on every image of ``data`` (:class:`~classifiers.evaluation.cv_dataset.CVDataset`,
        from :func:`classifiers.build_dataset`); ``client``: a dask client to train XGBoost on."""
        self.config.validate()
        self.trained = train_model(data, self.config, client=client)
        return self

    def predict_images(self, inputs, *, weights=None, batch_size: int | None = None, progress: bool = False,
                       mapping=None):
        """Extract every image of ``inputs`` (files or folders) with the model's own extraction
        configs and vote over its augmentations (:func:`classifiers.feature.predict.predict_images`).

        ``weights``: ``{backbone: file}`` instead of the default weights location; checked
        against the model's records before any image is read.  ``mapping``: a
        :class:`data.mapping.LabelScheme` to read the predictions through as well (another
        data set's classes); the model's groupings are always added (``prediction_<level>``)."""
        from classifiers.feature.predict import predict_images, reproducible_configs
        from classifiers.predictions import predict_inputs

        configs = reproducible_configs(self._fitted(), weights)  # a model we cannot apply fails before any input check
        self.check_mapping(mapping)
        return predict_inputs(inputs, lambda paths: predict_images(self.trained, paths, weights=weights,
                                                                   batch_size=batch_size, progress=progress,
                                                                   mapping=mapping, configs=configs))

    def check_mapping(self, mapping) -> list:
        """The levels predictions are read in (:func:`classifiers.evaluation.levels.prediction_levels`);
        raises ``ValueError`` when `mapping` fits neither the classes nor a grouping."""
        from classifiers.evaluation.levels import prediction_levels

        return prediction_levels(*self._fitted().scheme_objects(), mapping)

    def predict_dataset(self, data, *, mapping=None, weights=None, batch_size: int | None = None,
                        progress: bool = False):
        """Predict a labelled data set (:func:`data.datasets.load_dataset`); returns the
        :class:`~classifiers.predictions.PredictionResult` (with ``truth``, ``group``...) and the
        accuracy table (:func:`classifiers.feature.predict.predict_dataset`)."""
        from classifiers.feature.predict import predict_dataset, reproducible_configs

        configs = reproducible_configs(self._fitted(), weights)
        self.check_mapping(mapping)
        return predict_dataset(self.trained, data, mapping=mapping, weights=weights, batch_size=batch_size,
                               progress=progress, configs=configs)

    def heatmaps(self, *, window=None, step=None, exact: bool = False, whole_image: str = "model", weights=None,
                 batch_size: int = 8, **_):
        """Windows pooled from one backbone map per image (``exact``: each through the backbone)."""
        from classifiers.model_heatmaps import FeatureModelHeatmaps

        return FeatureModelHeatmaps(self._fitted(), window=window, step=step, exact=exact,
                                    whole_image=whole_image, weights=weights, batch_size=batch_size)

    def save(self, directory, *, overwrite: bool = False) -> Path:
        """Write the model directory (:func:`classifiers.feature.model_io.save_model`)."""
        return save_model(self._fitted(), directory, overwrite=overwrite)

    @classmethod
    def load(cls, directory) -> "FeatureModel":
        """Read a model directory; the config is the one it was trained with."""
        trained = load_model(directory)
        training = trained.training
        config = TrainConfig(scheme=trained.scheme, classifier=trained.classifier,
                             fusion=trained.fusion if trained.fusion != "single" else "concat",
                             seed=int(training.get("seed", 0)), tune="chosen_params" in training)
        return cls(config, trained)
