"""BatchNorm for the duration of retraining, folded away afterwards.

Networks without BatchNorm (Caffe's GoogLeNet) are slow to train: the default teacher needs BatchNorm to
train in minutes at all (without it, 34% top-1 after 3 epochs; with it, 90%). Retraining a reborn student
meets the same difficulty, so for end-to-end training a BatchNorm is put after every convolution,
initialised so that the network computes what it computed before (``gamma = sqrt(var + eps)``,
``beta = mean`` of the convolution's output on a few calibration batches), trained in train mode, and
folded back into the convolution at the end with the running statistics (exact in eval mode):

    bn(conv(x)) = conv'(x),  w' = w * s,  b' = b * s + t   (fxrebirth.passes.batchnorm.fold_batchnorm_)

The architecture, and so the latency, is unchanged. Under torch.distributed each rank normalises with
its own share of the batch (plain BatchNorm, not SyncBatchNorm), as DDP usually does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from fxrebirth.graph.ops import kind_of
from fxrebirth.passes.batchnorm import fold_batchnorm_

__all__ = ["TrainingBatchNorm", "batch_statistics_nodes", "recompute_statistics"]


class _ObservingBatchNorm(nn.BatchNorm2d):
    """A BatchNorm that, while ``observing``, passes its input through and only accumulates statistics.

    A batch with one value per channel (one image whose feature map is 1x1: a batch size of 1, a data-parallel
    share of one) has no batch statistics: it is not observed, and in training it is normalised with the
    running statistics, as in eval mode, instead of failing ("Expected more than 1 value per channel")."""

    observing = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lone = x.numel() <= x.shape[1]
        if self.observing:
            if not lone:
                with torch.no_grad():
                    F.batch_norm(x, self.running_mean, self.running_var, None, None, True,
                                 0.0 if self.momentum is None else self.momentum, self.eps)
            return x
        if lone and self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


@dataclass
class TrainingBatchNorm:
    """The BatchNorms added to one model; :meth:`fold` removes them."""

    model: fx.GraphModule
    graph_nodes: list[tuple[fx.Node, fx.Node, str]] = field(default_factory=list)  # (conv, bn call, bn name)
    hooked: list[tuple[nn.Conv2d, _ObservingBatchNorm, Any]] = field(default_factory=list)

    @classmethod
    def add(cls, model: fx.GraphModule, modules: Iterable[nn.Module]) -> "TrainingBatchNorm":
        """Add a BatchNorm after every canonical conv node of ``model``'s graph and every ``nn.Conv2d`` in
        ``modules`` (submodules of ``model``, e.g. rebirth layers)."""
        self = cls(model)
        params = dict(model.named_parameters())
        for i, node in enumerate([n for n in model.graph.nodes if kind_of(n) == "conv"]):
            weight = node.kwargs["weight"]
            if node.kwargs.get("bias") is None or weight.op != "get_attr" or weight.target not in params \
                    or params[weight.target].dim() != 4:
                continue
            name = f"_training_bn_{i}"
            kernel = params[weight.target]
            model.add_submodule(name, _ObservingBatchNorm(kernel.shape[0], momentum=None, device=kernel.device))
            with model.graph.inserting_after(node):
                call = model.graph.call_module(name, (node,))
            node.replace_all_uses_with(call, delete_user_cb=lambda user: user is not call)
            self.graph_nodes.append((node, call, name))
        model.recompile()
        for module in modules:
            for conv in [m for m in module.modules() if isinstance(m, nn.Conv2d)]:
                bn = _ObservingBatchNorm(conv.out_channels, momentum=None, device=conv.weight.device)
                handle = conv.register_forward_hook(lambda mod, args, out, bn=bn: bn(out))
                self.hooked.append((conv, bn, handle))
        return self

    def parameters(self) -> list[nn.Parameter]:
        return [p for bn in self.modules() for p in bn.parameters()]

    def hooked_parameters(self) -> list[nn.Parameter]:
        """The parameters of the BatchNorms hooked onto module convolutions (not submodules of the model)."""
        return [p for _, bn, _ in self.hooked for p in bn.parameters()]

    def modules(self) -> list[_ObservingBatchNorm]:
        return [self.model.get_submodule(name) for _, _, name in self.graph_nodes] + [bn for _, bn, _ in self.hooked]

    def start(self) -> None:
        """End observation: each BatchNorm starts as the identity of the statistics it saw, then trains."""
        with torch.no_grad():
            for bn in self.modules():
                bn.weight.copy_(torch.sqrt(bn.running_var + bn.eps))
                bn.bias.copy_(bn.running_mean)
                bn.observing, bn.momentum = False, 0.1
                bn.train()

    @torch.no_grad()
    def fold(self) -> None:
        """Fold every BatchNorm into its convolution (running statistics) and remove it."""
        params = dict(self.model.named_parameters())
        for conv, call, name in self.graph_nodes:
            bn = self.model.get_submodule(name)
            fold_batchnorm_(params[conv.kwargs["weight"].target], params[conv.kwargs["bias"].target], bn)
            call.replace_all_uses_with(conv)
            self.model.graph.erase_node(call)
            delattr(self.model, name)
        self.model.recompile()
        for conv, bn, handle in self.hooked:
            handle.remove()
            fold_batchnorm_(conv.weight, conv.bias, bn)
        self.graph_nodes, self.hooked = [], []


def batch_statistics_nodes(model: fx.GraphModule) -> list[fx.Node]:
    """The ``F.batch_norm`` calls of ``model``'s graph that normalise with batch statistics (``training=True``)."""
    return [n for n in model.graph.nodes if n.op == "call_function" and n.target is F.batch_norm
            and n.kwargs.get("training") is True]


@torch.no_grad()
def recompute_statistics(model: fx.GraphModule, norms: Iterable[nn.BatchNorm2d], batches: Iterable[torch.Tensor],
                         world_size: int = 1) -> int:
    """The running statistics of every batch-statistics BatchNorm of ``model`` (its graph's ``F.batch_norm``
    calls with ``training=True``, and ``norms``) recomputed as the plain average of their batch statistics over
    ``batches`` (forward passes only, the weights as they are now); returns the images passed.

    Training with batch statistics leaves running statistics that are a momentum average over the weights of
    the last steps: after a few steps of a network whose weights moved, they describe none of them, and eval
    mode (and a fold into a convolution) computes another network. With the average of batch ``k`` taken at
    momentum ``1/k`` from zero, each running statistic is ``mean_k(stat_k)``, what an eval-mode network with
    these weights should normalise with. Under torch.distributed the ranks' averages are averaged."""
    nodes = batch_statistics_nodes(model)
    norms = list(norms)
    if not nodes and not norms:
        return 0
    params = dict(model.named_buffers())
    buffers = [params[n.kwargs[k].target] for n in nodes for k in ("running_mean", "running_var")
               if isinstance(n.kwargs.get(k), fx.Node) and n.kwargs[k].target in params]
    saved = {n: n.kwargs.get("momentum") for n in nodes}
    for buf in buffers:
        buf.zero_()
    momenta = []
    for bn in norms:
        momenta.append(bn.momentum)
        bn.reset_running_stats()
        bn.momentum = None  # nn.BatchNorm's cumulative average
    seen, count = 0, 0
    try:
        for x in batches:
            count += 1
            for n in nodes:
                n.kwargs = {**n.kwargs, "momentum": 1.0 / count}
            model.recompile()
            model(x)
            seen += len(x) * world_size
    finally:
        for n, m in saved.items():
            n.kwargs = {**n.kwargs, "momentum": m}
        model.recompile()
        for bn, m in zip(norms, momenta):
            bn.momentum = m
    if world_size > 1:
        import torch.distributed as dist

        for buf in buffers + [b for bn in norms for b in (bn.running_mean, bn.running_var)]:
            dist.all_reduce(buf)
            buf.div_(world_size)
    return seen
