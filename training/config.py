"""Training configuration: one dataclass, loaded from YAML, overridden from the CLI, validated
up front so a bad value costs one clear line and exit code 2, not a crash at epoch 3."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from serving.preprocess import IMAGENET_MEAN, IMAGENET_STD, PreprocessSpec
from training.imagefolder import count_images_per_class

# The tested backbones. Validation here stays torch-free; any other torchvision
# classification model is checked by training.models.check_arch when training starts.
SUPPORTED_ARCHS = ("mobilenet_v2", "efficientnet_b0", "resnet50")
FREEZE_POLICIES = ("first_n_blocks", "none", "all_but_head")
DATASETS = ("imagefolder", "food101")
WEIGHTS_KEYWORDS = ("imagenet", "none")
OPTIMIZERS = ("adam", "adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda", "mps")
LR_SCALINGS = ("none", "linear")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names it and what is allowed."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved with the run and the model version."""

    # what to train on
    dataset: str = "imagefolder"  # imagefolder (incl. the sample) | food101
    data_dir: str = "data/sample"  # ImageFolder root, or Food-101 download root
    extra_data_dir: str | None = None  # an ImageFolder merged into the dataset's classes
    val_fraction: float = 0.2  # stratified split when the dataset has no split of its own
    # the model
    name: str = "food"  # artifacts/<name>/v<N>, model name in the .mar and the servers
    arch: str = "mobilenet_v2"
    weights: str = "imagenet"  # imagenet | none | path to a state_dict
    freeze: str = "first_n_blocks"  # first_n_blocks | none | all_but_head
    freeze_blocks: int = 10
    dropout: float = 0.2
    # preprocessing (the validation numbers go into model_config.json as the spec)
    resize_size: int = 256
    crop_size: int = 224
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    interpolation: str = "bilinear"
    random_crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    # the loop
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    lr_patience: int = 3
    lr_factor: float = 0.5
    early_stop_patience: int = 5
    seed: int = 42
    workers: int = 2
    device: str = "auto"
    amp: bool = True  # mixed precision, used on CUDA only
    topk: int = 3  # default k of predict and the servers
    # several processes (torchrun): batch_size is per process, the global batch is
    # batch_size * world_size; lr_scaling=linear gives the optimizer lr * world_size
    lr_scaling: str = "none"  # none | linear
    sync_batchnorm: bool = False  # BatchNorm statistics over the global batch (CUDA)
    # where things go
    artifacts_dir: str = "artifacts"
    checkpoint_dir: str = "checkpoints"
    experiment: str = "nutrilearn-food-training"
    registered_model: str = "food-classifier"
    # learning from the app's confirmed labels, and the champion's promotion
    feedback: str | None = None  # feedback store URL (sqlite:///feedback.db): train on it too
    feedback_eval_fraction: float = 0.2  # confirmed photos kept aside for evaluation (seeded)
    feedback_new_classes: bool = False  # a confirmed label outside the classes becomes one
    # most confirmed photos one source (client address) contributes, its newest kept: one
    # client cannot outweigh the rest of the feedback (None: no cap)
    feedback_max_per_source: int | None = None
    promote_min_gain: float = 0.0  # champion moves when the gain on the same set exceeds it

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec(self.resize_size, self.crop_size, tuple(self.mean),
                              tuple(self.std), self.interpolation)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_public_dict(self) -> dict:
        """``to_dict`` with a password in the feedback URL masked: what MLflow params and
        model_config.json record (the checkpoint keeps the real URL for --resume)."""
        from training.feedback_data import redact_url

        values = self.to_dict()
        if values["feedback"]:
            values["feedback"] = redact_url(values["feedback"])
        return values


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, raw: object) -> object:
    """Turn a YAML or command-line value into the field's type, or raise ConfigError."""
    hint = typing.get_type_hints(TrainConfig)[name]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    optional = type(None) in args
    if optional and (raw is None or (isinstance(raw, str) and raw.lower() in ("", "null", "none"))):
        return None
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    try:
        if typing.get_origin(base) is list or origin is list:
            items = raw if isinstance(raw, list) else str(raw).split(",")
            return [float(x) for x in items]
        if base is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        return base(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={raw!r} is not a valid {getattr(base, '__name__', base)}") \
            from None


def parse_overrides(args: list[str]) -> dict[str, object]:
    """``["--epochs", "3", "--lr=1e-3"]`` -> ``{"epochs": "3", "lr": "1e-3"}``."""
    out: dict[str, object] = {}
    it = iter(args)
    for token in it:
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; overrides look like --epochs 3")
        key, _, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not value:
            value = next(it, None)
            if value is None:
                raise ConfigError(f"--{key.replace('_', '-')} needs a value")
        out[key] = value
    return out


def load_config(path: str | os.PathLike | None, overrides: list[str] | dict | None = None,
                resume: bool = False) -> TrainConfig:
    """Read ``path`` (YAML), apply overrides, validate; raises ConfigError."""
    values: dict[str, object] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; see configs/ for examples")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must hold a mapping of config keys, got {type(loaded).__name__}")
        values.update(loaded)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values.update(overrides or {})
    fields = _fields()
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; allowed: "
                          f"{', '.join(fields)}")
    config = TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})
    validate(config, check_data=not resume)
    return config


def validate(config: TrainConfig, check_data: bool = True) -> None:
    """Check every value before any work starts; raises ConfigError naming the bad one.

    Torch-free: an arch outside SUPPORTED_ARCHS only has to look like a model name here;
    ``training.models.check_arch`` asks torchvision for it when training starts.
    """
    c = config
    if c.arch not in SUPPORTED_ARCHS and not re.fullmatch(r"[a-z][a-z0-9_]*", c.arch):
        raise ConfigError(f"arch={c.arch!r} is not a torchvision model name; use one of "
                          f"{', '.join(SUPPORTED_ARCHS)} (or see "
                          f"torchvision.models.list_models())")
    if c.lr <= 0:
        raise ConfigError(f"lr={c.lr} must be > 0")
    for name in ("epochs", "batch_size", "crop_size", "resize_size", "topk"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name}={getattr(c, name)} must be >= 1")
    for name in ("workers", "weight_decay", "lr_patience", "early_stop_patience",
                 "freeze_blocks", "grad_clip"):
        if getattr(c, name) < 0:
            raise ConfigError(f"{name}={getattr(c, name)} must be >= 0")
    if not 0 < c.val_fraction < 1:
        raise ConfigError(f"val_fraction={c.val_fraction} must be between 0 and 1")
    if not 0 <= c.label_smoothing < 1:
        raise ConfigError(f"label_smoothing={c.label_smoothing} must be in [0, 1)")
    if not 0 < c.lr_factor < 1:
        raise ConfigError(f"lr_factor={c.lr_factor} must be in (0, 1)")
    if not 0 <= c.dropout < 1:
        raise ConfigError(f"dropout={c.dropout} must be in [0, 1)")
    if len(c.random_crop_scale) != 2 or not 0 < c.random_crop_scale[0] <= c.random_crop_scale[1] <= 1:
        raise ConfigError(f"random_crop_scale={c.random_crop_scale} must be two numbers "
                          f"0 < lo <= hi <= 1")
    if c.dataset not in DATASETS:
        raise ConfigError(f"dataset={c.dataset!r}; allowed: {', '.join(DATASETS)}")
    if not 0 <= c.feedback_eval_fraction < 1:
        raise ConfigError(f"feedback_eval_fraction={c.feedback_eval_fraction} must be in [0, 1)")
    if c.feedback_max_per_source is not None and c.feedback_max_per_source < 1:
        raise ConfigError(f"feedback_max_per_source={c.feedback_max_per_source} must be >= 1 "
                          f"(or null for no cap)")
    if not -1 < c.promote_min_gain < 1:
        raise ConfigError(f"promote_min_gain={c.promote_min_gain} must be in (-1, 1): an "
                          f"accuracy difference")
    if c.feedback is not None and "://" not in c.feedback:
        raise ConfigError(f"feedback={c.feedback!r} is not a database URL; use e.g. "
                          f"sqlite:///feedback.db or postgresql://user@host/db")
    if c.lr_scaling not in LR_SCALINGS:
        raise ConfigError(f"lr_scaling={c.lr_scaling!r}; allowed: {', '.join(LR_SCALINGS)}")
    if c.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer={c.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    if c.freeze not in FREEZE_POLICIES:
        raise ConfigError(f"freeze={c.freeze!r}; allowed: {', '.join(FREEZE_POLICIES)}")
    if c.device not in DEVICES and not c.device.startswith("cuda:"):
        raise ConfigError(f"device={c.device!r}; allowed: {', '.join(DEVICES)} or cuda:N")
    if c.weights not in WEIGHTS_KEYWORDS and not Path(c.weights).is_file():
        raise ConfigError(f"weights={c.weights!r} is neither one of "
                          f"{', '.join(WEIGHTS_KEYWORDS)} nor an existing state_dict file")
    if not c.name or "/" in c.name or c.name.startswith("."):
        raise ConfigError(f"name={c.name!r} must be a plain directory name")
    try:
        c.spec  # noqa: B018 - PreprocessSpec validates sizes, interpolation, mean/std
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if check_data:
        _validate_data(c)


def _validate_data(c: TrainConfig) -> None:
    """The ImageFolder trees exist and every class has an image to train and one to validate."""
    folders = [("extra_data_dir", c.extra_data_dir)] if c.extra_data_dir else []
    if c.dataset == "imagefolder":
        folders.insert(0, ("data_dir", c.data_dir))
    for key, folder in folders:
        if not Path(folder).is_dir():
            hint = (" (generate the sample with `python -m training sample-data data/sample` "
                    "or `make train`)" if Path(folder) == Path("data/sample") else "")
            raise ConfigError(f"{key}={folder!r} is not a directory{hint}")
        counts = count_images_per_class(Path(folder))
        if not counts:
            raise ConfigError(f"{key}={folder!r} has no class sub-directories with images; "
                              f"expected {folder}/<class>/*.jpg")
        few = {k: n for k, n in counts.items() if n < 2}
        if few:
            raise ConfigError(f"{key}={folder!r}: class(es) with fewer than 2 images: "
                              f"{', '.join(f'{k} ({n})' for k, n in sorted(few.items()))}; "
                              f"every class needs at least 2 (one to train, one to validate)")
