"""The canonical operator vocabulary: one table of data, no per-layer special cases elsewhere.

Every pass works on one form of graph. In that form the layers fxrebirth knows are *functional* calls
(``torch.nn.functional.conv2d`` and friends) whose tensors (weights, biases, running statistics) are
``get_attr`` nodes, and whose arguments are all keywords with every default filled in. Whether the
model was written with modules or functions, traced by ``symbolic_trace`` (keywords) or by Dynamo
(everything positional), a rule reads ``node.kwargs["stride"]`` and gets a tuple of ints.

This module holds the data that makes that possible:

* :data:`OPS` -- for each canonical function, its parameter names and defaults, its kind
  (``"conv"``, ``"batch_norm"``, ...), and which parameters are per-dimension tuples;
* :data:`MODULE_LOWERINGS` -- for each ``torch.nn`` module type, the canonical call it becomes;
* the aliases under which the same operations arrive from other front ends (``Tensor.mul`` as a
  method, ``torch.add``...), mapped onto :mod:`operator` functions.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OpSpec",
    "OPS",
    "ModuleLowering",
    "MODULE_LOWERINGS",
    "BINARY_ALIASES",
    "REQUIRED",
    "spec_of",
    "kind_of",
    "normalize_kwargs",
]


class _Required:
    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "REQUIRED"


REQUIRED: Any = _Required()
"""Marker for a parameter without a default."""


@dataclass(frozen=True)
class OpSpec:
    """Signature and meaning of one canonical operation.

    ``params`` lists ``(name, default)`` in positional order; ``tuple_params`` names the arguments
    that are expanded to one value per spatial dimension (``ndim`` of them); ``tensor_params`` names
    the arguments that hold weights or statistics (``get_attr`` nodes in the canonical form).
    """

    name: str
    target: Callable[..., Any]
    kind: str
    params: tuple[tuple[str, Any], ...]
    ndim: int = 0
    tuple_params: tuple[str, ...] = ()
    tensor_params: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.params)


def _conv(n: int) -> OpSpec:
    target = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return OpSpec(
        name=f"conv{n}d",
        target=target,
        kind="conv",
        params=(
            ("input", REQUIRED),
            ("weight", REQUIRED),
            ("bias", None),
            ("stride", 1),
            ("padding", 0),
            ("dilation", 1),
            ("groups", 1),
        ),
        ndim=n,
        tuple_params=("stride", "padding", "dilation"),
        tensor_params=("weight", "bias"),
    )


def _conv_transpose(n: int) -> OpSpec:
    target = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
    return OpSpec(
        name=f"conv_transpose{n}d",
        target=target,
        kind="conv_transpose",
        params=(
            ("input", REQUIRED),
            ("weight", REQUIRED),
            ("bias", None),
            ("stride", 1),
            ("padding", 0),
            ("output_padding", 0),
            ("groups", 1),
            ("dilation", 1),
        ),
        ndim=n,
        tuple_params=("stride", "padding", "output_padding", "dilation"),
        tensor_params=("weight", "bias"),
    )


def _pool(kind: str, n: int) -> OpSpec:
    if kind == "max_pool":
        target = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
        params = (
            ("input", REQUIRED),
            ("kernel_size", REQUIRED),
            ("stride", None),
            ("padding", 0),
            ("dilation", 1),
            ("ceil_mode", False),
            ("return_indices", False),
        )
        tuples = ("kernel_size", "stride", "padding", "dilation")
    else:
        target = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
        params = (
            ("input", REQUIRED),
            ("kernel_size", REQUIRED),
            ("stride", None),
            ("padding", 0),
            ("ceil_mode", False),
            ("count_include_pad", True),
        )
        if n > 1:
            params += (("divisor_override", None),)
        tuples = ("kernel_size", "stride", "padding")
    return OpSpec(name=f"{kind}{n}d", target=target, kind=kind, params=params, ndim=n, tuple_params=tuples)


def _build_ops() -> dict[Callable[..., Any], OpSpec]:
    specs: list[OpSpec] = []
    for n in (1, 2, 3):
        specs += [_conv(n), _conv_transpose(n), _pool("max_pool", n), _pool("avg_pool", n)]
    specs += [
        OpSpec(
            "linear", F.linear, "linear", (("input", REQUIRED), ("weight", REQUIRED), ("bias", None)),
            tensor_params=("weight", "bias"),
        ),
        OpSpec(
            "batch_norm", F.batch_norm, "batch_norm",
            (
                ("input", REQUIRED), ("running_mean", REQUIRED), ("running_var", REQUIRED),
                ("weight", None), ("bias", None), ("training", False), ("momentum", 0.1), ("eps", 1e-5),
            ),
            tensor_params=("running_mean", "running_var", "weight", "bias"),
        ),
        OpSpec("relu", F.relu, "relu", (("input", REQUIRED), ("inplace", False))),
        OpSpec("relu6", F.relu6, "relu6", (("input", REQUIRED), ("inplace", False))),
        OpSpec(
            "local_response_norm", F.local_response_norm, "lrn",
            (("input", REQUIRED), ("size", REQUIRED), ("alpha", 1e-4), ("beta", 0.75), ("k", 1.0)),
        ),
        OpSpec(
            "adaptive_avg_pool2d", F.adaptive_avg_pool2d, "adaptive_avg_pool",
            (("input", REQUIRED), ("output_size", REQUIRED)), ndim=2, tuple_params=("output_size",),
        ),
        OpSpec(
            "flatten", torch.flatten, "flatten",
            (("input", REQUIRED), ("start_dim", 0), ("end_dim", -1)),
        ),
        OpSpec("reshape", torch.reshape, "reshape", (("input", REQUIRED), ("shape", REQUIRED))),
        OpSpec("cat", torch.cat, "cat", (("tensors", REQUIRED), ("dim", 0))),
        OpSpec("narrow", torch.narrow, "narrow",
               (("input", REQUIRED), ("dim", REQUIRED), ("start", REQUIRED), ("length", REQUIRED))),
        OpSpec("pad", F.pad, "pad", (("input", REQUIRED), ("pad", REQUIRED), ("mode", "constant"), ("value", None))),
    ]
    for fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout):
        specs.append(
            OpSpec(
                fn.__name__, fn, "dropout",
                (("input", REQUIRED), ("p", 0.5), ("training", True), ("inplace", False)),
            )
        )
    return {spec.target: spec for spec in specs}


OPS: Mapping[Callable[..., Any], OpSpec] = _build_ops()
"""Canonical call targets and their specs, keyed by the function object."""

BINARY_ALIASES: Mapping[Any, Callable[[Any, Any], Any]] = {
    torch.add: operator.add,
    torch.sub: operator.sub,
    torch.subtract: operator.sub,
    torch.mul: operator.mul,
    torch.multiply: operator.mul,
    torch.div: operator.truediv,
    torch.true_divide: operator.truediv,
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "div": operator.truediv,
    "true_divide": operator.truediv,
}
"""Functions and ``Tensor`` method names that mean a plain binary operator (when called with two
operands and no ``alpha``/``out``/``rounding_mode``); capture rewrites them to ``operator.*``."""

METHOD_ALIASES: Mapping[str, Callable[..., Any]] = {
    "flatten": torch.flatten,
    "view": torch.reshape,
    "reshape": torch.reshape,
    "relu": F.relu,
}
"""``Tensor`` methods that capture rewrites to canonical functions."""


def spec_of(node: Any) -> OpSpec | None:
    """The :class:`OpSpec` of a canonical ``call_function`` node, or ``None``."""
    if getattr(node, "op", None) != "call_function":
        return None
    try:
        return OPS.get(node.target)
    except TypeError:  # unhashable target
        return None


def kind_of(node: Any) -> str | None:
    """The kind (``"conv"``, ``"batch_norm"``, ...) of a canonical node, or ``None``."""
    spec = spec_of(node)
    return spec.kind if spec is not None else None


def _expand(value: Any, n: int, name: str) -> Any:
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and n > 1:
            return tuple(value) * n
        if len(value) != n:
            raise ValueError(f"argument {name!r} has {len(value)} values, expected {n}")
        return tuple(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    return value  # a string ("same"/"valid") or a graph value: left for the rules to judge


def normalize_kwargs(spec: OpSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Bind ``args``/``kwargs`` to ``spec``'s parameters, fill defaults and expand tuple parameters.

    Raises ``TypeError`` (with the op's name) for arguments the spec does not know.
    """
    names = spec.names
    if len(args) > len(names):
        raise TypeError(f"{spec.name}: {len(args)} positional arguments, at most {len(names)} expected")
    bound = dict(zip(names, args))
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(f"{spec.name}: unexpected argument {key!r}")
        if key in bound:
            raise TypeError(f"{spec.name}: argument {key!r} given twice")
        bound[key] = value
    out: dict[str, Any] = {}
    for name, default in spec.params:
        value = bound.get(name, default)
        if value is REQUIRED:
            raise TypeError(f"{spec.name}: missing argument {name!r}")
        if name in spec.tuple_params and value is not None:
            value = _expand(value, spec.ndim, name)
        out[name] = value
    if spec.kind in ("max_pool", "avg_pool") and out["stride"] in (None, ()):
        out["stride"] = out["kernel_size"]
    return out


@dataclass(frozen=True)
class ModuleLowering:
    """How a ``torch.nn`` module call becomes a canonical functional call.

    ``tensors`` are module attributes passed as ``get_attr`` nodes (``None`` when the module has
    none); ``options`` reads the remaining arguments from the module; ``applies`` says whether the
    module can be lowered at all (a BatchNorm in training mode updates its statistics in place, so
    it stays a module call that the rules then refuse with that reason).
    """

    target: Callable[..., Any]
    tensors: tuple[str, ...] = ()
    options: Callable[[nn.Module], dict[str, Any]] = field(default=lambda m: {})
    applies: Callable[[nn.Module], bool] = field(default=lambda m: True)


def _conv_options(m: nn.Module) -> dict[str, Any]:
    # padding_mode != "zeros" is lowered by capture into an explicit F.pad followed by this call
    padding = 0 if m.padding_mode != "zeros" else m.padding
    return {"stride": m.stride, "padding": padding, "dilation": m.dilation, "groups": m.groups}


def _bn_applies(m: nn.Module) -> bool:
    return not m.training


def _bn_options(m: nn.Module) -> dict[str, Any]:
    # Mirrors _BatchNorm.forward in eval mode: without running statistics, batch statistics are used.
    uses_batch_stats = m.running_mean is None and m.running_var is None
    return {"training": uses_batch_stats, "momentum": 0.0 if m.momentum is None else m.momentum, "eps": m.eps}


def _pool_options(*names: str) -> Callable[[nn.Module], dict[str, Any]]:
    return lambda m: {name: getattr(m, name) for name in names}


def _build_module_lowerings() -> dict[type[nn.Module], ModuleLowering]:
    table: dict[type[nn.Module], ModuleLowering] = {}
    convs = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
    for cls, fn in convs.items():
        table[cls] = ModuleLowering(fn, ("weight", "bias"), _conv_options)
    transposed = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
                  nn.ConvTranspose3d: F.conv_transpose3d}
    for cls, fn in transposed.items():
        table[cls] = ModuleLowering(
            fn,
            ("weight", "bias"),
            lambda m: {"stride": m.stride, "padding": m.padding, "output_padding": m.output_padding,
                       "groups": m.groups, "dilation": m.dilation},
            applies=lambda m: m.padding_mode == "zeros",
        )
    table[nn.Linear] = ModuleLowering(F.linear, ("weight", "bias"))
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        table[cls] = ModuleLowering(
            F.batch_norm, ("running_mean", "running_var", "weight", "bias"), _bn_options, _bn_applies
        )
    table[nn.ReLU] = ModuleLowering(F.relu, options=lambda m: {"inplace": m.inplace})
    table[nn.ReLU6] = ModuleLowering(F.relu6, options=lambda m: {"inplace": m.inplace})
    for cls, fn in ((nn.MaxPool1d, F.max_pool1d), (nn.MaxPool2d, F.max_pool2d), (nn.MaxPool3d, F.max_pool3d)):
        table[cls] = ModuleLowering(
            fn, options=_pool_options("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        )
    table[nn.AvgPool1d] = ModuleLowering(
        F.avg_pool1d, options=_pool_options("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
    )
    for cls, fn in ((nn.AvgPool2d, F.avg_pool2d), (nn.AvgPool3d, F.avg_pool3d)):
        table[cls] = ModuleLowering(
            fn,
            options=_pool_options("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                                  "divisor_override"),
        )
    table[nn.AdaptiveAvgPool2d] = ModuleLowering(F.adaptive_avg_pool2d, options=_pool_options("output_size"))
    table[nn.LocalResponseNorm] = ModuleLowering(F.local_response_norm, options=_pool_options("size", "alpha", "beta", "k"))
    table[nn.Flatten] = ModuleLowering(torch.flatten, options=_pool_options("start_dim", "end_dim"))
    pads = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)
    for cls in pads:
        table[cls] = ModuleLowering(F.pad, options=lambda m: {"pad": tuple(m.padding), "mode": "constant",
                                                            "value": float(m.value)})
    dropouts = {nn.Dropout: F.dropout, nn.Dropout1d: F.dropout1d, nn.Dropout2d: F.dropout2d,
                nn.Dropout3d: F.dropout3d, nn.AlphaDropout: F.alpha_dropout,
                nn.FeatureAlphaDropout: F.feature_alpha_dropout}
    for cls, fn in dropouts.items():
        table[cls] = ModuleLowering(fn, options=lambda m: {"p": m.p, "training": m.training})
    return table


MODULE_LOWERINGS: Mapping[type[nn.Module], ModuleLowering] = _build_module_lowerings()
"""Module types that capture turns into canonical calls (exact type match, not subclasses: a
subclass may override ``forward``)."""
