"""The exact tier over every torchvision classification model, with randomised BatchNorm.

Each model is built with random weights (nothing is downloaded), its BatchNorm statistics and affine
parameters randomised (the defaults make folding nearly the identity), optimised, and compared with the
original in float32: norm-wise relative error <= 1e-5, and no BatchNorm left that a layer next to it
could have absorbed (checked structurally here, independently of the rules' own code).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision

import fxrebirth
from fxrebirth.ops import kind_of
from fxrebirth.testing import randomize_batchnorm

NAMES = torchvision.models.list_models(module=torchvision.models)
FIXED_224 = ("vit_", "swin_", "maxvit_")  # position embeddings / window sizes need 224x224
LARGE = {"inception_v3": 96}  # smallest comfortable input for the inception stem


def _input_size(name: str) -> int:
    if name.startswith(FIXED_224):
        return 224
    return LARGE.get(name, 64)


def foldable_batchnorms(gm: torch.fx.GraphModule) -> list[str]:
    """Eval-mode BatchNorms with a single-user conv/linear before them, or a lone conv (no padding) or
    linear consumer after them: what an exact fold could still remove."""
    found = []
    for node in gm.graph.nodes:
        if kind_of(node) != "batch_norm" or node.kwargs["training"]:
            continue
        producer = node.kwargs["input"]
        rank = len(node.meta["tensor_meta"].shape)
        if kind_of(producer) in ("conv", "conv_transpose") and len(producer.users) == 1:
            found.append(node.name)
        elif kind_of(producer) == "linear" and len(producer.users) == 1 and rank == 2:
            found.append(node.name)
        users = list(node.users)
        if len(users) == 1 and users[0].kwargs.get("input") is node:
            consumer = users[0]
            if kind_of(consumer) == "linear" and rank == 2:
                found.append(node.name)
            elif kind_of(consumer) == "conv" and all(p == 0 for p in consumer.kwargs["padding"]):
                found.append(node.name)
    return found


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
