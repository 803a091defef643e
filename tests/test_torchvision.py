"""The exact tier over every torchvision classification model, with randomised BatchNorm.

Each model is built with random weights (nothing is downloaded), its BatchNorm statistics and affine
parameters randomised (the defaults make folding nearly the identity), optimised, and compared with the
original in float32: norm-wise relative error <= 1e-5, and no BatchNorm left that a layer next to it
could have absorbed (checked structurally by ``tests.support.zoo.foldable_batchnorms``,
independently of the rules' own code).

The ``ci`` profile runs the smallest model of each family (:func:`family`: ResNet, ResNeXt, Wide ResNet,
RegNetX, RegNetY, VGG with and without BatchNorm, EfficientNet and EfficientNetV2, ...; 23 of the 80
models); the thorough profile (``HYPOTHESIS_PROFILE=thorough``) runs them all, including those over 150M
parameters (RegNetY-128GF alone: 13.5 GB of peak memory and two minutes). Sizes are read from
torchvision's weight metadata, which downloads nothing.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torchvision

import fxrebirth
from fxrebirth.graph.ops import kind_of
from fxrebirth.testing import randomize_batchnorm
from tests.support.zoo import foldable_batchnorms

HEAVY_PARAMS = 150_000_000


def _params(name: str) -> int:
    return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]


def family(name: str) -> str:
    """A model's family, its name without the size: resnet18 -> resnet, resnext50_32x4d -> resnext,
    regnet_y_400mf -> regnet_y, vgg11_bn -> vgg_bn, efficientnet_b3 -> efficientnet, efficientnet_v2_s ->
    efficientnet_v2, vit_b_16 -> vit, shufflenet_v2_x0_5 -> shufflenet_v2."""
    size = re.compile(r"\d.*|x\d+|[tsmlbh]|b\d|tiny|small|base|large")
    # resnet50 -> resnet, but v2 stays v2
    return "_".join(re.sub(r"(?<=[a-z]{3})\d+$", "", t) for t in name.split("_") if not size.fullmatch(t))


def _sample(names: list[str]) -> set[str]:
    """The smallest model of each family: what the ci profile runs."""
    smallest: dict[str, str] = {}
    for name in sorted(names, key=_params):
        smallest.setdefault(family(name), name)
    return set(smallest.values())


ALL = torchvision.models.list_models(module=torchvision.models)
SAMPLE = _sample(ALL)
NAMES = [name if name in SAMPLE and _params(name) <= HEAVY_PARAMS else pytest.param(name, marks=pytest.mark.thorough)
         for name in ALL]
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


def test_the_ci_sample_is_the_smallest_model_of_every_family() -> None:
    examples = {"resnet18": "resnet", "wide_resnet50_2": "wide_resnet", "resnext50_32x4d": "resnext",
                "regnet_y_400mf": "regnet_y", "vgg11_bn": "vgg_bn", "efficientnet_b3": "efficientnet",
                "efficientnet_v2_s": "efficientnet_v2", "vit_b_16": "vit", "shufflenet_v2_x0_5": "shufflenet_v2",
                "mobilenet_v2": "mobilenet_v2", "swin_v2_t": "swin_v2", "convnext_tiny": "convnext"}
    assert {name: family(name) for name in examples} == examples
    families = {family(name) for name in ALL}
    assert sorted(family(name) for name in SAMPLE) == sorted(families)
    for name in SAMPLE:
        assert all(_params(name) <= _params(other) for other in ALL if family(other) == family(name))
