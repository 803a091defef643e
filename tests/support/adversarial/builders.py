"""Helpers every family of cases builds with: seeded input builders (:func:`images`), seeded model
builders (:func:`seeded_case`), a conv + BatchNorm block, the torchvision models several families use, the
``cost_model=None`` option and the signature of the catalog's ``add``."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from tests.support.adversarial.compat import randomize_batchnorm
from tests.support.adversarial.records import Size

AddCase = Callable[..., None]
"""The catalog's ``add(name, klass, build, inputs=None, **case_fields)``: appends one :class:`Case`
(default inputs: ``images(3, index of the case)``)."""

NO_COST = lambda: {"cost_model": None}  # noqa: E731 - accept every exact merge (a documented option)


def height_width(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def case_generator(seed: int, batch: int, size: Size) -> torch.Generator:
    h, w = height_width(size)
    return torch.Generator().manual_seed(seed * 100003 + batch * 1009 + h * 31 + w)


def images(channels: int = 3, seed: int = 0, *, dtype: torch.dtype = torch.float32, scale: float = 1.0,
           channels_last: bool = False, dims: int = 2) -> Callable[[int, Size], tuple]:
    """An input builder of one ``(batch, channels, *spatial)`` tensor, seeded by (seed, batch, size)."""

    def make(batch: int, size: Size) -> tuple:
        spatial = {1: lambda s: (s,), 2: height_width, 3: lambda s: (s, s, s)}[dims](size)
        x = torch.randn((batch, channels) + tuple(spatial), generator=case_generator(seed, batch, size), dtype=torch.float64)
        x = (x * scale).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x,)

    return make


def seeded_case(seed: int, make: Callable[[], nn.Module], *, dtype: torch.dtype | None = None,
            channels_last: bool = False, after: Callable[[nn.Module], None] | None = None) -> Callable[[], nn.Module]:
    """``make`` under ``torch.manual_seed(seed)``, BatchNorms randomised, in eval mode (then ``after``)."""

    def build() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make()
        if randomize_batchnorm is not None:
            randomize_batchnorm(model, torch.Generator().manual_seed(seed + 1))
        if after is not None:
            with torch.no_grad():
                after(model)
        model.eval()
        if dtype is not None:
            model = model.to(dtype)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    return build


class ConvBN(nn.Module):
    """The start most cases share: ``conv`` (3 -> 8 channels, 3x3, padded) then ``bn`` (8 channels), made in
    that order (so a seeded case draws the same weights); a case adds its own layers and ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)


class TwoConvsOneBN(nn.Module):
    """Two convolutions of the input, ``a`` (3x3, padded) and ``b`` (1x1), both 3 -> 8 channels, and one
    ``bn`` (8 channels), made in that order; a case writes the ``forward`` that combines them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)


def conv_bn(cin: int = 3, cout: int = 8, k: int = 3, **kw: Any) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, **kw), nn.BatchNorm2d(cout))


def resnet18_case(seed: int, channels_last: bool = False) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return torchvision.models.resnet18(weights=None, num_classes=10)

    return seeded_case(seed, make, channels_last=channels_last)


def mobilenet_case(seed: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)

    return seeded_case(seed, make)
