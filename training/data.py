"""Datasets, the train/val split and the transform presets.

Every source (the sample, any ImageFolder tree, Food-101, Food-101 + extra classes) becomes
the same thing: a list of ``(path, class_index)`` samples and a class list. Images are
decoded by ``serving.preprocess.decode_image``, the decoder the servers use, and validated
with the servers' preprocessing, so what the model is judged on is what it will be served.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from serving.preprocess import InputError, PreprocessSpec, decode_image, preprocess
from training.config import TrainConfig
from training.feedback_data import load_feedback
from training.imagefolder import scan_image_folder

log = logging.getLogger(__name__)

Sample = tuple[str, int]


@dataclass
class DataSplits:
    """What training needs from the data: samples per split, class names, what was skipped."""

    train: list[Sample]
    val: list[Sample]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict)
    # confirmed feedback photos kept aside (train --feedback): evaluated apart from ``val``
    feedback_eval: list[Sample] = field(default_factory=list)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}


# ---------------------------------------------------------------- transform presets
def train_transform(spec: PreprocessSpec, scale: tuple[float, float] = (0.08, 1.0)) -> T.Compose:
    """Augmentation: RandomResizedCrop, horizontal flip, colour jitter, normalize."""
    return T.Compose([
        T.RandomResizedCrop(spec.crop_size, scale=tuple(scale),
                            interpolation=T.InterpolationMode(spec.interpolation)),
        T.RandomHorizontalFlip(),
        T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def _eval_tensor(img: Image.Image, spec: PreprocessSpec) -> torch.Tensor:
    return torch.from_numpy(preprocess(img, spec))


def eval_transform(spec: PreprocessSpec):
    """Validation: exactly the serving preprocessing (resize, center crop, normalize).
    A partial, not a closure, so DataLoader workers can pickle it on spawn platforms."""
    return functools.partial(_eval_tensor, spec=spec)


# ---------------------------------------------------------------- datasets
class ImageList(Dataset):
    """``(path, label)`` samples decoded like the servers decode, then transformed.

    A file that fails to decode mid-epoch (it passed the up-front scan) yields ``None`` and
    is dropped by :func:`collate_skipping_none`, so a bad disk block never kills an epoch.
    """

    def __init__(self, samples: list[Sample], transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            img = decode_image(Path(path).read_bytes())
        except (OSError, InputError) as e:
            log.warning("skipping %s: %s", path, e)
            return None
        return self.transform(img), label


def collate_skipping_none(batch):
    """Default collation over the samples that decoded."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.utils.data.default_collate(batch)


def _split(samples: list[Sample], val_fraction: float, seed: int) -> tuple[list, list]:
    """Stratified, seeded split: each class gives ``round(n * val_fraction)`` images to val,
    at least one and never all of them. Done per class (not sklearn's train_test_split,
    which refuses when the val split would have fewer images than there are classes)."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in sorted(samples):
        by_class.setdefault(s[1], []).append(s)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        n_val = min(max(1, round(len(items) * val_fraction)), len(items) - 1)
        val += [items[i] for i in order[:n_val]]
        train += [items[i] for i in order[n_val:]]
    return sorted(train), sorted(val)


def _food101(root: str, split: str):
    """Food-101 through torchvision, downloading (5 GB) on first use."""
    from torchvision.datasets import Food101

    try:
        return Food101(root, split=split, download=True)
    except Exception as e:
        raise RuntimeError(
            f"cannot load Food-101 under {root!r}: {e}. It downloads once (about 5 GB) from "
            f"data.vision.ee.ethz.ch; without internet, copy an extracted food-101/ folder "
            f"(images/ and meta/) into {root!r}") from e


def load_splits(config: TrainConfig) -> DataSplits:
    """Build train/val samples for ``config``: its own split for Food-101, else stratified."""
    skipped: list[str] = []
    if config.dataset == "food101":
        train_ds, test_ds = _food101(config.data_dir, "train"), _food101(config.data_dir, "test")
        classes = list(train_ds.classes)
        # Food101 keeps its file list in _image_files/_labels; it has no public accessor.
        train = [(str(p), int(y)) for p, y in zip(train_ds._image_files, train_ds._labels)]
        val = [(str(p), int(y)) for p, y in zip(test_ds._image_files, test_ds._labels)]
        source = {"dataset": "food101", "root": config.data_dir, "split": "official train/test"}
    else:
        per_class, skipped = scan_image_folder(Path(config.data_dir))
        classes = sorted(per_class)
        samples = [(f, i) for i, c in enumerate(classes) for f in per_class[c]]
        train, val = _split(samples, config.val_fraction, config.seed)
        source = {"dataset": "imagefolder", "root": config.data_dir,
                  "split": f"stratified {1 - config.val_fraction:.0%}/{config.val_fraction:.0%}"
                           f" seed {config.seed}"}
    if config.extra_data_dir:
        extra, extra_skipped = scan_image_folder(Path(config.extra_data_dir))
        skipped += extra_skipped
        for name in sorted(extra):
            if name not in classes:  # a folder named like an existing class joins it
                classes.append(name)
        idx = {c: i for i, c in enumerate(classes)}
        extra_samples = [(f, idx[c]) for c in sorted(extra) for f in extra[c]]
        extra_train, extra_val = _split(extra_samples, config.val_fraction, config.seed)
        train, val = train + extra_train, val + extra_val
        source["extra_data_dir"] = config.extra_data_dir
    feedback_eval: list[Sample] = []
    if config.feedback:  # the app's confirmed photos: most to train on, a seeded slice apart
        feedback = load_feedback(config.feedback, config.name, classes, seed=config.seed,
                                 eval_fraction=config.feedback_eval_fraction,
                                 allow_new_classes=config.feedback_new_classes,
                                 max_per_source=config.feedback_max_per_source)
        classes, train, feedback_eval = feedback.classes, train + feedback.train, feedback.eval
        source["feedback"] = feedback.source
    for path in skipped:
        log.warning("skipped (not a readable image): %s", path)
    if skipped:
        log.warning("skipped %d file(s) that are not readable images", len(skipped))
    source.update(num_classes=len(classes), num_train=len(train), num_val=len(val),
                  num_skipped=len(skipped))
    return DataSplits(train, val, classes, skipped, source, feedback_eval)


def make_loader(samples: list[Sample], transform, batch_size: int, workers: int,
                shuffle: bool, generator: torch.Generator | None = None,
                sampler: torch.utils.data.Sampler | None = None
                ) -> torch.utils.data.DataLoader:
    """A DataLoader over ``samples``; ``generator`` makes shuffling and worker seeds
    reproducible (the train loop re-seeds it every epoch, which is what makes resume exact).
    Shuffled (training) loaders drop a ragged last batch: a batch of one breaks BatchNorm.
    A ``sampler`` (a rank's DistributedSampler share) replaces the loader's own shuffling."""
    n = len(sampler) if sampler is not None else len(samples)
    return torch.utils.data.DataLoader(
        ImageList(samples, transform), batch_size=batch_size,
        shuffle=shuffle if sampler is None else False, sampler=sampler,
        drop_last=shuffle and n > batch_size,
        num_workers=workers, generator=generator, collate_fn=collate_skipping_none,
        persistent_workers=False, pin_memory=torch.cuda.is_available(),
        worker_init_fn=_seed_worker if workers else None)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def dataset_summary(splits: DataSplits) -> dict:
    """What model_config.json records about the data."""
    return {**splits.source, "classes": splits.classes}
