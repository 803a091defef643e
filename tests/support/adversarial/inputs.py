"""Cases of class ``inputs``: dict and list outputs, two inputs, one tuple argument,
``copy_model=False``, a forward that branches on the input's shape, torchvision resnet18 and
mobilenet_v3_small."""

from __future__ import annotations

import inspect

from torch import nn

from fxrebirth.frontends.library import optimize as _optimize
from fxrebirth.graph.capture import capture as _capture
from tests.support.adversarial.builders import (AddCase, conv_bn, images, mobilenet_case, resnet18_case,
                                                    seeded_case)
from tests.support.adversarial.records import Size


class _DictOut(nn.Module):
    def __init__(self, as_list: bool = False) -> None:
        super().__init__()
        self.as_list = as_list
        self.a = conv_bn()
        self.b = nn.Conv2d(3, 4, 1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        a, b = self.a(x), self.bn_b(self.b(x))
        if self.as_list:
            return [a, b, a.mean((2, 3))]
        return {"features": a, "logits": b.mean((2, 3)), "raw": b}


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x, z):
        return self.bn(self.a(x) + self.b(z))


def _two_inputs(batch: int, size: Size) -> tuple:
    (x,) = images(3, 11)(batch, size)
    (z,) = images(2, 12)(batch, size)
    return x, z


class _TupleArg(nn.Module):
    """forward takes ONE argument, a tuple of two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _TwoInputs()

    def forward(self, pair):
        x, z = pair
        return self.net(x, z)


def _tuple_arg(batch: int, size: Size) -> tuple:
    return (_two_inputs(batch, size),)


def _copy_model_false(model: nn.Module, inputs: tuple, options: dict) -> nn.Module:
    """``copy_model=False`` where the entry point has it: optimize, else capture."""
    if "copy_model" in inspect.signature(_optimize).parameters:
        return _optimize(model, inputs, copy_model=False, **options)[0]
    return _capture(model, inputs, copy_model=False)


class _ShapeBranch(nn.Module):
    """forward reads x.shape to choose a branch."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv_bn()
        self.b = conv_bn(k=1)

    def forward(self, x):
        if x.shape[-1] % 2 == 0:
            return self.a(x)
        return self.b(x)


def input_cases(add: AddCase) -> None:
    """The ``inputs`` cases, in catalog order."""
    add("dict_output", "inputs", seeded_case(500, _DictOut), description="returns a dict of tensors")
    add("list_output", "inputs", seeded_case(501, lambda: _DictOut(as_list=True)), description="returns a list")
    add("two_inputs", "inputs", seeded_case(502, _TwoInputs), _two_inputs, description="forward(x, z)")
    add("tuple_argument", "inputs", seeded_case(503, _TupleArg), _tuple_arg, description="forward((x, z)): one tuple arg")
    add("copy_model_false", "inputs", seeded_case(504, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 8))),
        entry=_copy_model_false, description="copy_model=False (optimize if it has it, else capture)")
    add("shape_dependent_branch", "inputs", seeded_case(505, _ShapeBranch), sizes=(18, 19, 20),
        description="forward reads x.shape to choose a branch")
    add("resnet18", "inputs", resnet18_case(506), images(3, 506), sizes=(32, 40), example=(2, 32),
        description="torchvision resnet18 (weights=None)")
    add("mobilenet_v3_small", "inputs", mobilenet_case(507), images(3, 507), sizes=(32, 40), example=(2, 32),
        description="torchvision mobilenet_v3_small (weights=None)")
