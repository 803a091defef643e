"""The exact tier over every torchvision classification model, with randomised BatchNorm.

Each model is built with random weights (nothing is downloaded), its BatchNorm statistics and affine
parameters randomised (the defaults make folding nearly the identity), optimised, and compared with the
original in float32: norm-wise relative error <= 1e-5, and no BatchNorm left that a layer next to it
could have absorbed (checked structurally by ``fxrebirth.testing.zoo.foldable_batchnorms``,
independently of the rules' own code).

Models over 150M parameters (convnext_large, ViT-L/H, RegNetY-128GF: 13.5 GB of peak memory and two minutes
for that one alone) run in the thorough profile only (``HYPOTHESIS_PROFILE=thorough``); the sizes are read
from torchvision's weight metadata, which downloads nothing.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torchvision

import fxrebirth
from fxrebirth.graph.ops import kind_of
from fxrebirth.testing import randomize_batchnorm
from fxrebirth.testing.zoo import foldable_batchnorms

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "thorough"
HEAVY_PARAMS = 150_000_000


def _params(name: str) -> int:
    return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]


NAMES = [name if _params(name) <= HEAVY_PARAMS else
         pytest.param(name, marks=pytest.mark.skipif(not THOROUGH, reason="over 150M parameters: thorough profile"))
         for name in torchvision.models.list_models(module=torchvision.models)]
FIXED_224 = ("vit_", "swin_", "maxvit_")  # position embeddings / window sizes need 224x224
LARGE = {"inception_v3": 96}  # smallest comfortable input for the inception stem


def _input_size(name: str) -> int:
    if name.startswith(FIXED_224):
        return 224
    return LARGE.get(name, 64)


@pytest.mark.parametrize("name", NAMES)
def test_torchvision_model_is_equivalent_and_fully_folded(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None)
    model = randomize_batchnorm(model, torch.Generator().manual_seed(1)).eval()
    size = _input_size(name)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    gm, report = fxrebirth.optimize(model, x)
    assert report.output_error is not None and report.output_error <= 1e-5, report.output_error
    assert report.max_error <= 1e-9
    assert foldable_batchnorms(gm) == []
    batchnorms = sum(1 for n in fxrebirth.capture(model, x).graph.nodes if kind_of(n) == "batch_norm")
    remaining = sum(1 for n in gm.graph.nodes if kind_of(n) == "batch_norm")
    assert report.stats("bn_into_preceding").rewrites + report.stats("bn_into_following").rewrites \
        == batchnorms - remaining
