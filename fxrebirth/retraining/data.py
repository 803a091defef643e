"""Datasets for retraining: the user's images from local folders (never downloaded), the dataset check
every entry point runs, and the accuracy interval reports quote.

:func:`image_folder` reads an ``ImageFolder`` tree (one sub-folder per class) and :func:`cifar10` reads
CIFAR-10 from a local folder; both return map-style datasets of ``(float tensor [3, H, W], int label)``
with a ``classes`` attribute (so does the embedded :class:`fxrebirth.paper.data.Shapes`).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import torch
from torch.utils.data import Dataset

from fxrebirth.errors import FxRebirthError

__all__ = ["DataError", "image_folder", "cifar10", "check_dataset", "accuracy_interval"]


class DataError(FxRebirthError):
    """A dataset cannot be used as given (empty, missing, wrong image size, labels out of range)."""


def image_folder(path: str | os.PathLike, size: int = 224, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, channels: int = 3) -> Dataset:
    """An ``ImageFolder`` tree (``path/<class>/<image>``), each image converted to ``channels`` (3: RGB, 1: grey),
    resized and centre-cropped to ``size`` and normalised with ``mean`` and ``std`` (1 value or one per channel;
    default the ImageNet statistics). :func:`fxrebirth.retraining.folders.user_data` also splits and checks."""
    import functools

    import torchvision
    from torchvision import transforms

    if not os.path.isdir(path):
        raise DataError(f"image folder {str(path)!r} does not exist")
    if channels not in (1, 3):
        raise DataError(f"image folder {str(path)!r}: images convert to 1 or 3 channels, not {channels}")
    default = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if channels == 3 else ((0.449,), (0.226,))
    mean, std = (tuple(mean), tuple(std)) if mean is not None and std is not None else default
    mean, std = (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"image folder {str(path)!r}: give 1 or {channels} values of mean and std")
    transform = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(), transforms.Normalize(mean, std),
    ])
    loader = functools.partial(_open_image, mode="RGB" if channels == 3 else "L")
    try:
        return torchvision.datasets.ImageFolder(os.fspath(path), transform=transform, loader=loader)
    except (FileNotFoundError, RuntimeError) as exc:  # torchvision: no class folders / no valid images
        raise DataError(f"image folder {str(path)!r}: {exc} (expected {str(path)}/<class>/<image>.jpg)") from None


def _open_image(path: str, mode: str) -> object:
    """The image file ``path`` as PIL ``mode``."""
    from PIL import Image

    with open(path, "rb") as f:
        return Image.open(f).convert(mode)


def cifar10(root: str | os.PathLike, train: bool = True) -> Dataset:
    """CIFAR-10 from ``root`` (the ``cifar-10-batches-py`` folder or its parent); never downloads."""
    import torchvision
    from torchvision import transforms

    root = os.fspath(root)
    if os.path.basename(os.path.normpath(root)) == "cifar-10-batches-py":
        root = os.path.dirname(os.path.normpath(root))
    transform = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))])
    try:
        return torchvision.datasets.CIFAR10(root, train=train, transform=transform, download=False)
    except RuntimeError as exc:
        raise DataError(f"CIFAR-10 not found under {root!r} ({exc}); download it yourself "
                        "(cifar-10-python.tar.gz) and extract it there") from None


def check_dataset(data: Dataset, *, name: str, num_classes: int, image_size: Sequence[int] | None = None) -> None:
    """Raise :class:`DataError` unless ``data`` is non-empty, its items are ``(image [3, H, W], label)``
    with ``0 <= label < num_classes`` and, when given, ``H, W == image_size`` (checks the first item and
    every label a dataset exposes as ``labels``/``targets``)."""
    try:
        length = len(data)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"{name}: a map-style dataset with len() is needed") from None
    if length == 0:
        raise DataError(f"{name}: the dataset is empty")
    image, label = data[0]
    if not isinstance(image, torch.Tensor) or image.dim() != 3:
        raise DataError(f"{name}: items must be (image tensor [C, H, W], label); got {type(image).__name__}"
                        + (f" of shape {list(image.shape)}" if isinstance(image, torch.Tensor) else ""))
    if image_size is not None and tuple(image.shape[1:]) != tuple(image_size):
        raise DataError(f"{name}: images are {list(image.shape[1:])}, the model was planned for "
                        f"{list(image_size)}; resize the data or plan at this size")
    labels = getattr(data, "labels", None)
    if labels is None:
        labels = getattr(data, "targets", None)
    labels = torch.as_tensor(labels) if labels is not None else torch.as_tensor([int(label)])
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DataError(f"{name}: label {bad} is out of range for a model with {num_classes} classes")


def accuracy_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of an accuracy (95% by default)."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
