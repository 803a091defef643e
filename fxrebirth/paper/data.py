"""The paper experiment's embedded data: a procedural image set that ships with the code (no download).

:class:`Shapes` renders light-on-dark shapes (ten classes) in random hues, positions, sizes and small
rotations over a noisy, unevenly lit dark background, with a dim distracting stroke. Each split is generated
from its own seed, so the held-out split never overlaps the training split and every run sees the same
images. It is hard enough that a network does not saturate at 100% in a few epochs, so accuracy lost by
merging shows; ink polarity is fixed (light on dark) because random ink *and* background colours kept even
a small BatchNorm CNN at chance for two epochs (measured when this set was designed). It returns
``(float tensor [3, H, W], int label)`` items with a ``classes`` attribute, as the loaders of
:mod:`fxrebirth.retraining.data` do.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch.utils.data import Dataset

from fxrebirth.retraining.data import DataError, accuracy_interval, check_dataset, cifar10, image_folder

__all__ = ["Shapes", "SHAPE_CLASSES", "render_shapes"]
# DataError, image_folder, cifar10, check_dataset and accuracy_interval are importable from here too
# (their home before 0.2: fxrebirth.data): the deprecated path fxrebirth.data resolves to this module.

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
