"""The extraction config: everything that changes the features, hashed to key the store."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from data.files import package_version as installed_version
from data.files import software_versions
from features.pooling import POOLINGS, parse_instances

MODES = ("exact", "shared", "whole")
PRECISIONS = ("float32", "bfloat16")
ENGINES = ("keras", "openvino")
COLOR_AUGMENTATIONS = ("rgb", "hed")  # features.augment: ColorAugmentation, HEDAugmentation

# Bump when the meaning of stored features changes without any config field changing.
FEATURE_FORMAT_VERSION = 1

# Recorded for people but left out of the hash: they do not change a single number (the
# weights are identified by their file hash, whichever way the user named the file).
_DESCRIPTIVE = ("weights", "weights_file", "package_version", "versions")

# Fields added after format 1, left out of the hash at the value that reproduces what was
# computed before they existed, so existing stores keep their keys.
_OMITTED_AT = {"mode": "exact", "precision": "float32", "batch_size": 8, "engine": "keras",
               "instances": "none", "color_augmentation": "rgb", "hed_sigma": 0.05}


@dataclass(frozen=True)
class ExtractionConfig:
    """Full, resolved description of how a feature store was made.

    Parameters
    ----------
    backbone : registry name (see ``features.backbones.BACKBONES``).
    weights : ``"imagenet"``, ``"none"`` (random init seeded by ``seed``) or a file path.
    weights_sha256 : hash of the weights file actually loaded (``None`` for ``"none"``).
    augmentations, crops, crop_size : colour augmentations per image, crops per augmentation,
        crop side in pixels after scaling.
    scale : resize factor applied to each image before anything else.
    pooling : how crop features become one vector per augmented image.
    mode : ``"exact"`` runs the backbone on every crop; ``"shared"`` runs it once per augmented
        image and average-pools each crop's window of the feature map
        (``features.feature_maps``); ``"whole"`` averages the whole augmented image's map (no
        crops: ``crops`` is 1 and ``crop_size`` 0).
    instances : ``"none"`` (one vector per augmented image), or ``"cells-AxB"`` (whole mode
        only) to keep, beside that vector, the feature map averaged over a grid of A x B cells
        (A along the image's longer side): the instances of a bag for multiple-instance
        classifiers (``features.pooling.parse_instances``).  The vector of a record is then the
        mean of its instances.
    precision : ``"float32"``, or ``"bfloat16"`` to run the backbone under Keras'
        ``mixed_bfloat16`` policy (weights stay float32, features are returned as float32).
    engine : ``"keras"`` (TensorFlow; GPU when present) or ``"openvino"`` (the backbone's Keras
        model converted to OpenVINO, CPU; ``features.openvino_engine``).  Part of the key: the
        two engines' features agree to float tolerance, not bit for bit.
    stain : Macenko state (``reference``, ``reference_sha256``, ``stain_matrix``,
        ``max_concentrations``) or ``None`` to skip normalisation.
    seed : root of every random draw, in ``[0, 2**32)``.
    batch_size : crops (augmented images in shared/whole mode) per forward pass.  Part of the
        key: the backbone's arithmetic, hence the last bits of every feature, depends on the
        batch shape, so a store is extracted, resumed and reproduced (``predict``) with one size.
    color_augmentation : ``"rgb"`` (an affine transform of each RGB channel, ranges
        ``color_gain`` and ``color_shift``) or ``"hed"`` (an affine transform of each stain's
        concentration after colour deconvolution, Tellez et al. 2019, range ``hed_sigma``);
        ``features.augment``.
    color_gain, color_shift : ranges of the rgb colour augmentation.
    hed_sigma : range of the hed colour augmentation (0.05: Tellez et al.'s HED-light).
    versions : :func:`software_versions` of the machine that made the config (recorded, not
        hashed: features depend on them in their last bits, so ``predict`` warns when they differ).
    """

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    weights_sha256: str | None = None
    weights_file: str | None = None
    augmentations: int = 40
    crops: int = 20
    crop_size: int = 750
    scale: float = 0.5
    pooling: str = "mean"
    mode: str = "exact"
    instances: str = "none"
    precision: str = "float32"
    stain: dict | None = None
    seed: int = 0
    color_gain: float = 0.1
    color_shift: float = 20.0
    color_augmentation: str = "rgb"
    hed_sigma: float = 0.05
    batch_size: int = 8
    engine: str = "keras"
    feature_format: int = FEATURE_FORMAT_VERSION
    package_version: str = field(default_factory=installed_version)
    versions: dict = field(default_factory=lambda: software_versions())

    def __post_init__(self):
        checks = [
            (self.augmentations >= 1, "augmentations must be >= 1"),
            (self.crops >= 1, "crops must be >= 1"),
            (self.crop_size >= 16 or self.mode == "whole", "crop_size must be >= 16 pixels"),
            (self.mode != "whole" or (self.crops, self.crop_size) == (1, 0),
             "mode 'whole' has no crops: crops must be 1 and crop_size 0"),
            (0 < self.scale <= 4, "scale must be in (0, 4]"),
            (self.pooling in POOLINGS, f"pooling must be one of {', '.join(POOLINGS)}"),
            (self.mode in MODES, f"mode must be one of {', '.join(MODES)}"),
            (self.instances == "none" or self.mode == "whole",
             f"`instances={self.instances}` needs `mode=whole` (the instances are cells of the whole image's map)"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.engine in ENGINES, f"engine must be one of {', '.join(ENGINES)}"),
            (0 <= self.color_gain < 1, "color_gain must be in [0, 1)"),
            (0 <= self.color_shift <= 128, "color_shift must be in [0, 128]"),
            (self.color_augmentation in COLOR_AUGMENTATIONS,
             f"color_augmentation must be one of {', '.join(COLOR_AUGMENTATIONS)}"),
            (0 <= self.hed_sigma < 1, "hed_sigma must be in [0, 1)"),
            # An option of the other augmentation would split the store key for nothing.
            (self.color_augmentation == "hed" or self.hed_sigma == type(self).hed_sigma,
             "hed_sigma applies to color_augmentation 'hed' only"),
            (self.color_augmentation == "rgb"
             or (self.color_gain, self.color_shift) == (type(self).color_gain, type(self).color_shift),
             "color_gain and color_shift apply to color_augmentation 'rgb' only"),
            (isinstance(self.seed, int) and 0 <= self.seed < 2**32, "seed must be in [0, 2**32)"),
            (isinstance(self.batch_size, int) and self.batch_size >= 1, "batch_size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid extraction config: {message}")
        try:
            parse_instances(self.instances)
        except ValueError as exc:
            raise ValueError(f"invalid extraction config: {exc}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "ExtractionConfig":
        """Rebuild from ``config.json``; unknown keys are an error (another version made it)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known - {"config_hash"})
        if unknown:
            raise ValueError(
                f"config has fields this version does not know: {unknown}; it was written by "
                f"another version of the package ({record.get('package_version', '?')})"
            )
        # A record from before versions were recorded: unknown, not this machine's.
        return cls(**{"versions": {}, **{k: v for k, v in record.items() if k in known}})

    def hashed_dict(self) -> dict:
        return {
            k: v for k, v in self.to_dict().items()
            if k not in _DESCRIPTIVE and not (k in _OMITTED_AT and v == _OMITTED_AT[k])
        }

    @property
    def config_hash(self) -> str:
        canonical = json.dumps(self.hashed_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def sampling(self) -> str:
        """What the backbone sees per augmentation, for logs: crops, or the whole image."""
        colour = "" if self.color_augmentation == "rgb" else f" (HED, sigma {self.hed_sigma})"
        if self.mode == "whole":
            cells = "" if self.instances == "none" else f" ({self.instances} instances)"
            return f"{self.augmentations} augmentations{colour} x whole image{cells}, scale {self.scale}"
        return (f"{self.augmentations} augmentations{colour} x {self.crops} crops of {self.crop_size} px "
                f"({self.mode}), scale {self.scale}")

    @property
    def store_name(self) -> str:
        """Directory name of this config inside a store root."""
        return f"{self.backbone}-{self.config_hash[:12]}"
