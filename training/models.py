"""Backbones: a torchvision classification model with its head replaced for our classes."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from training.config import FREEZE_POLICIES, SUPPORTED_ARCHS, ConfigError
from training.version import ModelVersion

log = logging.getLogger(__name__)


def available_archs() -> list[str]:
    """Every torchvision classification model name (SUPPORTED_ARCHS are the tested ones)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """Refuse an arch torchvision does not have, naming the tested ones; raises ConfigError.

    Config validation knows only the static SUPPORTED_ARCHS (it must not import torch);
    any other torchvision classification model is checked here, before training starts.
    """
    if arch not in SUPPORTED_ARCHS and arch not in available_archs():
        raise ConfigError(f"arch={arch!r} is not a torchvision classification model; "
                          f"use one of {', '.join(SUPPORTED_ARCHS)} (or see "
                          f"torchvision.models.list_models())")


def _head_attr(model: nn.Module) -> str:
    for name in ("classifier", "fc", "heads", "head"):
        if hasattr(model, name):
            return name
    raise ValueError(f"{type(model).__name__} has no classifier/fc/heads/head to replace")


def _replace_head(model: nn.Module, num_classes: int, dropout: float) -> None:
    """Swap the final Linear for ``Dropout(dropout) -> Linear(in, num_classes)``."""
    attr = _head_attr(model)
    head = getattr(model, attr)
    if isinstance(head, nn.Linear):
        setattr(model, attr, nn.Sequential(nn.Dropout(dropout),
                                           nn.Linear(head.in_features, num_classes)))
        return
    layers = list(head.children())
    last = max(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    # The torchvision heads we replace already end in Dropout -> Linear; keep what comes
    # before the Linear but make sure exactly one Dropout(dropout) precedes the new one.
    before = [m for m in layers[:last] if not isinstance(m, nn.Dropout)]
    new = nn.Sequential(*before, nn.Dropout(dropout),
                        nn.Linear(layers[last].in_features, num_classes))
    setattr(model, attr, new)


def feature_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone's blocks in input order, the unit the ``first_n_blocks`` policy counts."""
    if hasattr(model, "features"):
        return list(model.features.children())
    head = _head_attr(model)
    return [m for name, m in model.named_children() if name != head]


def apply_freeze(model: nn.Module, policy: str, n_blocks: int) -> None:
    """Freeze parameters by policy: the first ``n_blocks`` feature blocks, none, or all
    but the classifier head."""
    if policy not in FREEZE_POLICIES:
        raise ValueError(f"freeze={policy!r}; allowed: {', '.join(FREEZE_POLICIES)}")
    if policy == "none":
        return
    if policy == "all_but_head":
        head = getattr(model, _head_attr(model))
        head_params = {id(p) for p in head.parameters()}
        for p in model.parameters():
            p.requires_grad = id(p) in head_params
        return
    for block in feature_blocks(model)[:n_blocks]:
        for p in block.parameters():
            p.requires_grad = False


def _imagenet_weights(arch: str):
    """The torchvision weights enum for ``arch``; downloads into ``$TORCH_HOME`` once."""
    weights = torchvision.models.get_model_weights(arch).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as e:  # URLError, socket errors, hash mismatch...
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"cannot load ImageNet weights for {arch} ({weights.url}): {e}. "
            f"Either connect to the internet once, or copy {Path(weights.url).name} into "
            f"{hub} (TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}), "
            f"or train with --weights none / --weights path/to/state_dict.pth") from e


def build_model(arch: str, num_classes: int, weights: str = "none",
                freeze: str = "none", freeze_blocks: int = 10,
                dropout: float = 0.2) -> nn.Module:
    """A torchvision ``arch`` with ImageNet/none/file weights and a ``num_classes`` head.

    ``weights`` is ``imagenet``, ``none`` or the path of a ``state_dict`` saved by torch
    (either a full model of the same arch and classes, or an ImageNet-shaped backbone).
    """
    if arch not in available_archs():
        raise ValueError(f"unknown arch {arch!r}; supported: {', '.join(SUPPORTED_ARCHS)} "
                         f"(or any torchvision classification model)")
    model = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_weights(arch))
        _replace_head(model, num_classes, dropout)
    elif weights == "none":
        _replace_head(model, num_classes, dropout)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        try:  # a backbone saved before its head was replaced (ImageNet-shaped)
            model.load_state_dict(state)
            _replace_head(model, num_classes, dropout)
        except RuntimeError:
            _replace_head(model, num_classes, dropout)
            model.load_state_dict(state)
    apply_freeze(model, freeze, freeze_blocks)
    return model


def load_eager(version: ModelVersion) -> nn.Module:
    """Rebuild a version's model from ``model.pth`` (weights only, no pickle), eval mode."""
    model = build_model(version.config["arch"], version.config["num_classes"], weights="none")
    state = torch.load(version.path / "model.pth", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor | np.ndarray]) -> nn.Module:
    """Set every BatchNorm's running statistics to the plain average over ``batches``
    (train-mode forward passes, no gradient), then return the model in eval mode.

    Random-weight models answer every image alike with the default statistics; a few real
    (or random) batches make their answers depend on the image. Batches of one are skipped:
    BatchNorm cannot take statistics over a single sample.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the calibration batches
    model.train()
    for batch in batches:
        if len(batch) > 1:
            model(torch.as_tensor(batch))
    return model.eval()
