"""Fresh weights: He initialisation of modules (:func:`he_init`, the default teacher's) and of a captured
model, canonical graph and rebirth layers alike (:func:`reinitialise`, the scratch control's start)."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.ops import kind_of

__all__ = ["he_init", "reinitialise"]


def he_init(model: nn.Module) -> nn.Module:
    """He (Kaiming) normal initialisation of every ``nn.Conv2d`` and ``nn.Linear``, zero biases, and a small
    last layer (normal, std 0.01, when it is a linear layer); returns ``model``."""
    last = None
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
            last = module
    if isinstance(last, nn.Linear):
        nn.init.normal_(last.weight, std=0.01)
    return model


@torch.no_grad()
def reinitialise(gm: fx.GraphModule) -> list[str]:
    """Every weight of a captured model anew, as :func:`he_init` does for modules: the canonical graph's
    convolutions and linear layers (He normal, zero bias; the last linear layer std 0.01), its BatchNorms
    (weight 1, bias 0, statistics 0 and 1), and :func:`he_init` on its ``nn.Module`` submodules (rebirth
    layers). Returns the names of the parameters left as they were (none in a CNN of these layers)."""
    done: set[str] = set()

    def tensor(node: fx.Node, name: str) -> torch.Tensor | None:
        value = node.kwargs.get(name)
        if not isinstance(value, fx.Node) or value.op != "get_attr":
            return None
        done.add(value.target)
        return gm.get_parameter(value.target) if value.target in params else gm.get_buffer(value.target)

    params = dict(gm.named_parameters())
    last_linear = None
    for node in gm.graph.nodes:
        kind = kind_of(node)
        if kind in ("conv", "linear"):
            weight, bias = tensor(node, "weight"), tensor(node, "bias")
            nn.init.kaiming_normal_(weight, nonlinearity="relu")
            if bias is not None:
                bias.zero_()
            last_linear = weight if kind == "linear" else None
        elif kind == "batch_norm":
            for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                t = tensor(node, name)
                if t is not None:
                    t.fill_(value)
    if last_linear is not None:
        nn.init.normal_(last_linear, std=0.01)
    for name, module in gm.named_children():
        if not isinstance(module, fx.GraphModule) and any(True for _ in module.parameters()):
            he_init(module)
            done.update(f"{name}.{p}" for p, _ in module.named_parameters())
    return sorted(set(params) - done)
