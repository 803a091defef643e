"""Data for retraining: an embedded procedural dataset (no download) and loaders for the user's images.

:class:`Shapes` renders light-on-dark shapes (ten classes) in random hues, positions, sizes and small
rotations over a noisy, unevenly lit dark background, with a dim distracting stroke. Each split is generated
from its own seed, so the held-out split never overlaps the training split and every run sees the same
images. It is hard enough that a network does not saturate at 100% in a few epochs, so accuracy lost by
merging shows; ink polarity is fixed (light on dark) because random ink *and* background colours kept even
a small BatchNorm CNN at chance for two epochs (measured when this set was designed).

:func:`image_folder` reads an ``ImageFolder`` tree (one sub-folder per class) and :func:`cifar10` reads
CIFAR-10 from a local folder (never downloads). All three return map-style datasets of
``(float tensor [3, H, W], int label)`` with a ``classes`` attribute.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import Sequence

import torch
from torch.utils.data import Dataset

from .errors import FxRebirthError

__all__ = ["Shapes", "SHAPE_CLASSES", "DataError", "image_folder", "cifar10", "check_dataset", "accuracy_interval"]


class DataError(FxRebirthError):
    """A dataset cannot be used as given (empty, missing, wrong image size, labels out of range)."""


SHAPE_CLASSES = ("disc", "ring", "square", "frame", "triangle", "plus", "cross", "star", "hexagon", "bar")
"""The embedded set's classes, in label order."""

MEAN, STD = 0.2, 0.17  # of the rendered pixels, all channels (measured on a training split)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def _polygon_sdf(x: torch.Tensor, y: torch.Tensor, sides: int, phase: float = 0.0) -> torch.Tensor:
    """Signed distance (approximately) to a regular polygon of circumradius 1: max over its edge normals."""
    inner = math.cos(math.pi / sides)
    d = None
    for k in range(sides):
        a = phase + (2 * k + 1) * math.pi / sides
        e = x * math.cos(a) + y * math.sin(a) - inner
        d = e if d is None else torch.maximum(d, e)
    return d


def _sdf(label: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance of shape ``label`` (in units of its radius; < 0 inside)."""
    r = torch.sqrt(x * x + y * y)
    name = SHAPE_CLASSES[label]
    if name == "disc":
        return r - 1
    if name == "ring":
        return (r - 0.75).abs() - 0.25
    if name == "square":
        return torch.maximum(x.abs(), y.abs()) - 0.8
    if name == "frame":
        return (torch.maximum(x.abs(), y.abs()) - 0.65).abs() - 0.2
    if name == "triangle":
        return _polygon_sdf(x, y, 3, math.pi / 2) * 1.1
    if name == "plus":
        return torch.minimum(torch.maximum(x.abs() - 1, y.abs() - 0.3), torch.maximum(x.abs() - 0.3, y.abs() - 1))
    if name == "cross":
        u, v = (x + y) / math.sqrt(2), (x - y) / math.sqrt(2)
        return torch.minimum(torch.maximum(u.abs() - 1, v.abs() - 0.28), torch.maximum(u.abs() - 0.28, v.abs() - 1))
    if name == "star":
        theta = torch.atan2(y, x)
        return r - (0.55 + 0.45 * torch.cos(5 * theta).clamp(min=0) ** 2)
    if name == "hexagon":
        return _polygon_sdf(x, y, 6)
    if name == "bar":
        return torch.maximum(x.abs() - 1, y.abs() - 0.35)
    raise AssertionError(name)


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``[n] x3 -> [n, 3]``."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    f = 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)
    return v[:, None] * (1 - s[:, None] * (1 - f))


def render_shapes(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Images of the given labels, ``uint8 [n, 3, size, size]`` (see the module docstring)."""
    n = labels.numel()
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(grid, grid, indexing="ij")
    radius = 0.28 + 0.42 * u(n)
    cx, cy = (u(n) * 2 - 1) * (1 - radius) * 0.9, (u(n) * 2 - 1) * (1 - radius) * 0.9
    angle = (u(n) * 2 - 1) * math.radians(20)
    dx, dy = gx[None] - cx[:, None, None], gy[None] - cy[:, None, None]
    ca, sa = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    x, y = (ca * dx + sa * dy) / radius[:, None, None], (-sa * dx + ca * dy) / radius[:, None, None]
    sdf = torch.empty(n, size, size)
    for label in labels.unique().tolist():
        idx = labels == label
        sdf[idx] = _sdf(label, x[idx], y[idx])
    pixel = 2.0 / size / radius[:, None, None]  # one pixel in shape units: anti-aliasing width
    ink_alpha = torch.sigmoid(-sdf / pixel)
    ink = _hsv_to_rgb(u(n), 0.4 + 0.6 * u(n), 0.55 + 0.45 * u(n))
    background = _hsv_to_rgb(u(n), u(n), 0.05 + 0.25 * u(n))
    # uneven lighting: a random linear gradient over the background
    tilt = (u(n, 2) * 2 - 1) * 0.12
    light = tilt[:, 0, None, None] * gx[None] + tilt[:, 1, None, None] * gy[None]
    image = background[:, :, None, None] + light[:, None]
    # a dim stroke: a line segment anywhere, at most half as bright as the ink
    p, q = u(n, 2) * 2 - 1, u(n, 2) * 2 - 1
    seg = q - p
    t = (((gx[None] - p[:, 0, None, None]) * seg[:, 0, None, None] + (gy[None] - p[:, 1, None, None])
          * seg[:, 1, None, None]) / (seg.pow(2).sum(1)[:, None, None] + 1e-6)).clamp(0, 1)
    dist = torch.hypot(gx[None] - p[:, 0, None, None] - t * seg[:, 0, None, None],
                       gy[None] - p[:, 1, None, None] - t * seg[:, 1, None, None])
    stroke_alpha = torch.sigmoid(-(dist - 1.2 / size) / (1.0 / size)) * 0.5
    stroke = _hsv_to_rgb(u(n), u(n), 0.3 + 0.4 * u(n))
    image = image * (1 - stroke_alpha[:, None]) + stroke[:, :, None, None] * stroke_alpha[:, None]
    image = image * (1 - ink_alpha[:, None]) + ink[:, :, None, None] * ink_alpha[:, None]
    image = image + torch.randn(image.shape, generator=generator) * (0.04 + 0.08 * u(n))[:, None, None, None]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


class Shapes(Dataset):
    """The embedded procedural dataset (see the module docstring).

    ``split`` is ``"train"`` or ``"test"`` (disjoint seeds); ``length`` images of ``size`` x ``size``
    pixels (balanced classes, shuffled). Items are ``(float [3, size, size] normalised, label)``.
    """

    classes = SHAPE_CLASSES

    def __init__(self, split: str = "train", length: int | None = None, size: int = 32, seed: int = 0) -> None:
        if split not in ("train", "test"):
            raise DataError(f"Shapes: split must be 'train' or 'test', not {split!r}")
        length = length if length is not None else (20000 if split == "train" else 10000)
        if length < 1 or size < 8:
            raise DataError(f"Shapes: need length >= 1 and size >= 8 (got length={length}, size={size})")
        self.split, self.size, self.seed = split, size, seed
        generator = torch.Generator().manual_seed(_seed("fxrebirth.Shapes", split, seed))
        labels = torch.arange(length) % len(SHAPE_CLASSES)
        self.labels = labels[torch.randperm(length, generator=generator)]
        chunks = [render_shapes(self.labels[i:i + 2048], size, generator) for i in range(0, length, 2048)]
        self.images = torch.cat(chunks)

    def __len__(self) -> int:
        return self.labels.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return (self.images[index].float() / 255 - MEAN) / STD, int(self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All images (normalised, float) and labels at once: the fast path for small images."""
        return (self.images.float() / 255 - MEAN) / STD, self.labels.clone()


def image_folder(path: str | os.PathLike, size: int = 224) -> Dataset:
    """An ``ImageFolder`` tree (``path/<class>/<image>``), resized and centre-cropped to ``size``,
    normalised with the ImageNet statistics."""
    import torchvision
    from torchvision import transforms

    if not os.path.isdir(path):
        raise DataError(f"image folder {str(path)!r} does not exist")
    transform = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    try:
        return torchvision.datasets.ImageFolder(os.fspath(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:  # torchvision: no class folders / no valid images
        raise DataError(f"image folder {str(path)!r}: {exc} (expected {str(path)}/<class>/<image>.jpg)") from None


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
