"""What the benchmarks share: the repository root, atomic cache writes, and the models the latency and
runtime benchmarks compare (torchvision by name with random weights and randomised BatchNorm, and a
RepVGG-A0-shaped network), in each compared form."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.fx.experimental.optimization import fuse

import fxrebirth
from fxrebirth.testing import randomize_batchnorm

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (caches and docs paths are relative to it)."""

# googlenet without horizontal fusion of the inception 1x1 layers: what that fusion alone gains
ABLATIONS = {"googlenet": {"no_sibling_fusion": ["merge_sibling_convs"]}}


def write_atomically(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, through a temporary file renamed into place (a killed run
    never leaves half a file in a cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def torchvision_model(name: str, seed: int | None = None) -> torch.nn.Module:
    """A torchvision classification model with random weights (nothing downloaded) and randomised
    BatchNorm statistics, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"init_weights": False} if name == "googlenet" else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return randomize_batchnorm(model, generator).eval()


class _RepVGGBlock(torch.nn.Module):
    """RepVGG's training-time block (3x3+BN, 1x1+BN, identity BN when shapes allow, summed, ReLU)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.pointwise = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return torch.relu(out)


def repvgg_a0(num_classes: int = 1000) -> torch.nn.Module:
    """A RepVGG-A0-shaped network (Ding et al., 2021: depths 1-2-4-14-1, widths 48-48-96-192-1280)."""
    layers, cin = [], 3
    for width, depth in ((48, 1), (48, 2), (96, 4), (192, 14), (1280, 1)):
        for i in range(depth):
            layers.append(_RepVGGBlock(cin, width, 2 if i == 0 else 1))
            cin = width
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(cin, num_classes))


def build(model_name: str, variant: str, size: int = 224) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (``"repvgg"`` or a torchvision name) in one of the compared forms (``"eager"``,
    ``"fx_fuse"``, ``"fxrebirth"`` or an :data:`ABLATIONS` name), and a batch-1 input."""
    model = repvgg_a0() if model_name == "repvgg" else torchvision_model(model_name)
    if model_name == "repvgg":
        model = randomize_batchnorm(model).eval()
    x = torch.randn(1, 3, size, size)
    if variant == "fx_fuse":
        model = fuse(model)
    elif variant == "fxrebirth":
        model, _ = fxrebirth.optimize(model, x)
    elif variant in ABLATIONS.get(model_name, {}):
        model, _ = fxrebirth.optimize(model, x, disable=ABLATIONS[model_name][variant])
    return model, x
