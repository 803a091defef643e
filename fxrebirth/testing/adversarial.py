"""An adversarial catalog for :func:`fxrebirth.optimize`: models written to break a graph compiler.

Each :class:`Case` builds a fresh model (eval mode, seeded random weights, BatchNorms randomised so that
folds are not near-identity), its inputs at any ``(batch, size)``, the sizes to check, the options given
to ``optimize`` and the example ``(batch, size)`` it is optimised at. :func:`run_case` classifies what
happens (:class:`Outcome`):

* ``"mutated"``: ``optimize`` modified the user's model (parameter or buffer values or identities,
  plain tensor attributes, submodules, hooks, training flags), the example inputs, or global torch state;
* ``"crash"``: ``optimize`` or the returned module raised anything but :class:`fxrebirth.FxRebirthError`
  (or refused to run at the example's own size: batch and example shape must never be guarded);
* ``"wrong"``: at some size the result differs from a copy of the original beyond
  ``tolerance(output dtype)`` (outputs, the inputs after the call for models that mutate them, state
  such as buffers a forward increments, side effects such as hooks recording into a list, the output's
  memory format where the case asks for it);
* ``"refused"``: ``optimize`` raised :class:`fxrebirth.FxRebirthError` (a clear error: acceptable);
* ``"ok"``: otherwise; sizes at which the result raised a :class:`fxrebirth.FxRebirthError` (a shape
  guard) are listed in ``Outcome.guarded`` (acceptable).

The catalog also runs against older fxrebirth versions (no :mod:`fxrebirth.equivalence`, no
``ShapeGuardError``), so that before/after counts can be compared
(``tests/benchmarks/adversarial_sweep.py``).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fxrebirth.frontends.library import default_rules as _default_rules
from fxrebirth.frontends.library import optimize as _optimize
from fxrebirth.graph.capture import capture as _capture
from fxrebirth.graph.ops import kind_of
from fxrebirth.rewrite.rules import Match, Rule

try:  # the shared definition of "equivalent"
    from fxrebirth.equivalence import relative_error, tolerance
except ImportError:  # older fxrebirth (before fxrebirth.equivalence)
    from fxrebirth.frontends.library import relative_error

    _FALLBACK_TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2, torch.float64: 1e-10}

    def tolerance(dtype: torch.dtype) -> float:
        return _FALLBACK_TOLERANCES.get(dtype, 1e-5)

try:
    from fxrebirth.testing import randomize_batchnorm
except ImportError:  # pragma: no cover - every supported version has it
    randomize_batchnorm = None  # type: ignore[assignment]

FxRebirthError = fxrebirth.FxRebirthError
ShapeGuardError = getattr(fxrebirth, "ShapeGuardError", None)

__all__ = ["CLASSES", "STATUSES", "Case", "Outcome", "CASES", "cases", "run_case", "relative_error", "tolerance"]

CLASSES = ("inplace", "hooks", "shapes", "verification", "dtypes", "inputs", "own")
STATUSES = ("ok", "refused", "wrong", "crash", "mutated")
_SEVERITY = {"ok": 0, "refused": 1, "wrong": 2, "crash": 3, "mutated": 4}

Size = Any  # an int (square) or a (height, width) tuple


# ------------------------------------------------------------------------------------------------
# the case and outcome records
# ------------------------------------------------------------------------------------------------

@dataclass
class Case:
    """One adversarial model.

    ``build()`` returns a fresh model; ``inputs(batch, size)`` a fresh, seeded tuple of inputs;
    ``sizes`` are checked at batch 2 and at the example's batch; ``example`` is the ``(batch, size)``
    given to ``optimize``; ``options()`` returns its keyword options (a function, so that each run gets
    fresh rule instances). Optional: ``state(module)`` returns state to compare after every call (a
    buffer the forward increments, train-mode running statistics); ``records()`` returns a list a hook
    fills at run time (compared entry by entry); ``setup()`` installs something global and returns its
    teardown; ``entry(model, inputs, options)`` replaces the call to ``optimize`` (returns the module);
    ``check_format`` compares the output's memory format.
    """

    name: str
    klass: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, Size], tuple]
    sizes: Sequence[Size] = (18, 19, 23)
    example: tuple[int, Size] = (2, 18)
    options: Callable[[], dict] = dict
    description: str = ""
    state: Callable[[nn.Module], Any] | None = None
    records: Callable[[], list] | None = None
    setup: Callable[[], Callable[[], None]] | None = None
    entry: Callable[[nn.Module, tuple, dict], nn.Module] | None = None
    check_format: bool = False

    def __post_init__(self) -> None:
        if self.klass not in CLASSES:
            raise ValueError(f"case {self.name}: unknown class {self.klass!r}")


@dataclass
class Outcome:
    """What :func:`run_case` found: ``status`` is one of :data:`STATUSES`; ``detail`` says why;
    ``guarded`` lists the ``(batch, size)`` at which the result raised a clear error; ``compared`` counts
    the (batch, size) checks that ran."""

    name: str
    klass: str
    status: str
    detail: str = ""
    guarded: list = field(default_factory=list)
    compared: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "class": self.klass, "status": self.status, "detail": self.detail,
                "guarded": [list(g) for g in self.guarded], "compared": self.compared}


# ------------------------------------------------------------------------------------------------
# helpers for building cases
# ------------------------------------------------------------------------------------------------

def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]


def _gen(seed: int, batch: int, size: Size) -> torch.Generator:
    h, w = _hw(size)
    return torch.Generator().manual_seed(seed * 100003 + batch * 1009 + h * 31 + w)


def images(channels: int = 3, seed: int = 0, *, dtype: torch.dtype = torch.float32, scale: float = 1.0,
           channels_last: bool = False, dims: int = 2) -> Callable[[int, Size], tuple]:
    """An input builder of one ``(batch, channels, *spatial)`` tensor, seeded by (seed, batch, size)."""

    def make(batch: int, size: Size) -> tuple:
        spatial = {1: lambda s: (s,), 2: _hw, 3: lambda s: (s, s, s)}[dims](size)
        x = torch.randn((batch, channels) + tuple(spatial), generator=_gen(seed, batch, size), dtype=torch.float64)
        x = (x * scale).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return (x,)

    return make


def _seeded(seed: int, make: Callable[[], nn.Module], *, dtype: torch.dtype | None = None,
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


def conv_bn(cin: int = 3, cout: int = 8, k: int = 3, **kw: Any) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, **kw), nn.BatchNorm2d(cout))


# ------------------------------------------------------------------------------------------------
# inplace
# ------------------------------------------------------------------------------------------------

class _Unassigned(nn.Module):
    """conv -> an in-place op whose result is NOT reassigned -> conv2 reads the mutated tensor."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "module":
            self.relu(y)
        elif self.how == "relu_":
            y.relu_()
        elif self.how == "add_":
            y.add_(1)
        elif self.how == "torch.relu_":
            torch.relu_(y)
        elif self.how == "F.relu":
            F.relu(y, inplace=True)
        elif self.how == "clamp_":
            y.clamp_(min=-0.1, max=0.2)
        return self.bn(self.conv2(y))


class _MulBetweenConvBN(nn.Module):
    """``y.mul_(2)`` between a conv and the BN that would fold into it (result unassigned or used)."""

    def __init__(self, used: bool) -> None:
        super().__init__()
        self.used = used
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        if self.used:
            z = y.mul_(2)
            return self.bn(z)
        y.mul_(2)
        return self.bn(y)


class _UsedThenFold(nn.Module):
    """An in-place op whose result IS used, then conv -> BN that folds; and a read of the conv output
    taken BEFORE the mutation (bn1(y) then y.relu_()): a merge must not move that read past it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pre = nn.Conv2d(8, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        before = self.pre(y)          # reads y before the mutation
        z = y.relu_()                 # result used
        return self.bn2(self.conv2(z)) + before


class _SiblingAcrossMutation(nn.Module):
    """Two 1x1 convs of the same tensor, one before and one after it is mutated in place (the sibling
    merge would compute both at one point)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        first = self.a(y)
        y.add_(1.5)
        second = self.b(y)
        return torch.cat([self.bn(first), second], dim=1)


class _SiblingAcrossUsedMutation(nn.Module):
    """Like :class:`_SiblingAcrossMutation`, but the in-place result is used (so it is not dead code)
    and the second conv reads the mutated tensor by its old name."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        first = self.a(y)
        z = y.add_(1.5)
        second = self.b(y)
        return torch.cat([self.bn(first), second, z], dim=1)


class _ReadAfterMutation(nn.Module):
    """``z = y.mul_(2)`` then ``bn(y)``: the BN reads y AFTER the mutation (a fold of bn into conv would
    read it before)."""

    def __init__(self, returns_alias: bool = False) -> None:
        super().__init__()
        self.returns_alias = returns_alias
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        if self.returns_alias:  # two outputs that are one tensor: both must show the mutation
            return self.bn(y), y, y.relu_()
        z = y.mul_(2)
        return self.bn(y) + z


class _InputIadd(nn.Module):
    """``x += conv(x)`` on the model's own input (the caller's tensor is modified by the original)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        x += y
        return self.conv2(self.bn(x))


class _ReluInplaceOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(self.relu(x)))


class _ViewMutation(nn.Module):
    """In place through a view: ``y[:, :2].mul_(0)`` or ``y.view(b, -1).add_(1)``, then BN on y."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "slice":
            y[:, :2].mul_(0)
        elif self.how == "view":
            y.view(y.size(0), -1).add_(1)
        elif self.how == "setitem":
            y[:, 0] = 0
        elif self.how == "setitem_tensor":
            y[:, 1:3] = y[:, 5:7] * 2
        return self.bn(y)


class _BufferCounter(nn.Module):
    """A buffer the forward increments in place; the output depends on it (stateful)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count.add_(1)
        return self.bn(self.conv(x)) * self.count


class _ClampParameter(nn.Module):
    """An in-place clamp of a parameter inside forward (the first call changes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.linspace(-1.0, 2.0, 8).reshape(1, 8, 1, 1))

    def forward(self, x):
        with torch.no_grad():
            self.scale.clamp_(0.0, 1.0)
        return self.bn(self.conv(x)) * self.scale


class _OutArgument(nn.Module):
    """``torch.add(a, b, out=c)`` then BN on c."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        c = torch.zeros_like(a)
        torch.add(a, b, out=c)
        return self.bn(c)


class _BasicBlock(nn.Module):
    """torchvision-style BasicBlock: ``out += identity; out = self.relu(out)`` with inplace ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        x = self.stem(x)
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return out


class _DropoutInplace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5, inplace=True)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        self.drop(y)            # eval: identity even in place
        return self.conv2(self.bn(self.drop(y)))


# ------------------------------------------------------------------------------------------------
# hooks
# ------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------

class _ConvPool(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = pool
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.pool(self.bn(self.conv(x))))


class _SumBroadcast(nn.Module):
    """conv_a(x) + conv_b(x) with the same stride, equal output sizes at the example, but conv_b's
    output is 1x1 (and broadcasts) at other sizes."""

    def __init__(self, k_a: int, k_b: int, stride: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, k_a, stride=stride)
        self.b = nn.Conv2d(3, 8, k_b, stride=stride)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


class _SumSamePadding(nn.Module):
    """Summed convs with padding='same' and even kernels (asymmetric implicit padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 4, padding="same")
        self.b = nn.Conv2d(3, 8, 2, padding="same")
        self.c = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


class _LiteralView(nn.Module):
    """A view whose literal sizes equal the input's shape at the example only."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "view_size0":
            y = y.view(y.size(0), 8, 18, -1)
        elif self.how == "reshape_minus1":
            y = y.reshape(-1, 8, 18, 18)
        elif self.how == "flatten_unflatten":
            y = y.flatten(2).reshape(y.size(0), 8, 18, 18)
        return y * 2.0


class _Head(nn.Module):
    """conv -> BN -> adaptive pool -> view(x.size(0), -1) / flatten -> linear -> BN1d."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        out = 2 if how in ("flatten", "adaptive3") else 1
        if how == "adaptive3":
            out = 3
        self.pool = nn.AdaptiveAvgPool2d(out)
        self.fc = nn.Linear(8 * out * out, 6)
        self.bn1d = nn.BatchNorm1d(6)

    def forward(self, x):
        y = self.pool(self.bn(self.conv(x)))
        if self.how == "view":
            y = y.view(y.size(0), -1)
        else:
            y = torch.flatten(y, 1)
        return self.bn1d(self.fc(y))


class _AdaptiveThenConv(nn.Module):
    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = pool
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv2(self.pool(self.conv(x))))


class _Pad(nn.Module):
    def __init__(self, pad: tuple, mode: str = "constant", value: float | None = None, dilation: int = 1) -> None:
        super().__init__()
        self.pad, self.mode, self.value = pad, mode, value
        self.conv = nn.Conv2d(3, 8, 3, dilation=dilation)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if self.mode == "constant":
            x = F.pad(x, self.pad, value=0.0 if self.value is None else self.value)
        else:
            x = F.pad(x, self.pad, mode=self.mode)
        return self.bn(self.conv(x))


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


class _BatchShape(nn.Module):
    """Reads x.shape[0] as a Python number (x.size(0) arithmetic) for a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.bn(self.conv(x))
        n = x.shape[0]
        return y.reshape(n, 2, 4, y.shape[2], y.shape[3]).sum(1)


# ------------------------------------------------------------------------------------------------
# verification: user rules that are wrong
# ------------------------------------------------------------------------------------------------

def _clamp0(ctx, match, value):
    """relu as ``torch.clamp(min=0)``: not a canonical relu, so the wrong rule does not match its own
    output again (an even number of flips or negations would be the identity)."""
    return ctx.call(torch.clamp, like=match.output, input=value, min=0.0)


class _WrongReLURule(Rule):
    """Base of the deliberately wrong rules on ``relu(x)``: a subclass says what it puts in place of ``x``
    (:meth:`wrong`); the result is clamped at 0 (see :func:`_clamp0`)."""

    changes_parameters = False

    def pattern(self, node, ctx):
        if kind_of(node) == "relu" and isinstance(node.kwargs["input"], torch.fx.Node):
            return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))
        return None

    def wrong(self, x, match, ctx):
        raise NotImplementedError

    def rewrite(self, match, ctx):
        return _clamp0(ctx, match, self.wrong(match.inputs[0], match, ctx))


class _FlipBatchRule(_WrongReLURule):
    """WRONG: relu(x) -> relu(flip(x, batch)): right only for batch <= 1."""

    name = "adversarial_flip_batch"
    identity = "relu(x) = relu(flip(x, 0))  (false for batch > 1)"

    def wrong(self, x, match, ctx):
        return ctx.call(torch.flip, like=match.output, input=x, dims=[0])


class _BatchMeanRule(_WrongReLURule):
    """WRONG: relu(x) -> relu(mean over the batch of x, broadcast back): right only for batch <= 1."""

    name = "adversarial_batch_mean"
    identity = "relu(x) = relu(mean_batch(x) + 0 * x)  (false for batch > 1)"

    def wrong(self, x, match, ctx):
        mean = ctx.call(torch.mean, like=match.output, input=x, dim=(0,), keepdim=True)
        zeros = ctx.call(torch.mul, like=match.output, input=x, other=0.0)
        return ctx.call(torch.add, like=match.output, input=zeros, other=mean)


class _NegateRule(_WrongReLURule):
    """WRONG for every input: relu(x) -> relu(-x)."""

    name = "adversarial_negate"
    identity = "relu(x) = relu(-x)  (false)"

    def wrong(self, x, match, ctx):
        return ctx.call(torch.neg, like=match.output, input=x)


class _SpatialSpecialisedRule(Rule):
    """WRONG at other sizes: adaptive_avg_pool(x, 1) -> avg_pool(x, kernel = the example's H x W)."""

    name = "adversarial_fixed_window"
    identity = "adaptive_avg_pool(x, 1) = avg_pool(x, kernel=(H, W) of the example)  (false at other sizes)"
    changes_parameters = False

    def pattern(self, node, ctx):
        if kind_of(node) == "adaptive_avg_pool" and tuple(node.kwargs["output_size"]) == (1, 1):
            return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))
        return None

    def rewrite(self, match, ctx):
        shape = ctx.shape(match.inputs[0])
        return ctx.call(F.avg_pool2d, like=match.output, input=match.inputs[0], kernel_size=tuple(shape[2:]))


class _EditWeightRule(Rule):
    """Edits a conv weight IN PLACE in rewrite(), then returns a value that fails verification."""

    name = "adversarial_edit_weight"
    identity = "conv(x) = relu(x)  (false; and the weight is edited in place)"

    def pattern(self, node, ctx):
        if kind_of(node) != "conv" or not isinstance(node.kwargs["input"], torch.fx.Node):
            return None
        if ctx.shape(node) != ctx.shape(node.kwargs["input"]):
            return None
        return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))

    def rewrite(self, match, ctx):
        with torch.no_grad():
            ctx.stored(match.output.kwargs["weight"]).mul_(3.0)
        return ctx.call(F.relu, like=match.output, input=match.inputs[0])


class _EditConstantRule(_EditWeightRule):
    """Edits the tensor ``ctx.constant`` returned (it shares storage), then fails verification."""

    name = "adversarial_edit_constant"

    def rewrite(self, match, ctx):
        weight = ctx.constant(match.output.kwargs["weight"])
        with torch.no_grad():
            weight.add_(0.5)
        return ctx.call(F.relu, like=match.output, input=match.inputs[0])


class _RewiresItselfRule(_NegateRule):
    """Breaks the contract: rewires the users itself (a wrong value) before returning."""

    name = "adversarial_rewires_itself"

    def rewrite(self, match, ctx):
        new = _NegateRule.rewrite(self, match, ctx)
        match.output.replace_all_uses_with(new)
        return new


class _WrongShapeRule(_EditWeightRule):
    """Returns a node of a different shape (the conv's input, whose channels differ)."""

    name = "adversarial_wrong_shape"

    def pattern(self, node, ctx):
        if kind_of(node) != "conv" or not isinstance(node.kwargs["input"], torch.fx.Node):
            return None
        return Match(output=node, inputs=(node.kwargs["input"],), nodes=(node,))

    def rewrite(self, match, ctx):
        return match.inputs[0]


def _rules_then_defaults(*rules: Rule) -> list:
    return list(rules) + list(_default_rules())


class _ReluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.conv2(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(self.pool(y), 1))


def _fp16_overflow_stats(model: nn.Module) -> None:
    """running_var 1e-6, weight 2000: BN's scale 2000 / sqrt(1.1e-5) = 6.0e5 > float16's 65504."""
    bn = model[1]
    bn.running_mean.zero_()
    bn.running_var.fill_(1e-6)
    bn.weight.fill_(2000.0)
    bn.bias.zero_()


# ------------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------------

class _ImageAndIndex(nn.Module):
    """An image and an integer index input (embedding added per sample), and an index_select."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.embed = nn.Embedding(10, 8)

    def forward(self, x, idx):
        y = self.bn(self.conv(x))
        return y + self.embed(idx)[:, :, None, None]


def _image_and_index(batch: int, size: Size) -> tuple:
    (x,) = images(3, 7)(batch, size)
    idx = torch.randint(0, 10, (batch,), generator=_gen(8, batch, size))
    return x, idx


class _ChannelPicker(nn.Module):
    """An integer tensor input that indexes channels (gather along dim 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x, channels):
        y = self.bn(self.conv(x))
        return self.conv2(torch.index_select(y, 1, channels))


def _picker_inputs(batch: int, size: Size) -> tuple:
    (x,) = images(3, 9)(batch, size)
    return x, torch.tensor([7, 0, 3, 3])


def _inference_mode_build() -> nn.Module:
    with torch.inference_mode():
        return _seeded(40, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 8)))()


def _resnet18(seed: int, channels_last: bool = False) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return torchvision.models.resnet18(weights=None, num_classes=10)

    return _seeded(seed, make, channels_last=channels_last)


def _mobilenet(seed: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)

    return _seeded(seed, make)


# ------------------------------------------------------------------------------------------------
# inputs / own
# ------------------------------------------------------------------------------------------------

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


class _Tied(nn.Module):
    """Two convs sharing ONE weight Parameter, each followed by its own BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.bn1 = nn.BatchNorm2d(8)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.cat([self.bn1(self.c1(x)), self.bn2(self.c2(x.flip(-1)))], 1)


class _TiedLinear(nn.Module):
    """A Linear and a conv-free head that reuse the same weight (embedding-style tying) with BN1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc2.weight = self.fc1.weight
        self.bn1 = nn.BatchNorm1d(8)

    def forward(self, x):
        y = torch.flatten(self.pool(self.conv(x)), 1)
        return self.fc2(torch.relu(self.bn1(self.fc1(y))))


class _UsedTwice(nn.Module):
    """One conv module used twice, a BN after only one of the uses."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        s = self.stem(x)
        return self.bn(self.conv(s)) + self.conv(torch.relu(s))


class _SharedBN(nn.Module):
    """One BN module after two different convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.a(x)) * self.bn(self.b(x))


class _NonPersistent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("scale", torch.linspace(0.5, 2.0, 8).reshape(1, 8, 1, 1), persistent=False)
        self.register_buffer("shift", torch.linspace(-1.0, 1.0, 8).reshape(1, 8, 1, 1), persistent=False)
        self.conv2 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.conv2(self.bn(self.conv(x)) * self.scale + self.shift)


class _LinearBN3d(nn.Module):
    """Linear over the LAST dim of (N, C, L), then BatchNorm1d over dim 1 (C): not Linear's features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.bn = nn.BatchNorm1d(16)

    def forward(self, x):
        return self.bn(self.fc(x))


def _seq_inputs(batch: int, size: Size) -> tuple:
    return (torch.randn(batch, 16, 16, generator=_gen(13, batch, size)),)


class _BNTrainState(nn.Module):
    """A BN left in TRAIN mode (statistics updated per call) between two eval convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = conv_bn(8, 8)

    def forward(self, x):
        return self.conv2(self.bn(self.conv(x)))


def _bn_train_build() -> nn.Module:
    model = _seeded(60, _BNTrainState)()
    model.bn.train()
    return model


def _copy_model_false(model: nn.Module, inputs: tuple, options: dict) -> nn.Module:
    """``copy_model=False`` where the entry point has it: optimize, else capture."""
    if "copy_model" in inspect.signature(fxrebirth.optimize).parameters:
        return _optimize(model, inputs, copy_model=False, **options)[0]
    return _capture(model, inputs, copy_model=False)


class _ConvTBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 8, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.bn(self.up(x))))


class _FoldFollowingPadded(nn.Module):
    """BN before a padded conv (bn_into_following must refuse: padding sees 0, not the shift)."""

    def __init__(self, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, padding_mode=padding_mode)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(self.conv(self.bn(x))))


class _ConvChainStrided(nn.Module):
    """Two convs in a chain, the first strided (chain merge is exact only under conditions)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.b(self.a(x)))


class _ConvLinearFlatten(nn.Module):
    """conv -> flatten -> linear (merge of a flattened conv into the linear): only the example size
    is valid for the original."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.bn(self.conv(x)), 1))


class _ExpandIdentity(nn.Module):
    """x + conv(x) where x has ONE channel and the conv has 8 (a broadcast in the channel dim)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.conv(x)) + x


class _ScalarAttr(nn.Module):
    """A plain Python float attribute and a tensor constant created in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.alpha = 0.3

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * self.alpha + torch.ones(1, 8, 1, 1) * 0.1


# ------------------------------------------------------------------------------------------------
# the catalog
# ------------------------------------------------------------------------------------------------

_NOCOST = lambda: {"cost_model": None}  # noqa: E731 - accept every exact merge (a documented option)


def _state_count(module: nn.Module) -> Any:
    return module.get_buffer("count").clone()


def _state_bn(module: nn.Module) -> Any:
    return [module.get_buffer("bn.running_mean").clone(), module.get_buffer("bn.running_var").clone(),
            module.get_buffer("bn.num_batches_tracked").clone()]


def _state_scale(module: nn.Module) -> Any:
    return module.get_parameter("scale").detach().clone()


def _make_cases() -> list[Case]:
    img = images
    c: list[Case] = []

    def add(name: str, klass: str, build: Callable[[], nn.Module], inputs: Callable[[int, Size], tuple] | None = None,
            **kw: Any) -> None:
        c.append(Case(name, klass, build, inputs or img(3, len(c)), **kw))

    # -- inplace -----------------------------------------------------------------------------------
    add("relu_module_inplace_unassigned", "inplace", _seeded(1, lambda: _Unassigned("module")),
        description="nn.ReLU(inplace=True) called as self.relu(y), result not reassigned, y used")
    add("relu_method_unassigned", "inplace", _seeded(2, lambda: _Unassigned("relu_")), description="y.relu_()")
    add("add_method_unassigned", "inplace", _seeded(3, lambda: _Unassigned("add_")), description="y.add_(1)")
    add("torch_relu_unassigned", "inplace", _seeded(4, lambda: _Unassigned("torch.relu_")),
        description="torch.relu_(y)")
    add("functional_relu_inplace_unassigned", "inplace", _seeded(5, lambda: _Unassigned("F.relu")),
        description="F.relu(y, inplace=True)")
    add("clamp_method_unassigned", "inplace", _seeded(6, lambda: _Unassigned("clamp_")),
        description="y.clamp_(min, max), result not reassigned")
    add("mul_between_conv_bn", "inplace", _seeded(7, lambda: _MulBetweenConvBN(False)),
        description="y.mul_(2) between conv and BN, result not reassigned")
    add("mul_between_conv_bn_used", "inplace", _seeded(8, lambda: _MulBetweenConvBN(True)),
        description="z = y.mul_(2); bn(z)")
    add("inplace_used_then_fold", "inplace", _seeded(9, _UsedThenFold),
        description="a read of y before y.relu_() (result used), then conv->BN that folds")
    add("sibling_convs_across_mutation", "inplace", _seeded(10, _SiblingAcrossMutation), options=_NOCOST,
        description="1x1 convs of y before and after y.add_(1.5) (sibling merge candidates)")
    add("sibling_convs_across_used_mutation", "inplace", _seeded(22, _SiblingAcrossUsedMutation), options=_NOCOST,
        description="a(y); z = y.add_(1.5); b(y); cat([bn(a), b, z]): the sibling merge must not move b's read")
    add("bn_reads_after_mutation", "inplace", _seeded(23, _ReadAfterMutation),
        description="z = y.mul_(2); bn(y) + z: the BN reads the mutated conv output")
    add("outputs_alias_mutated_tensor", "inplace", _seeded(24, lambda: _ReadAfterMutation(returns_alias=True)),
        description="return bn(y), y, y.relu_(): the second output aliases the mutated tensor")
    add("input_iadd", "inplace", _seeded(11, _InputIadd),
        description="x += conv(x) on the model's input; the example must stay untouched")
    add("relu_inplace_on_input", "inplace", _seeded(12, _ReluInplaceOnInput),
        description="nn.ReLU(inplace=True) applied to the model's input")
    add("view_slice_mul_zero", "inplace", _seeded(13, lambda: _ViewMutation("slice")),
        description="y[:, :2].mul_(0) then BN(y)")
    add("view_add", "inplace", _seeded(14, lambda: _ViewMutation("view")),
        description="y.view(b, -1).add_(1) then BN(y)")
    add("setitem_zero", "inplace", _seeded(15, lambda: _ViewMutation("setitem")), description="y[:, 0] = 0")
    add("setitem_tensor", "inplace", _seeded(16, lambda: _ViewMutation("setitem_tensor")),
        description="y[:, 1:3] = y[:, 5:7] * 2")
    add("buffer_counter", "inplace", _seeded(17, _BufferCounter), state=_state_count,
        description="self.count.add_(1) in forward; output scaled by it")
    add("parameter_clamp_in_forward", "inplace", _seeded(18, _ClampParameter), state=_state_scale,
        description="self.scale.clamp_(0, 1) under no_grad inside forward")
    add("out_argument", "inplace", _seeded(19, _OutArgument), description="torch.add(a, b, out=c); bn(c)")
    add("basicblock_inplace_relu", "inplace", _seeded(20, _BasicBlock),
        description="out += identity; out = self.relu(out) (inplace ReLU, torchvision BasicBlock)")
    add("dropout_inplace_eval", "inplace", _seeded(21, _DropoutInplace), description="nn.Dropout(inplace=True) in eval")

    # -- hooks -------------------------------------------------------------------------------------
    for i, kind in enumerate(["conv_forward", "bn_forward", "conv_pre", "bn_pre", "relu_forward", "root_forward",
                              "root_pre", "kwargs_pre"]):
        add(f"hook_{kind}", "hooks", _seeded(100 + i, _hooked(kind)),
            description=f"{kind.replace('_', ' ')} hook that changes the value")
    for i, kind in enumerate(["spectral", "spectral_loaded", "weight_norm", "weight_norm_loaded", "parametrize",
                              "parametrizations.weight_norm", "parametrizations.spectral_norm"]):
        add(f"norm_{kind.replace('.', '_')}", "hooks", _seeded(110 + i, _norm_wrapped(kind)),
            description={"spectral": "old-style nn.utils.spectral_norm (a pre-hook; cached weight is stale)",
                         "spectral_loaded": "old-style spectral_norm, weight_orig edited after wrapping",
                         "weight_norm": "old-style nn.utils.weight_norm (a pre-hook)",
                         "weight_norm_loaded": "old-style weight_norm, weight_g edited after wrapping (stale cache)",
                         "parametrize": "register_parametrization(conv, 'weight', abs - 0.1)",
                         "parametrizations.weight_norm": "new-style parametrizations.weight_norm",
                         "parametrizations.spectral_norm": "new-style parametrizations.spectral_norm"}[kind])
    add("hook_records_list", "hooks", _seeded(120, _recording), records=lambda: _RECORDS["hook_records_list"],
        description="forward hooks on two BNs append outputs to a Python list")
    add("hooked_module_called_twice", "hooks", _seeded(121, _CalledTwice),
        description="one conv with an output hook called twice, BN after the second")
    add("global_forward_hook", "hooks", _seeded(122, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 4))),
        setup=_global_hook_setup, description="register_module_forward_hook adding 0.75 to every Conv2d output")
    add("global_forward_pre_hook", "hooks", _seeded(123, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 4))),
        setup=_global_pre_hook_setup, description="register_module_forward_pre_hook scaling every BN's input")

    # -- shapes ------------------------------------------------------------------------------------
    add("avgpool_ceil_mode", "shapes", _seeded(200, lambda: _ConvPool(nn.AvgPool2d(2, ceil_mode=True))),
        description="conv + AvgPool2d(2, ceil_mode=True) optimised at 18, checked at 19, 23")
    add("avgpool_ceil_mode_nocost", "shapes", _seeded(201, lambda: _ConvPool(nn.AvgPool2d(2, ceil_mode=True))),
        options=_NOCOST, description="the same with cost_model=None")
    add("avgpool_ceil_pad", "shapes",
        _seeded(202, lambda: _ConvPool(nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True))), options=_NOCOST,
        sizes=(18, 19, 20, 23), description="AvgPool2d(3, 2, padding=1, ceil_mode=True) after conv")
    add("avgpool_exclude_pad", "shapes",
        _seeded(203, lambda: _ConvPool(nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False))),
        options=_NOCOST, description="AvgPool2d(count_include_pad=False) after conv")
    add("avgpool_divisor_override", "shapes",
        _seeded(204, lambda: _ConvPool(nn.AvgPool2d(2, divisor_override=3))), options=_NOCOST,
        description="AvgPool2d(2, divisor_override=3) after conv")
    add("sum_broadcast_1x1_at_other_sizes", "shapes", _seeded(205, lambda: _SumBroadcast(1, 9, 9)), options=_NOCOST,
        sizes=(18, 12, 16, 19), description="conv(k1,s9) + conv(k9,s9): equal 2x2 at 18, 2x2 + 1x1 broadcast at 12, 16")
    add("sum_broadcast_small", "shapes", _seeded(206, lambda: _SumBroadcast(1, 3, 3)), options=_NOCOST,
        example=(2, 3), sizes=(3, 4, 5, 6), description="conv(k1,s3) + conv(k3,s3): 1x1 each at 3, broadcast at 4, 5")
    add("sum_same_padding_even_kernels", "shapes", _seeded(207, _SumSamePadding), options=_NOCOST,
        description="conv(k4, 'same') + conv(k2, 'same') + conv(k3, p1): asymmetric implicit padding")
    add("view_literal_noop_at_example", "shapes", _seeded(208, lambda: _LiteralView("view_size0")),
        sizes=(18, (36, 9), (9, 36), (12, 27)), description="y.view(y.size(0), 8, 18, -1): a no-op at 18x18 only")
    add("reshape_literal_batch_minus1", "shapes", _seeded(209, lambda: _LiteralView("reshape_minus1")),
        example=(1, 18), sizes=(18, (36, 9), (27, 12)), description="y.reshape(-1, 8, 18, 18), batch-1 example")
    add("flatten_reshape_literal", "shapes", _seeded(210, lambda: _LiteralView("flatten_unflatten")),
        sizes=(18, (36, 9), (6, 54)), description="y.flatten(2).reshape(n, 8, 18, 18)")
    add("view_size0_minus1_head", "shapes", _seeded(211, lambda: _Head("view")),
        description="adaptive pool(1) -> x.view(x.size(0), -1) -> Linear -> BN1d")
    add("flatten_head", "shapes", _seeded(212, lambda: _Head("flatten")),
        description="adaptive pool(2) -> flatten -> Linear -> BN1d")
    add("adaptive_avg_pool_3", "shapes", _seeded(213, lambda: _Head("adaptive3")), sizes=(18, 19, 23, 8),
        description="AdaptiveAvgPool2d(3) (window depends on the size) -> flatten -> Linear")
    add("adaptive_pool_then_1x1", "shapes", _seeded(214, lambda: _AdaptiveThenConv(nn.AdaptiveAvgPool2d((2, 3)))),
        sizes=(18, 19, 23, 7), description="AdaptiveAvgPool2d((2, 3)) between a conv and a 1x1 conv + BN")
    add("adaptive_max_pool", "shapes", _seeded(215, lambda: _AdaptiveThenConv(nn.AdaptiveMaxPool2d(3))),
        description="AdaptiveMaxPool2d(3) between convs")
    add("global_pool_before_1x1", "shapes", _seeded(216, lambda: _AdaptiveThenConv(nn.AdaptiveAvgPool2d(1))),
        description="global pooling commuted before a 1x1 conv")
    add("example_batch_1", "shapes", _seeded(217, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 8))),
        example=(1, 18), description="batch-1 example, checked at batch 2")
    add("example_batch_0", "shapes", _seeded(218, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 8))),
        example=(0, 18), description="batch-0 example, checked at batch 2")
    add("batch_from_shape_reshape", "shapes", _seeded(219, _BatchShape), example=(1, 18),
        description="reshape(x.shape[0], 2, 4, h, w).sum(1) with a batch-1 example")
    add("pad_asymmetric", "shapes", _seeded(220, lambda: _Pad((0, 1, 0, 1))),
        description="F.pad(x, (0, 1, 0, 1)) then conv (asymmetric zero pad)")
    add("pad_reflect_functional", "shapes", _seeded(221, lambda: _Pad((1, 1, 1, 1), mode="reflect")),
        description="F.pad(x, 1, mode='reflect') then conv")
    add("pad_nonzero_value", "shapes", _seeded(222, lambda: _Pad((1, 1, 1, 1), value=1.0)),
        description="F.pad(x, 1, value=1.0) then conv")
    add("pad_negative", "shapes", _seeded(223, lambda: _Pad((-1, -1, -1, -1))),
        description="F.pad with negative amounts (a crop) then conv")
    add("pad_dilated", "shapes", _seeded(224, lambda: _Pad((2, 2, 2, 2), dilation=2)),
        description="F.pad(x, 2) then a dilated conv")

    # -- verification ------------------------------------------------------------------------------
    add("wrong_rule_flip_batch_b1", "verification", _seeded(300, _ReluNet), example=(1, 18),
        options=lambda: {"rules": _rules_then_defaults(_FlipBatchRule())},
        description="user rule relu(x) -> relu(flip(x, 0)) (right only at batch 1), batch-1 example")
    add("wrong_rule_batch_mean_b1", "verification", _seeded(301, _ReluNet), example=(1, 18),
        options=lambda: {"rules": [_BatchMeanRule()]},
        description="user rule relu(x) -> relu(mean over batch), batch-1 example")
    add("wrong_rule_batch0", "verification", _seeded(302, _ReluNet), example=(0, 18),
        options=lambda: {"rules": _rules_then_defaults(_NegateRule())},
        description="user rule relu(x) -> relu(-x) (always wrong), batch-0 example")
    add("wrong_rule_spatial_specialised", "verification", _seeded(303, _ReluNet),
        options=lambda: {"rules": _rules_then_defaults(_SpatialSpecialisedRule())},
        description="user rule adaptive_avg_pool(1) -> avg_pool(kernel = example H x W)")
    add("rule_edits_weight_in_place", "verification", _seeded(304, lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))),
        options=lambda: {"rules": [_EditWeightRule()]},
        description="rule multiplies a conv weight in place in rewrite(), then fails verification")
    add("rule_edits_constant_in_place", "verification", _seeded(305, lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))),
        options=lambda: {"rules": [_EditConstantRule()]},
        description="rule edits the tensor ctx.constant() returned, then fails verification")
    add("rule_rewires_users_itself", "verification", _seeded(306, _ReluNet),
        options=lambda: {"rules": [_RewiresItselfRule()]},
        description="rule breaks the contract: rewires users to a wrong value itself")
    add("rule_returns_wrong_shape", "verification", _seeded(307, lambda: nn.Sequential(conv_bn(), nn.ReLU())),
        options=lambda: {"rules": [_WrongShapeRule()]},
        description="rule returns a node of another shape (the conv's input)")
    add("fp16_bn_fold_overflow", "verification", _seeded(309, lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)),
                dtype=torch.float16, after=_fp16_overflow_stats),
        img(3, 309, dtype=torch.float16, scale=1e-3),
        description="float16 conv->BN with running_var 1e-6, weight 2000: folded weight overflows")

    # -- dtypes ------------------------------------------------------------------------------------
    chain = lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 8), nn.Conv2d(8, 4, 1))  # noqa: E731
    add("float16_conv_bn", "dtypes", _seeded(400, chain, dtype=torch.float16), img(3, 400, dtype=torch.float16))
    add("bfloat16_conv_bn", "dtypes", _seeded(401, chain, dtype=torch.bfloat16), img(3, 401, dtype=torch.bfloat16))
    add("float64_conv_bn", "dtypes", _seeded(402, chain, dtype=torch.float64), img(3, 402, dtype=torch.float64))
    add("channels_last_conv_bn", "dtypes", _seeded(403, chain, channels_last=True), img(3, 403, channels_last=True),
        check_format=True, description="channels_last model and input; output memory format must match")
    add("channels_last_resnet18", "dtypes", _resnet18(404, channels_last=True), img(3, 404, channels_last=True),
        sizes=(32, 40), example=(2, 32), description="torchvision resnet18, channels_last")
    add("integer_index_input", "dtypes", _seeded(405, _ImageAndIndex), _image_and_index,
        description="an image and a LongTensor of embedding indices")
    add("integer_channel_picker", "dtypes", _seeded(406, _ChannelPicker), _picker_inputs,
        description="an integer tensor input that index_selects channels after a BN")
    add("built_under_inference_mode", "dtypes", _inference_mode_build,
        description="model built under torch.inference_mode()")
    add("bfloat16_channels_last", "dtypes", _seeded(407, chain, dtype=torch.bfloat16, channels_last=True),
        img(3, 407, dtype=torch.bfloat16, channels_last=True), check_format=True)

    # -- inputs ------------------------------------------------------------------------------------
    add("dict_output", "inputs", _seeded(500, _DictOut), description="returns a dict of tensors")
    add("list_output", "inputs", _seeded(501, lambda: _DictOut(as_list=True)), description="returns a list")
    add("two_inputs", "inputs", _seeded(502, _TwoInputs), _two_inputs, description="forward(x, z)")
    add("tuple_argument", "inputs", _seeded(503, _TupleArg), _tuple_arg, description="forward((x, z)): one tuple arg")
    add("copy_model_false", "inputs", _seeded(504, lambda: nn.Sequential(conv_bn(), nn.ReLU(), conv_bn(8, 8))),
        entry=_copy_model_false, description="copy_model=False (optimize if it has it, else capture)")
    add("shape_dependent_branch", "inputs", _seeded(505, _ShapeBranch), sizes=(18, 19, 20),
        description="forward reads x.shape to choose a branch")
    add("resnet18", "inputs", _resnet18(506), img(3, 506), sizes=(32, 40), example=(2, 32),
        description="torchvision resnet18 (weights=None)")
    add("mobilenet_v3_small", "inputs", _mobilenet(507), img(3, 507), sizes=(32, 40), example=(2, 32),
        description="torchvision mobilenet_v3_small (weights=None)")

    # -- own ---------------------------------------------------------------------------------------
    add("tied_conv_weights", "own", _seeded(600, _Tied), description="two convs sharing one Parameter, own BN each")
    add("tied_linear_weights", "own", _seeded(601, _TiedLinear), description="two Linears sharing one weight, BN1d after one")
    add("module_used_twice_bn_once", "own", _seeded(602, _UsedTwice), description="one conv called twice, BN after one use")
    add("bn_shared_by_two_convs", "own", _seeded(603, _SharedBN), description="one BN module after two convs")
    add("nonpersistent_buffers", "own", _seeded(604, _NonPersistent), description="scale/shift buffers, persistent=False")
    add("conv_padding_reflect", "own", _seeded(605, lambda: _FoldFollowingPadded("reflect")),
        description="BN -> conv(padding_mode='reflect') -> conv -> BN")
    add("conv_padding_circular", "own", _seeded(606, lambda: _FoldFollowingPadded("circular")),
        description="BN -> conv(padding_mode='circular') -> conv -> BN")
    add("bn_before_zero_padded_conv", "own", _seeded(607, lambda: _FoldFollowingPadded("zeros")),
        description="BN -> zero-padded conv (fold into following must refuse)")
    add("conv_transpose_bn", "own", _seeded(608, _ConvTBN), description="ConvTranspose2d(s2, output_padding=1) + BN")
    add("conv1d_bn", "own", _seeded(609, lambda: nn.Sequential(
        nn.Conv1d(3, 8, 3, padding=1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 8, 1), nn.BatchNorm1d(8))),
        img(3, 609, dims=1), sizes=(18, 19, 23))
    add("conv3d_bn", "own", _seeded(610, lambda: nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 4, 1), nn.BatchNorm3d(4))),
        img(3, 610, dims=3), sizes=(6, 7, 9), example=(2, 6))
    add("linear_bn1d_on_3d_input", "own", _seeded(611, _LinearBN3d), _seq_inputs, sizes=(16,), example=(2, 16),
        description="Linear over the last dim of (N, C, L), then BatchNorm1d over C (not Linear's features)")
    add("bn_train_mode_state", "own", _bn_train_build, state=_state_bn,
        description="a BN in train mode: its running statistics must update as in the original")
    add("bn_no_running_stats", "own", _seeded(612, lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, track_running_stats=False), nn.Conv2d(8, 8, 1))),
        description="eval-mode BN without running stats (batch statistics at inference)")
    add("conv_chain_strided", "own", _seeded(613, _ConvChainStrided), options=_NOCOST, sizes=(18, 19, 23, 24),
        description="strided conv -> padded conv chain")
    add("conv_flatten_linear", "own", _seeded(614, _ConvLinearFlatten), example=(2, 6), sizes=(6,),
        options=_NOCOST, description="conv -> BN -> flatten -> Linear (only the example size is valid)")
    add("channel_broadcast_residual", "own", _seeded(615, _ExpandIdentity), img(1, 615), options=_NOCOST,
        description="bn(conv(x)) + x with x of 1 channel (channel broadcast)")
    add("python_scalar_attribute", "own", _seeded(616, _ScalarAttr), description="y * self.alpha + torch.ones(...) * 0.1")
    add("grouped_then_pointwise", "own", _seeded(617, lambda: nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1),
        nn.BatchNorm2d(8))), options=_NOCOST, description="grouped conv -> BN -> 1x1 conv -> BN chain")
    add("dilated_sum_branches", "own", _seeded(618, lambda: _DilatedSum()), options=_NOCOST,
        description="conv(k3, d2, p2) + conv(k3, p1) + conv(k1): centres on different dilation grids")
    return c


class _DilatedSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, dilation=2, padding=2)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x) + self.c(x)


CASES: list[Case] = _make_cases()


def cases(klass: str | None = None) -> list[Case]:
    """The catalog (optionally one class)."""
    return [c for c in CASES if klass is None or c.klass == klass]


# ------------------------------------------------------------------------------------------------
# running a case
# ------------------------------------------------------------------------------------------------

def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except Exception:  # noqa: BLE001 - inference tensors have no version counter
        return None


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.equal(a, b) or torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
    return bool(torch.equal(a, b))


def _hook_ids(m: nn.Module) -> tuple:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return tuple(tuple((k, id(v)) for k, v in getattr(m, n, {}).items()) for n in names)


def _snapshot_model(model: nn.Module) -> dict[str, Any]:
    snap: dict[str, Any] = {}

    def tensor(key: str, t: torch.Tensor, identity: bool = True) -> None:
        snap[key] = (id(t) if identity else None, t.detach().clone(), _version(t))

    for name, p in model.named_parameters(remove_duplicate=False):
        tensor("parameter " + name, p)
    for name, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            tensor("buffer " + name, b)
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, torch.Tensor):
            tensor("state_dict " + name, t)
    for name, m in model.named_modules(remove_duplicate=False):
        snap["module " + (name or "<root>")] = (type(m), id(m), m.training, _hook_ids(m))
        for attr, value in vars(m).items():  # plain tensor attributes (old-style spectral/weight norm)
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                tensor(f"attribute {name or '<root>'}.{attr}", value, identity=False)
    return snap


def _global_state() -> dict[str, Any]:
    module = torch.nn.modules.module
    return {
        "grad enabled": torch.is_grad_enabled(),
        "inference mode": torch.is_inference_mode_enabled(),
        "default dtype": torch.get_default_dtype(),
        "global forward hooks": tuple(getattr(module, "_global_forward_hooks", {}).keys()),
        "global forward pre-hooks": tuple(getattr(module, "_global_forward_pre_hooks", {}).keys()),
    }


def _diff_model(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    problems = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            problems.append(f"{key} removed")
        elif key not in before:
            problems.append(f"{key} added")
        else:
            b, a = before[key], after[key]
            if key.startswith("module "):
                if b != a:
                    what = ["type", "identity", "training flag", "hooks"]
                    problems.append(f"{key}: {', '.join(w for w, x, y in zip(what, b, a) if x != y)} changed")
            else:
                if b[0] is not None and b[0] != a[0]:
                    problems.append(f"{key}: replaced by another tensor")
                elif not _same_tensor(b[1], a[1]):
                    problems.append(f"{key}: values changed")
                elif b[2] is not None and a[2] is not None and b[2] != a[2]:
                    problems.append(f"{key}: modified in place (version {b[2]} -> {a[2]})")
    return problems


def _flat_tensors(value: Any, prefix: str = "input") -> list[tuple[str, torch.Tensor]]:
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, (list, tuple)):
        return [item for i, v in enumerate(value) for item in _flat_tensors(v, f"{prefix}[{i}]")]
    if isinstance(value, dict):
        return [item for k, v in value.items() for item in _flat_tensors(v, f"{prefix}[{k!r}]")]
    return []


def _snapshot_inputs(inputs: tuple) -> list[tuple[str, torch.Tensor, torch.Tensor, int | None, tuple]]:
    return [(n, t, t.detach().clone(), _version(t), t.stride()) for n, t in _flat_tensors(inputs)]


def _diff_inputs(snap: list) -> list[str]:
    problems = []
    for name, t, clone, version, stride in snap:
        if not _same_tensor(t.detach(), clone) or t.stride() != stride:
            problems.append(f"example {name} modified")
        elif version is not None and _version(t) is not None and _version(t) != version:
            problems.append(f"example {name} modified in place (version {version} -> {_version(t)})")
    return problems


def _first_float_dtype(value: Any) -> torch.dtype:
    for _, t in _flat_tensors(value):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _describe_exc(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def _memory_formats(value: Any) -> list[bool]:
    return [t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
            for _, t in _flat_tensors(value) if t.dim() == 4]


def _fmt_size(size: Size) -> str:
    return str(size) if isinstance(size, int) else "x".join(map(str, size))


def run_case(case: Case) -> Outcome:
    """Optimise ``case``'s model at its example and classify what happens (see the module docstring)."""
    teardown = case.setup() if case.setup is not None else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _run(case)
    finally:
        if teardown is not None:
            teardown()


def _run(case: Case) -> Outcome:
    out = lambda status, detail="", **kw: Outcome(case.name, case.klass, status, detail, **kw)  # noqa: E731
    model = case.build()
    try:
        reference = copy.deepcopy(model)  # the ORIGINAL, taken before optimize could touch it
    except Exception:  # noqa: BLE001 - e.g. old-style weight_norm's non-leaf weight: builders are seeded
        reference = case.build()
    ex_batch, ex_size = case.example
    example = case.inputs(ex_batch, ex_size)
    model_before, inputs_before, global_before = _snapshot_model(model), _snapshot_inputs(example), _global_state()
    options = case.options()

    result, failure = None, None
    try:
        if case.entry is not None:
            result = case.entry(model, example, options)
        else:
            result, _report = _optimize(model, example, **options)
    except FxRebirthError as exc:
        failure = ("refused", _describe_exc(exc))
    except Exception as exc:  # noqa: BLE001 - anything but a clear error is a crash
        failure = ("crash", "optimize: " + _describe_exc(exc))

    mutations = _diff_model(model_before, _snapshot_model(model)) + _diff_inputs(inputs_before)
    global_after = _global_state()
    mutations += [f"global {k} changed ({global_before[k]} -> {global_after[k]})"
                  for k in global_before if global_before[k] != global_after[k]]
    mutated = ""
    if mutations:
        mutated = "; ".join(mutations[:4]) + (f"; +{len(mutations) - 4} more" if len(mutations) > 4 else "")
        if failure is not None:
            return out("mutated", f"{mutated} (and optimize: {failure[0]}: {failure[1]})")
    if failure is not None:
        return out(*failure)

    problems: list[tuple[str, str]] = []  # (status, detail)
    guarded: list[tuple[int, Any]] = []
    compared = 0
    batches = sorted({2, ex_batch}, key=lambda b: (b != 2, b))
    for size in case.sizes:
        for batch in batches:
            where = f"batch {batch}, size {_fmt_size(size)}"
            ref_inputs = case.inputs(batch, size)
            res_inputs = _clone(ref_inputs)
            ref_saved = copy.deepcopy(reference) if case.state is not None else None
            if case.records is not None:
                case.records().clear()
            try:
                with torch.no_grad():
                    expected = reference(*ref_inputs)
            except Exception:  # noqa: BLE001 - the original does not accept this size: skip it
                if ref_saved is not None:
                    reference = ref_saved
                continue
            ref_records = list(case.records()) if case.records is not None else None
            if case.records is not None:
                case.records().clear()
            try:
                with torch.no_grad():
                    actual = result(*res_inputs)
            except FxRebirthError as exc:
                guarded.append((batch, size))
                if ref_saved is not None:
                    reference = ref_saved
                if _hw(size) == _hw(ex_size):
                    problems.append(("crash", f"the result refuses the example's own size ({where}): "
                                              f"{_describe_exc(exc)}"))
                continue
            except Exception as exc:  # noqa: BLE001
                problems.append(("crash", f"result at {where}: {_describe_exc(exc)}"))
                continue
            compared += 1
            bound = tolerance(_first_float_dtype(expected))
            error = relative_error(expected, actual)
            if not error <= bound:
                problems.append(("wrong", f"output error {error:.3g} > {bound:g} at {where}"))
                continue
            input_error = relative_error(ref_inputs, res_inputs)
            if not input_error <= bound:
                problems.append(("wrong", f"inputs after the call differ from the original's ({input_error:.3g}) "
                                          f"at {where}"))
                continue
            if case.records is not None:
                got = list(case.records())
                rec_error = relative_error(ref_records, got)
                if not rec_error <= bound:
                    problems.append(("wrong", f"hook records differ ({len(ref_records)} vs {len(got)} entries, "
                                              f"error {rec_error:.3g}) at {where}"))
                    continue
            if case.check_format and _memory_formats(expected) != _memory_formats(actual):
                problems.append(("wrong", f"output memory format channels_last={_memory_formats(actual)} vs "
                                          f"original {_memory_formats(expected)} at {where}"))
                continue
            if case.state is not None:
                try:
                    state_ref, state_res = case.state(reference), case.state(result)
                except Exception as exc:  # noqa: BLE001
                    problems.append(("wrong", f"state not found on the result: {_describe_exc(exc)}"))
                    continue
                state_error = relative_error(state_ref, state_res)
                if not state_error <= bound:
                    problems.append(("wrong", f"state after the call differs ({state_error:.3g}) at {where}"))
                    # keep the two in step for the next sizes
                    continue
    if case.records is not None:
        case.records().clear()
    if problems:
        worst = max(problems, key=lambda p: _SEVERITY[p[0]])[0]
        details = [d for s, d in problems if s == worst]
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        if mutated:
            return out("mutated", f"{mutated} (and the result: {worst}: {details[0]}{more})", guarded=guarded,
                       compared=compared)
        return out(worst, details[0] + more, guarded=guarded, compared=compared)
    if mutated:
        return out("mutated", mutated, guarded=guarded, compared=compared)
    detail = f"guarded at {[(b, _fmt_size(s)) for b, s in guarded]}" if guarded else ""
    if not compared:
        detail = (detail + "; " if detail else "") + "nothing compared (no size both models accept)"
    return out("ok", detail, guarded=guarded, compared=compared)
