"""Cases of class ``hooks``: forward and pre-hooks that change values (on a layer, on the root, with
kwargs), old- and new-style weight and spectral norm, parametrizations, hooks that record into a list,
a hooked module called twice, global module hooks."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from tests.support.adversarial.builders import AddCase, seeded_case, conv_bn


def _hooked(kind: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
        if kind == "conv_forward":
            model[0].register_forward_hook(lambda m, i, o: o + 1.0)
        elif kind == "bn_forward":
            model[1].register_forward_hook(lambda m, i, o: o * 0.5)
        elif kind == "conv_pre":
            model[0].register_forward_pre_hook(lambda m, args: (args[0] * 2.0,))
        elif kind == "bn_pre":
            model[1].register_forward_pre_hook(lambda m, args: (args[0] - 0.25,))
        elif kind == "relu_forward":
            model[2].register_forward_hook(lambda m, i, o: o - 0.5)
        elif kind == "root_forward":
            model.register_forward_hook(lambda m, i, o: o * 3.0)
        elif kind == "root_pre":
            model.register_forward_pre_hook(lambda m, args: (args[0].flip(-1),))
        elif kind == "kwargs_pre":
            model[0].register_forward_pre_hook(lambda m, args, kwargs: ((args[0] + 1.0,), kwargs), with_kwargs=True)
        return model

    return make


def _norm_wrapped(kind: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        conv = nn.Conv2d(3, 8, 3, padding=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "spectral":
                conv = nn.utils.spectral_norm(conv)
            elif kind == "weight_norm":
                conv = nn.utils.weight_norm(conv)
            elif kind == "weight_norm_loaded":
                conv = nn.utils.weight_norm(conv)
                with torch.no_grad():  # as load_state_dict would: the hook's cached weight is stale
                    conv.weight_g.mul_(torch.linspace(0.5, 2.0, 8).reshape(8, 1, 1, 1))
            elif kind == "spectral_loaded":
                conv = nn.utils.spectral_norm(conv)
                with torch.no_grad():
                    conv.weight_orig.mul_(3.0)
            elif kind == "parametrize":
                nn.utils.parametrize.register_parametrization(conv, "weight", _AbsParam())
            elif kind == "parametrizations.weight_norm":
                conv = nn.utils.parametrizations.weight_norm(conv)
            elif kind == "parametrizations.spectral_norm":
                conv = nn.utils.parametrizations.spectral_norm(conv)
        return nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))

    return make


class _AbsParam(nn.Module):
    def forward(self, w):
        return w.abs() - 0.1


_RECORDS: dict[str, list] = {}


def _recording() -> nn.Module:
    records = _RECORDS.setdefault("hook_records_list", [])
    records.clear()
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                          nn.BatchNorm2d(8))
    model[1].register_forward_hook(lambda m, i, o: records.append(o.detach().clone()))
    model[4].register_forward_hook(lambda m, i, o: records.append(o.detach().clone()))
    return model


class _CalledTwice(nn.Module):
    """One hooked conv called twice (the hook fires twice); a BN after the second call."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv.register_forward_hook(lambda m, i, o: o * 0.5 + 1.0)

    def forward(self, x):
        return self.bn(self.conv(torch.relu(self.conv(self.stem(x)))))


def _global_hook_setup() -> Callable[[], None]:
    def hook(module, args, output):
        if isinstance(module, nn.Conv2d):
            return output + 0.75
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    return handle.remove


def _global_pre_hook_setup() -> Callable[[], None]:
    def hook(module, args):
        if isinstance(module, nn.BatchNorm2d):
            return (args[0] * 1.5,)
        return None

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    return handle.remove


def hook_cases(add: AddCase) -> None:
    """The ``hooks`` cases, in catalog order."""
    for i, kind in enumerate(["conv_forward", "bn_forward", "conv_pre", "bn_pre", "relu_forward", "root_forward",
                              "root_pre", "kwargs_pre"]):
        add(f"hook_{kind}", "hooks", seeded_case(100 + i, _hooked(kind)),
            description=f"{kind.replace('_', ' ')} hook that changes the value")
    for i, kind in enumerate(["spectral", "spectral_loaded", "weight_norm", "weight_norm_loaded", "parametrize",
                              "parametrizations.weight_norm", "parametrizations.spectral_norm"]):
        add(f"norm_{kind.replace('.', '_')}", "hooks", seeded_case(110 + i, _norm_wrapped(kind)),
            description={"spectral": "old-style nn.utils.spectral_norm (a pre-hook; cached weight is stale)",
                         "spectral_loaded": "old-style spectral_norm, weight_orig edited after wrapping",
                         "weight_norm": "old-style nn.utils.weight_norm (a pre-hook)",
                         "weight_norm_loaded": "old-style weight_norm, weight_g edited after wrapping (stale cache)",
                         "parametrize": "register_parametrization(conv, 'weight', abs - 0.1)",
                         "parametrizations.weight_norm": "new-style parametrizations.weight_norm",
                         "parametrizations.spectral_norm": "new-style parametrizations.spectral_norm"}[kind])
    add("hook_records_list", "hooks", seeded_case(120, _recording), records=lambda: _RECORDS["hook_records_list"],
        description="forward hooks on two BNs append outputs to a Python list")
    add("hooked_module_called_twice", "hooks", seeded_case(121, _CalledTwice),
        description="one conv with an output hook called twice, BN after the second")
    add("global_forward_hook", "hooks", seeded_case(122, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 4))),
        setup=_global_hook_setup, description="register_module_forward_hook adding 0.75 to every Conv2d output")
    add("global_forward_pre_hook", "hooks", seeded_case(123, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 4))),
        setup=_global_pre_hook_setup, description="register_module_forward_pre_hook scaling every BN's input")
