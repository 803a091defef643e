"""The DeepRebirth paper's networks, written as the original Caffe models were.

* :func:`googlenet_lrn`: GoogLeNet v1 (Szegedy et al., 2015) with LRN and without BatchNorm, in the
  layer order of Caffe's BVLC GoogLeNet: conv1 7x7/2, pool1 3x3/2 (ceil), norm1, conv2 1x1 reduce and
  3x3, norm2, pool2 3x3/2 (ceil), inception 3a-3b, pool3, 4a-4e, pool4, 5a-5b, average pooling, dropout
  0.4, fc.
* :func:`alexnet_lrn`: AlexNet (Krizhevsky et al., 2012) in Caffe's order: conv1 11x11/4, relu, norm1,
  pool1 3x3/2; conv2 5x5 (2 groups), relu, norm2, pool2; conv3, conv4 (2 groups), conv5 (2 groups),
  pool5; fc6, fc7 with dropout; fc8.

Both end in adaptive average pooling (GoogLeNet's 7x7 average pooling is exactly that at 224x224;
AlexNet's pool5 output is pooled to 6x6, as torchvision does), so they run at lower input resolutions
for fast training as well as at 224x224. ``width`` scales every layer's channel count.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from fxrebirth.passes.batchnorm import fold_batchnorm_
from fxrebirth.retraining.weights import he_init  # the teacher's initialisation, and the scratch control's

__all__ = ["googlenet_lrn", "alexnet_lrn", "he_init", "fold_batch_norm", "Inception", "INCEPTION_WIDTHS", "MIN_INPUT"]

INCEPTION_WIDTHS = {
    # name: (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) -- Szegedy et al., 2015, Table 1
    "3a": (192, 64, 96, 128, 16, 32, 32),
    "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
    "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}

MIN_INPUT = {"googlenet_lrn": 31, "alexnet_lrn": 67}
"""Smallest square input each network accepts."""


def _w(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class _ConvReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1,
                 batch_norm: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups)
        if batch_norm:
            self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)


class Inception(nn.Module):
    """One inception module: 1x1; 1x1 reduce -> 3x3; 1x1 reduce -> 5x5; 3x3 max-pool -> 1x1 projection."""

    def __init__(self, cin: int, c1: int, r3: int, c3: int, r5: int, c5: int, proj: int,
                 batch_norm: bool = False) -> None:
        super().__init__()
        bn = {"batch_norm": batch_norm}
        self.branch1 = _ConvReLU(cin, c1, 1, **bn)
        self.branch2 = nn.Sequential(_ConvReLU(cin, r3, 1, **bn), _ConvReLU(r3, c3, 3, padding=1, **bn))
        self.branch3 = nn.Sequential(_ConvReLU(cin, r5, 1, **bn), _ConvReLU(r5, c5, 5, padding=2, **bn))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), _ConvReLU(cin, proj, 1, **bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNetLRN(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.4,
                 batch_norm: bool = False) -> None:
        super().__init__()
        bn = {"batch_norm": batch_norm}
        self.conv1 = _ConvReLU(3, _w(64, width), 7, 2, 3, **bn)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.norm1 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)
        self.conv2_reduce = _ConvReLU(_w(64, width), _w(64, width), 1, **bn)
        self.conv2 = _ConvReLU(_w(64, width), _w(192, width), 3, padding=1, **bn)
        self.norm2 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        blocks: dict[str, nn.Module] = {}
        for name, (cin, *rest) in INCEPTION_WIDTHS.items():
            blocks[f"inception{name}"] = Inception(_w(cin, width), *(_w(c, width) for c in rest), **bn)
            if name in ("3b", "4e"):
                blocks[f"pool{3 if name == '3b' else 4}"] = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.blocks = nn.Sequential(OrderedDict(blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(_w(1024, width), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.pool1(self.conv1(x)))
        x = self.pool2(self.norm2(self.conv2(self.conv2_reduce(x))))
        x = self.avgpool(self.blocks(x))
        return self.fc(self.dropout(torch.flatten(x, 1)))


def googlenet_lrn(num_classes: int = 1000, width: float = 1.0, batch_norm: bool = False) -> nn.Module:
    """Caffe's BVLC GoogLeNet (LRN, no BatchNorm), without the auxiliary classifiers.

    ``batch_norm=True`` puts a BatchNorm after every convolution: a trainable stand-in for the auxiliary
    classifiers Caffe needed to train 22 layers without BatchNorm. :func:`fold_batch_norm` folds them
    away afterwards (exactly), leaving the Caffe architecture's state_dict."""
    return GoogLeNetLRN(num_classes, width, batch_norm=batch_norm)


@torch.no_grad()
def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Fold every ``_ConvReLU``'s BatchNorm into its convolution, in place, and remove it
    (:func:`fxrebirth.passes.batchnorm.fold_batchnorm_`: running statistics, so the model must be in eval
    mode to use the result)."""
    for module in model.modules():
        if isinstance(module, _ConvReLU) and hasattr(module, "bn"):
            fold_batchnorm_(module.conv.weight, module.conv.bias, module.bn)
            del module.bn
    return model


class AlexNetLRN(nn.Module):
    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__()
        c = [_w(n, width) for n in (96, 256, 384, 384, 256)]
        if width != 1.0:
            c = [n + n % 2 for n in c]  # the grouped layers need even widths
        self.conv1 = _ConvReLU(3, c[0], 11, 4)
        self.norm1 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)
        self.pool1 = nn.MaxPool2d(3, 2)
        self.conv2 = _ConvReLU(c[0], c[1], 5, padding=2, groups=2)
        self.norm2 = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75)
        self.pool2 = nn.MaxPool2d(3, 2)
        self.conv3 = _ConvReLU(c[1], c[2], 3, padding=1)
        self.conv4 = _ConvReLU(c[2], c[3], 3, padding=1, groups=2)
        self.conv5 = _ConvReLU(c[3], c[4], 3, padding=1, groups=2)
        self.pool5 = nn.MaxPool2d(3, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(6)
        hidden = _w(4096, width)
        self.classifier = nn.Sequential(
            nn.Linear(c[4] * 36, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.norm1(self.conv1(x)))
        x = self.pool2(self.norm2(self.conv2(x)))
        x = self.pool5(self.conv5(self.conv4(self.conv3(x))))
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def alexnet_lrn(num_classes: int = 1000, width: float = 1.0) -> nn.Module:
    """Caffe's BVLC AlexNet (LRN after conv1 and conv2, grouped conv2/4/5)."""
    return AlexNetLRN(num_classes, width)
