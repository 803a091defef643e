"""A second random program generator: random, valid PyTorch programs written as ordinary Python.

Written independently of :mod:`fxrebirth.testing.graphs` (which builds fx graphs): every program here is
an ``nn.Module`` whose ``forward`` is generated Python SOURCE, the kind of code a user writes, run by
eager PyTorch as the reference. :func:`random_program` draws one from a seed (``random.Random``: the
same seed gives the same program on every machine).

A program is a small random DAG over a 1-D (N, C, L), 2-D (N, C, H, W) or 3-D (N, C, D, H, W) input
(one or two inputs), float32 or float64, built from: convolutions (random kernel, stride, padding,
dilation, groups, bias, padding mode), transposed convolutions, BatchNorm in eval with random statistics
(and now and then without running statistics, or GroupNorm), Linear after a flatten or a global pool
(and on channels-last permutes), per-channel constant scale/shift, ReLU in every spelling (module,
``inplace=True``, ``F.relu(inplace=True)``, ``relu_()``) and other activations, in-place arithmetic
(``add_``, ``mul_``, ``+=``, ``out=``) on intermediate values and on the inputs -- the mutated value
is often read by another branch before the mutation and again after it -- residual adds/subs (with
broadcast: global-pooled (N, C, 1, 1) and channel-mean (N, 1, H, W) branches), RepVGG-style parallel
branches, concatenation, average/max pooling (ceil mode, count_include_pad, divisor_override), adaptive
pooling, explicit padding (constant, reflect, replicate, circular), reshapes/views/flatten/permute
(some with literal sizes taken from the nominal size: size-specific by design), channel shuffles,
pixel (un)shuffle, dropout (eval), identities, clones/aliases, a module called twice, tuple and dict
outputs.

Validity: the program is built by running every line as it is generated (a trial on copies first, so an
invalid line is dropped), then run as a whole at its nominal size (batch 1, 2 and 3, with and without
autograd): a program that fails there is drawn again. It is also run at two larger sizes: a program that
fails there (literal reshapes, Linear after a flatten...) records it in :attr:`Program.runs_at`, and
checks skip those sizes.

:func:`check_program` is the end-to-end check (fxrebirth's contract: match the original at every size
it accepts, or raise a clear error; never modify the user's model or example inputs); the functions it
calls are passed in, so the same check runs against older versions of fxrebirth.
"""

from __future__ import annotations

import itertools
import linecache
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Program", "Outcome", "random_program", "check_program", "check_options", "NOMINAL_BATCH",
           "CHECK_BATCHES"]

NOMINAL_BATCH = 2
"""Batch at which a program is built (the shapes in its description are at this batch)."""

CHECK_BATCHES = (2, 3)
"""Batches at which :func:`check_program` compares the result with the original, at each size."""

_MAX_ELEMENTS = 6000  # per sample, at the nominal size: keeps every forward fast
_MAX_CHANNELS = 12
_GLOBALS = {"torch": torch, "F": F, "nn": nn, "__builtins__": __builtins__}


@dataclass
class Program:
    """One generated program: ``module`` (eval mode) and what is needed to run and describe it."""

    seed: int
    module: nn.Module
    dtype: torch.dtype
    dims: int                     # spatial dimensions: 1, 2 or 3
    channels: tuple[int, ...]     # channels of each input
    aspect: tuple[int, ...]       # offsets added to ``size`` for each spatial dimension
    sizes: tuple[int, int, int]   # nominal size first
    runs_at: tuple[int, ...]      # the sizes of ``sizes`` where the original runs
    description: str
    source: str = field(repr=False, default="")
    channels_last: bool = False   # 2-D programs only: inputs and 4-D weights in channels_last memory format

    @property
    def nominal(self) -> int:
        return self.sizes[0]

    def input_shapes(self, batch: int, size: int) -> list[tuple[int, ...]]:
        spatial = tuple(size + a for a in self.aspect)
        return [(batch, c, *spatial) for c in self.channels]

    def inputs(self, batch: int, size: int, salt: int = 0) -> tuple[torch.Tensor, ...]:
        """Seeded standard-normal inputs (the same for the same arguments)."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + batch * 10_007 + size * 101 + salt) % 2**62)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return tuple(torch.randn(s, generator=gen, dtype=torch.float64).to(self.dtype).contiguous(memory_format=fmt)
                     for s in self.input_shapes(batch, size))

    def __str__(self) -> str:
        return self.description


class _Abort(Exception):
    """A line that passed its trial failed for real (aliasing): draw the program again."""


@dataclass
class _Val:
    name: str
    shape: tuple[int, ...]
    uses: int = 0
    touched: int = 0


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if x != int(x) else f"{x:.1f}"
    if isinstance(x, (list, tuple)):
        inner = ", ".join(_fmt(i) for i in x)
        if isinstance(x, list):
            return f"[{inner}]"
        return f"({inner},)" if len(x) == 1 else f"({inner})"
    return repr(x)


def _divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


class _Builder:
    def __init__(self, seed: int, rng: random.Random) -> None:
        self.seed = seed
        self.rng = rng
        self.gen = torch.Generator().manual_seed(rng.getrandbits(62))
        r = rng.random()
        self.d = 2 if r < 0.7 else (1 if r < 0.85 else 3)
        self.dtype = torch.float64 if rng.random() < 0.25 else torch.float32
        self.cls = type(f"RandomProgram{seed}", (nn.Module,), {"__module__": __name__})
        self.root = self.cls()
        self.attrs: list[tuple[str, str]] = []   # (attribute, description)
        self.modules: list[tuple[str, nn.Module, int]] = []  # reusable layers: (attr, module, rank)
        self.pending: list[str] = []
        self.env: dict[str, torch.Tensor] = {}
        self.vals: dict[str, _Val] = {}
        self.lines: list[str] = []
        self.step = 0
        self.ids = itertools.count(1)

    # ----------------------------------------------------------------- helpers
    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def choice(self, seq: Any) -> Any:
        return self.rng.choice(list(seq))

    def name(self, prefix: str = "v") -> str:
        return f"{prefix}{next(self.ids)}"

    def randn(self, shape: tuple[int, ...], std: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=self.gen, dtype=torch.float64) * std).to(self.dtype)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        return (torch.rand(shape, generator=self.gen, dtype=torch.float64) * (high - low) + low).to(self.dtype)

    def signed(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Magnitudes in [0.5, 1.5), random sign: a scale that is never near zero nor near one."""
        sign = torch.where(torch.rand(shape, generator=self.gen) < 0.25, -1.0, 1.0).to(torch.float64)
        return (sign * (torch.rand(shape, generator=self.gen, dtype=torch.float64) + 0.5)).to(self.dtype)

    def init_module(self, m: nn.Module) -> nn.Module:
        m = m.to(self.dtype)
        with torch.no_grad():
            for sub in m.modules():
                if isinstance(sub, (nn.modules.conv._ConvNd, nn.Linear)):
                    w = sub.weight
                    if isinstance(sub, nn.modules.conv._ConvTransposeNd):
                        fan = w.shape[0] // sub.groups * math.prod(sub.kernel_size) / math.prod(sub.stride)
                    else:
                        fan = w[0].numel()
                    w.copy_(self.randn(tuple(w.shape), 1.0 / math.sqrt(max(1.0, fan))))
                    if sub.bias is not None:
                        sub.bias.copy_(self.uniform(tuple(sub.bias.shape), -0.5, 0.5))
                elif isinstance(sub, nn.modules.batchnorm._NormBase):
                    if sub.running_mean is not None:
                        sub.running_mean.copy_(self.uniform(tuple(sub.running_mean.shape), -1.0, 1.0))
                        sub.running_var.copy_(self.uniform(tuple(sub.running_var.shape), 0.25, 2.0))
                    if sub.weight is not None:
                        sub.weight.copy_(self.signed(tuple(sub.weight.shape)))
                        sub.bias.copy_(self.uniform(tuple(sub.bias.shape), -1.0, 1.0))
                elif isinstance(sub, nn.GroupNorm) and sub.affine:
                    sub.weight.copy_(self.signed(tuple(sub.weight.shape)))
                    sub.bias.copy_(self.uniform(tuple(sub.bias.shape), -1.0, 1.0))
        return m.eval()

    def attach(self, prefix: str, obj: Any, rank: int | None = None) -> str:
        """Attach a module, or a tensor (a parameter, or a buffer), to the program; return ``self.NAME``."""
        attr = self.name(prefix)
        if isinstance(obj, nn.Module):
            obj = self.init_module(obj)
            setattr(self.root, attr, obj)
            text = repr(obj).replace("\n", "\n    #   ")
            if rank is not None:
                self.modules.append((attr, obj, rank))
        elif isinstance(obj, torch.Tensor) and self.chance(0.5):
            self.root.register_buffer(attr, obj)
            text = f"buffer {tuple(obj.shape)}"
        else:
            setattr(self.root, attr, nn.Parameter(obj))
            text = f"parameter {tuple(obj.shape)}"
        self.attrs.append((attr, text))
        self.pending.append(attr)
        return f"self.{attr}"

    def _drop_pending(self) -> None:
        for attr in self.pending:
            delattr(self.root, attr)
        self.attrs = [a for a in self.attrs if a[0] not in self.pending]
        self.modules = [m for m in self.modules if m[0] not in self.pending]
        self.pending = []

    def commit(self, line: str, reads: list[str], outs: list[str], mutates: str | None = None) -> bool:
        """Run ``line`` on copies of what it reads; if it works and its results are reasonable, run it for
        real (keeping every alias) and record it."""
        unused = [a for a in self.pending if not re.search(rf"self\.{a}\b", line)]
        if unused:   # forms drawn from a list attach every candidate: keep only what the line uses
            for a in unused:
                delattr(self.root, a)
            self.attrs = [x for x in self.attrs if x[0] not in unused]
            self.modules = [m for m in self.modules if m[0] not in unused]
            self.pending = [a for a in self.pending if a not in unused]
        code = compile(line, "<program line>", "exec")
        trial = dict(_GLOBALS)
        trial["self"] = self.root
        for r in set(reads):
            trial[r] = self.env[r].clone()
        try:
            with torch.no_grad():
                exec(code, trial)
            for o in outs:
                t = trial[o]
                if not isinstance(t, torch.Tensor) or t.dim() not in (2, self.d + 2):
                    raise ValueError("bad result")
                if t.shape[0] != NOMINAL_BATCH or t.numel() == 0 or t[0].numel() > _MAX_ELEMENTS:
                    raise ValueError("bad size")
                if t.dim() > 2 and t.shape[1] > 3 * _MAX_CHANNELS:
                    raise ValueError("too many channels")
                if not torch.isfinite(t).all():
                    raise ValueError("not finite")
        except Exception:  # noqa: BLE001 - an invalid line is simply not generated
            self._drop_pending()
            return False
        ns = dict(_GLOBALS)
        ns["self"] = self.root
        ns.update(self.env)
        try:
            with torch.no_grad():
                exec(code, ns)
        except Exception as exc:  # noqa: BLE001
            raise _Abort(str(exc)) from exc
        self.step += 1
        for r in reads:
            self.vals[r].uses += 1
            self.env[r] = ns[r]
        for o in outs:
            self.env[o] = ns[o]
            self.vals[o] = _Val(o, tuple(ns[o].shape), touched=self.step)
        if mutates is not None:
            self.vals[mutates].touched = self.step
        shapes = ", ".join(str(tuple(self.env[o].shape)) for o in (outs or ([mutates] if mutates else [])))
        self.lines.append(f"{line}  # {shapes}" if shapes else line)
        self.pending = []
        return True

    def pick(self, pred: Callable[[_Val], bool], prefer_used: bool = False) -> _Val | None:
        cands = [v for v in self.vals.values() if pred(v)]
        if not cands:
            return None
        weights = [(0.55 ** (self.step - v.touched) + 0.04) * (3.0 if prefer_used and v.uses else 1.0) for v in cands]
        return self.rng.choices(cands, weights)[0]

    def spatial(self, v: _Val) -> bool:
        return len(v.shape) == self.d + 2

    @staticmethod
    def flat(v: _Val) -> bool:
        return len(v.shape) == 2

    def sdims(self) -> tuple[int, ...]:
        return tuple(range(2, self.d + 2))

    def tup(self, make: Callable[[], int], p_tuple: float = 0.2) -> Any:
        """An int, or (sometimes, for d > 1) a tuple with one value per spatial dimension."""
        if self.d > 1 and self.chance(p_tuple):
            return tuple(make() for _ in range(self.d))
        return make()

    def const_shape(self, v: _Val) -> tuple[int, ...]:
        c = v.shape[1]
        if len(v.shape) == 2:
            return self.choice([(1, c), (1, c), (c,), (1, 1)])
        ones = (1,) * self.d
        r = self.rng.random()
        if r < 0.72:
            return (1, c, *ones)
        if r < 0.84:
            return (c, *ones)
        if r < 0.92:
            return (1, 1, *ones)
        return (1, c, *v.shape[2:])  # a per-position constant: size-specific, and not per-channel

    # ----------------------------------------------------------------- layers
    def conv(self, v: _Val, cout: int | None = None, k: Any = None, stride: Any = None, padding: Any = None,
             mode: str | None = None, groups: int | None = None, bn: bool = False) -> str | None:
        c = v.shape[1]
        cout = cout or self.choice([c, c, 2, 3, 4, 6, 8] + ([2 * c] if 2 * c <= _MAX_CHANNELS else []))
        if groups is None:
            common = [g for g in _divisors(math.gcd(c, cout)) if g > 1]
            groups = 1 if not common or self.chance(0.6) else self.choice(common)
        kernels = [1, 1, 2, 3, 3, 3, 5] if self.d == 1 else [1, 1, 2, 3, 3]
        k = k if k is not None else self.tup(lambda: self.choice(kernels))
        stride = stride if stride is not None else self.tup(lambda: self.choice([1, 1, 1, 1, 2, 2, 3]), 0.1)
        dilation = 1 if self.chance(0.85) else self.tup(lambda: self.choice([1, 2]), 0.3)
        if padding is None:
            ks = k if isinstance(k, tuple) else (k,) * self.d
            ds = dilation if isinstance(dilation, tuple) else (dilation,) * self.d
            r = self.rng.random()
            if r < 0.4:
                padding = tuple(d * (kk - 1) // 2 for kk, d in zip(ks, ds))
                padding = padding[0] if len(set(padding)) == 1 else padding
            elif r < 0.65:
                padding = 0
            elif r < 0.85:
                padding = self.tup(lambda: self.rng.randint(0, 2), 0.3)
            elif stride == 1 or stride == (1,) * self.d:
                padding = self.choice(["same", "valid"])
            else:
                padding = "valid"
        if mode is None:
            mode = self.rng.choices(["zeros", "reflect", "replicate", "circular"], [0.55, 0.15, 0.15, 0.15])[0]
        bias = self.chance(0.7)
        out = self.name()
        if mode == "zeros" and self.chance(0.15):  # functional form with the program's own parameters
            mod = getattr(nn, f"Conv{self.d}d")(c, cout, k, stride=stride, padding=padding, dilation=dilation,
                                                  groups=groups, bias=bias)
            self.init_module(mod)
            w = self.attach("w", mod.weight.detach().clone())
            b = self.attach("b", mod.bias.detach().clone()) if bias else "None"
            line = (f"{out} = F.conv{self.d}d({v.name}, {w}, {b}, stride={_fmt(stride)}, padding={_fmt(padding)}, "
                    f"dilation={_fmt(dilation)}, groups={groups})")
        else:
            mod = getattr(nn, f"Conv{self.d}d")(c, cout, k, stride=stride, padding=padding, dilation=dilation,
                                                  groups=groups, bias=bias, padding_mode=mode)
            if bn:
                mod = nn.Sequential(mod, getattr(nn, f"BatchNorm{self.d}d")(cout), nn.ReLU(inplace=self.chance(0.5)))
            line = f"{out} = {self.attach('conv', mod, None if bn else self.d + 2)}({v.name})"
        return out if self.commit(line, [v.name], [out]) else None

    def conv_transpose(self, v: _Val) -> str | None:
        c = v.shape[1]
        cout = self.choice([c, 2, 3, 4, 6])
        common = [g for g in _divisors(math.gcd(c, cout)) if g > 1]
        groups = 1 if not common or self.chance(0.7) else self.choice(common)
        k = self.tup(lambda: self.rng.randint(1, 4))
        stride = self.tup(lambda: self.choice([1, 2, 2, 3]), 0.15)
        dilation = 1 if self.chance(0.85) else 2
        kmin = min(k) if isinstance(k, tuple) else k
        padding = self.rng.randint(0, min(2, dilation * (kmin - 1)))
        smin = min(stride) if isinstance(stride, tuple) else stride
        output_padding = self.rng.randint(0, max(smin, dilation) - 1) if self.chance(0.3) else 0
        bias = self.chance(0.7)
        out = self.name()
        if self.chance(0.15):
            mod = getattr(nn, f"ConvTranspose{self.d}d")(c, cout, k, stride, padding, output_padding, groups, bias,
                                                           dilation)
            self.init_module(mod)
            w = self.attach("w", mod.weight.detach().clone())
            b = self.attach("b", mod.bias.detach().clone()) if bias else "None"
            line = (f"{out} = F.conv_transpose{self.d}d({v.name}, {w}, {b}, stride={_fmt(stride)}, "
                    f"padding={padding}, output_padding={output_padding}, groups={groups}, dilation={dilation})")
        else:
            mod = getattr(nn, f"ConvTranspose{self.d}d")(c, cout, k, stride=stride, padding=padding,
                                                           output_padding=output_padding, groups=groups, bias=bias,
                                                           dilation=dilation)
            line = f"{out} = {self.attach('up', mod, self.d + 2)}({v.name})"
        return out if self.commit(line, [v.name], [out]) else None

    def norm(self, v: _Val) -> str | None:
        c = v.shape[1]
        out = self.name()
        eps = self.choice([1e-5, 1e-5, 1e-3, 0.1])
        dim = 1 if len(v.shape) == 2 else self.d
        r = self.rng.random()
        if r < 0.12:
            rm = self.attach("mean", self.uniform((c,), -1.0, 1.0))
            rv = self.attach("var", self.uniform((c,), 0.25, 2.0))
            w = self.attach("gamma", self.signed((c,))) if self.chance(0.8) else "None"
            b = self.attach("beta", self.uniform((c,), -1.0, 1.0)) if self.chance(0.8) else "None"
            line = f"{out} = F.batch_norm({v.name}, {rm}, {rv}, {w}, {b}, training=False, eps={eps})"
        elif r < 0.17:  # eval BatchNorm without running statistics: normalises with the batch's own
            bn = getattr(nn, f"BatchNorm{dim}d")(c, eps=eps, track_running_stats=False)
            line = f"{out} = {self.attach('bn', bn)}({v.name})"
        elif r < 0.21 and len(v.shape) > 2:
            groups = self.choice(_divisors(c))
            line = f"{out} = {self.attach('gn', nn.GroupNorm(groups, c, eps=eps))}({v.name})"
        else:
            bn = getattr(nn, f"BatchNorm{dim}d")(c, eps=eps, affine=self.chance(0.85))
            line = f"{out} = {self.attach('bn', bn, len(v.shape))}({v.name})"
        return out if self.commit(line, [v.name], [out]) else None

    def scale_shift(self, v: _Val) -> str | None:
        out = self.name()
        x = v.name
        r = self.rng.random()
        if r < 0.12:
            a, b = self.choice([0.5, 1.5, -0.75, 2.0, 3.0]), self.choice([0.25, -1.0, 0.5])
            line = self.choice([f"{out} = {x} * {a} + {b}", f"{out} = {a} * {x}", f"{out} = {x} / {a}",
                                f"{out} = {x} - {b}"])
        else:
            shape = self.const_shape(v)
            s = self.attach("scale", self.signed(shape))
            t = self.attach("shift", self.uniform(shape, -1.0, 1.0))
            line = self.choice([
                f"{out} = {x} * {s} + {t}", f"{out} = {x} * {s} + {t}", f"{out} = {t} + {s} * {x}",
                f"{out} = {x}.mul({s}).add({t})", f"{out} = torch.add(torch.mul({x}, {s}), {t})",
                f"{out} = {x} * {s}", f"{out} = {x} + {t}", f"{out} = {x} - {t}", f"{out} = {x} / {s}",
                f"{out} = torch.addcmul({t}, {x}, {s})", f"{out} = ({x} + {t}) * {s}",
            ])
        reads = [x]
        return out if self.commit(line, reads, [out]) else None

    def activation(self, v: _Val) -> str | None:
        x = v.name
        out = self.name()
        r = self.rng.random()
        if r < 0.5:  # ReLU in its many spellings; the in-place ones mutate x (and may alias it)
            form = self.rng.randrange(11)
            if form in (0, 1):
                line = f"{out} = {self.attach('relu', nn.ReLU(inplace=form == 1))}({x})"
            elif form == 2:
                line, out = f"{self.attach('relu', nn.ReLU(inplace=True))}({x})", None
            elif form == 3:
                line, out = f"{x}.relu_()", None
            elif form == 4:
                line = f"{out} = {x}.relu_()"
            elif form == 5:
                line = f"{out} = F.relu({x}, inplace=True)"
            elif form == 6:
                line, out = f"torch.relu_({x})", None
            else:
                line = f"{out} = " + self.choice([f"F.relu({x})", f"torch.relu({x})", f"{x}.relu()", f"F.relu({x})"])
        else:
            line = f"{out} = " + self.choice([
                f"torch.sigmoid({x})", f"F.leaky_relu({x}, 0.1)", f"F.hardtanh({x}, -1.0, 1.0)", f"torch.tanh({x})",
                f"{x}.clamp(min=-0.5, max=1.5)", f"F.silu({x})", f"F.relu6({x})",
                f"{self.attach('act', nn.ReLU6(inplace=True))}({x})", f"{self.attach('act', nn.Hardswish())}({x})",
                f"{x}.clamp_(min=0.0)", f"F.gelu({x})",
            ])
        mutates = x if ("_(" in line or "inplace=True" in line or "self.relu" in line or "self.act" in line) else None
        return x if self.commit(line, [x], [out] if out else [], mutates=mutates) else None

    def inplace(self, v: _Val) -> str | None:
        x = v.name
        r = self.rng.random()
        reads = [x]
        if r < 0.3:
            a = self.choice([0.5, 1.5, -1.0, 2.0, 0.25])
            op = self.choice([f"{x}.add_({a})", f"{x}.mul_({a})", f"{x}.sub_({a})", f"{x}.div_({a})",
                              f"{x} *= {a}", f"{x} += {a}"])
        elif r < 0.5:
            c = self.attach("k", self.signed(self.const_shape(v)))
            op = self.choice([f"{x}.mul_({c})", f"{x}.add_({c})", f"{x} *= {c}", f"{x}.sub_({c})"])
        else:
            def fits(u: _Val) -> bool:
                try:
                    return torch.broadcast_shapes(u.shape, v.shape) == v.shape
                except RuntimeError:
                    return False
            u = self.pick(lambda w: fits(w) and w.name != x) or (v if self.chance(0.2) else None)
            if u is None:
                return None
            reads.append(u.name)
            y = u.name
            op = self.choice([f"{x}.add_({y})", f"{x}.add_({y}, alpha=-0.5)", f"{x}.mul_({y})", f"{x} += {y}",
                              f"{x} += {y}", f"torch.add({x}, {y}, out={x})"]
                             + ([f"{x}.sub_({y})", f"{x} -= {y}"] if y != x else []))
        outs: list[str] = []
        if "=" not in op.replace("alpha=", "").replace("out=", "") and self.chance(0.3):
            out = self.name()
            op, outs = f"{out} = {op}", [out]   # an alias of x
        return x if self.commit(op, reads, outs, mutates=x) else None

    def binary(self, v: _Val, u: _Val | None = None) -> str | None:
        if u is None:
            def fits(w: _Val) -> bool:
                if len(w.shape) != len(v.shape):
                    return False
                try:
                    torch.broadcast_shapes(w.shape, v.shape)
                    return True
                except RuntimeError:
                    return False
            u = self.pick(lambda w: fits(w) and w.name != v.name) or (v if self.chance(0.2) else None)
            if u is None:
                return None
        a, b = v.name, u.name
        if self.chance(0.5):
            a, b = b, a
        out = self.name()
        line = f"{out} = " + self.rng.choices([
            f"{a} + {b}", f"{a} - {b}", f"torch.add({a}, {b})", f"torch.add({a}, {b}, alpha=0.5)",
            f"torch.sub({a}, {b})", f"{a}.add({b})", f"{a} * {b}", f"{a} * torch.sigmoid({b})",
        ], [4, 2, 1, 1, 1, 1, 1, 1])[0]
        return out if self.commit(line, [a, b], [out]) else None

    def cat(self, v: _Val) -> str | None:
        def fits(w: _Val) -> bool:
            return (len(w.shape) == len(v.shape) and w.shape[0] == v.shape[0] and w.shape[2:] == v.shape[2:]
                    and w.shape[1] + v.shape[1] <= 3 * _MAX_CHANNELS)
        parts = [v]
        u = self.pick(lambda w: fits(w) and w.name != v.name)
        parts.append(u if u is not None else v)
        if self.chance(0.25):
            w = self.pick(fits)
            if w is not None:
                parts.append(w)
        names = [p.name for p in parts]
        self.rng.shuffle(names)
        out = self.name()
        dim = 1
        if len(v.shape) > 2 and self.chance(0.1) and u is not None and u.shape == v.shape:
            dim = self.choice(self.sdims())
        lst = ", ".join(names)
        line = self.choice([f"{out} = torch.cat([{lst}], dim={dim})", f"{out} = torch.cat(({lst}), {dim})"])
        return out if self.commit(line, names, [out]) else None

    def pool(self, v: _Val) -> str | None:
        d, x, out = self.d, v.name, self.name()
        dims = _fmt(self.sdims())
        r = self.rng.random()
        if r < 0.32:
            if self.chance(0.15):   # the whole (or half the) nominal extent, literal: size-specific
                k = tuple(max(1, s // self.choice([1, 1, 2])) for s in v.shape[2:])
                k = k[0] if len(set(k)) == 1 else k
            else:
                k = self.tup(lambda: self.rng.randint(1, 3))
            kmin = min(k) if isinstance(k, tuple) else k
            stride = self.choice([None, None, 1, 2, 3, k])
            padding = self.rng.randint(0, kmin // 2)
            ceil, cip = self.chance(0.5), self.chance(0.6)
            divisor = self.rng.randint(1, 5) if d > 1 and self.chance(0.1) else None
            extra = f", divisor_override={divisor}" if divisor else ""
            if self.chance(0.2):
                line = (f"{out} = F.avg_pool{d}d({x}, {_fmt(k)}, stride={_fmt(stride)}, padding={padding}, "
                        f"ceil_mode={ceil}, count_include_pad={cip}{extra})")
            else:
                mod = getattr(nn, f"AvgPool{d}d")(k, stride=stride, padding=padding, ceil_mode=ceil,
                                                    count_include_pad=cip,
                                                    **({"divisor_override": divisor} if divisor else {}))
                line = f"{out} = {self.attach('avg', mod)}({x})"
        elif r < 0.52:
            k = self.tup(lambda: self.rng.randint(2, 3))
            kmin = min(k) if isinstance(k, tuple) else k
            stride = self.choice([None, 1, 2])
            padding = self.rng.randint(0, kmin // 2)
            dilation = 1 if self.chance(0.85) else 2
            ceil = self.chance(0.5)
            if self.chance(0.2):
                line = (f"{out} = F.max_pool{d}d({x}, {_fmt(k)}, stride={_fmt(stride)}, padding={padding}, "
                        f"dilation={dilation}, ceil_mode={ceil})")
            else:
                mod = getattr(nn, f"MaxPool{d}d")(k, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil)
                line = f"{out} = {self.attach('maxp', mod)}({x})"
        elif r < 0.64:
            o = self.tup(lambda: self.choice([1, 2, 3, 4]), 0.3)
            kind = self.choice(["Avg", "Avg", "Max"])
            line = f"{out} = {self.attach('adapt', getattr(nn, f'Adaptive{kind}Pool{d}d')(o))}({x})"
        elif r < 0.85:  # global pooling keeping the dimensions: a (N, C, 1...) broadcast partner
            line = f"{out} = " + self.choice([
                f"{x}.mean({dims}, keepdim=True)", f"{x}.mean(dim={_fmt(list(self.sdims()))}, keepdim=True)",
                f"F.adaptive_avg_pool{d}d({x}, 1)", f"{x}.amax(dim={dims}, keepdim=True)",
                f"{x}.sum({dims}, keepdim=True)", f"{self.attach('gap', getattr(nn, f'AdaptiveAvgPool{d}d')(1))}({x})",
            ])
        elif r < 0.92:  # channel mean: a (N, 1, H, W) broadcast partner
            line = f"{out} = " + self.choice([f"{x}.mean(1, keepdim=True)", f"{x}.amax(dim=1, keepdim=True)"])
        else:  # global pooling to (N, C)
            squeeze = "".join(".squeeze(-1)" for _ in range(d))
            line = f"{out} = " + self.choice([
                f"{x}.mean({dims})",
                f"torch.flatten({self.attach('gap', getattr(nn, f'AdaptiveAvgPool{d}d')(1))}({x}), 1)",
                f"F.adaptive_avg_pool{d}d({x}, 1).view({x}.size(0), -1)", f"F.adaptive_max_pool{d}d({x}, 1){squeeze}",
            ])
        return out if self.commit(line, [x], [out]) else None

    def pad(self, v: _Val) -> str | None:
        d, x, out = self.d, v.name, self.name()
        n = self.rng.randint(1, d)
        mode = self.rng.choices(["constant", "reflect", "replicate", "circular"], [0.4, 0.2, 0.2, 0.2])[0]
        low = -1 if mode == "constant" and self.chance(0.1) else 0
        pads = tuple(self.rng.randint(low, 2) for _ in range(2 * n))
        if self.chance(0.6):
            value = self.choice([0.0, 0.0, 0.5, -1.0]) if mode == "constant" else None
            extra = f", value={value}" if value else ""
            line = f"{out} = F.pad({x}, {_fmt(pads)}, mode={mode!r}{extra})"
        else:
            pads = pads + (0,) * (2 * d - len(pads))
            p = pads[0] if len(set(pads)) == 1 and self.chance(0.5) else pads
            if mode == "constant":
                value = self.choice([0.0, 0.0, 0.5])
                mod = getattr(nn, f"ZeroPad{d}d")(p) if value == 0.0 else getattr(nn, f"ConstantPad{d}d")(p, value)
            else:
                name = {"reflect": "ReflectionPad", "replicate": "ReplicationPad", "circular": "CircularPad"}[mode]
                mod = getattr(nn, f"{name}{d}d")(p)
            line = f"{out} = {self.attach('pad', mod)}({x})"
        return out if self.commit(line, [x], [out]) else None

    def reshape(self, v: _Val) -> str | None:
        d, x, out = self.d, v.name, self.name()
        c, sp = v.shape[1], v.shape[2:]
        lit = ", ".join(str(s) for s in sp)
        dyn = ", ".join(f"{x}.size({i})" for i in self.sdims())
        r = self.rng.random()
        forms: list[str] = []
        if r < 0.2 and d > 1:
            forms = [f"{x}.transpose(2, 3)", f"{x}.transpose(-1, -2)", f"{x}.transpose(2, 3).contiguous()"]
        elif r < 0.35:
            g = self.choice([g for g in _divisors(c) if 1 < g < c] or [1])
            forms = [f"{x}.view({x}.size(0), {g}, {c // g}, {dyn}).transpose(1, 2).reshape({x}.size(0), {c}, {dyn})",
                     f"{x}.reshape(-1, {g}, {c // g}, {lit}).transpose(1, 2).reshape(-1, {c}, {lit})"]
        elif r < 0.55:  # reshapes that are no-ops: at every size (dynamic), or only at the nominal one (literal)
            forms = [f"{x}.reshape({x}.shape)", f"{x}.view({x}.size())", f"{x}.reshape(-1, {c}, {dyn})",
                     f"{x}.view(-1, {c}, {lit})", f"{x}.reshape({x}.size(0), {c}, {lit})",
                     f"{x}.flatten(2).view_as({x})", f"{x}.flatten(2).reshape(-1, {c}, {lit})"]
            if d == 2:
                forms.append(f"{x}.reshape({x}.size(0), {c}, -1, {sp[1]})")   # not a no-op at other sizes
                forms.append(f"{x}.flatten(2).unflatten(2, ({sp[0]}, {sp[1]}))")
        elif r < 0.75:  # Linear (or a per-channel scale) over the channels, channels last
            last = (0, *self.sdims(), 1)
            back = (0, d + 1, *range(1, d + 1))
            if self.chance(0.7):
                lin = self.attach("lin", nn.Linear(c, self.choice([c, 2, 4, 6]), bias=self.chance(0.7)))
                forms = [f"{lin}({x}.permute{_fmt(last)}).permute{_fmt(back)}"]
            else:
                s = self.attach("cscale", self.signed((c,)))
                forms = [f"({x}.permute{_fmt(last)} * {s}).permute{_fmt(back)}"]
        elif r < 0.85 and d == 2:
            forms = [f"F.pixel_unshuffle({x}, 2)"] + ([f"F.pixel_shuffle({x}, 2)"] if c % 4 == 0 else [])
        else:  # to (N, features)
            forms = [f"torch.flatten({x}, 1)", f"{x}.flatten(1)", f"{x}.view({x}.size(0), -1)",
                     f"{x}.reshape(-1, {math.prod(v.shape[1:])})",
                     f"{self.attach('flat', nn.Flatten())}({x})"]
        line = f"{out} = {self.choice(forms)}"
        return out if self.commit(line, [x], [out]) else None

    def linear(self, v: _Val) -> str | None:
        f = v.shape[1]
        fout = self.choice([2, 4, 6, 8, 12, 16, f])
        bias = self.chance(0.7)
        out = self.name()
        if self.chance(0.15):
            mod = self.init_module(nn.Linear(f, fout, bias=bias))
            w = self.attach("w", mod.weight.detach().clone())
            b = self.attach("b", mod.bias.detach().clone()) if bias else "None"
            line = f"{out} = F.linear({v.name}, {w}, {b})"
        else:
            line = f"{out} = {self.attach('fc', nn.Linear(f, fout, bias=bias), 2)}({v.name})"
        return out if self.commit(line, [v.name], [out]) else None

    def unflatten(self, v: _Val) -> str | None:
        x, out, f = v.name, self.name(), v.shape[1]
        ones = ", ".join("1" for _ in range(self.d))
        idx = ", ".join(["None"] * self.d)
        line = f"{out} = " + self.choice([f"{x}.view(-1, {f}, {ones})", f"{x}.reshape({x}.size(0), {f}, {ones})",
                                          f"{x}[:, :, {idx}]", x + ".unsqueeze(-1)" * self.d])
        return out if self.commit(line, [x], [out]) else None

    def identity(self, v: _Val) -> str | None:
        x, out, d = v.name, self.name(), self.d
        drop = {1: "Dropout1d", 2: "Dropout2d", 3: "Dropout3d"}[d] if len(v.shape) > 2 else "Dropout"
        forms = [f"{self.attach('drop', nn.Dropout(self.choice([0.1, 0.5])))}({x})",
                 f"{self.attach('drop', getattr(nn, drop)(0.3))}({x})",
                 f"F.dropout({x}, p=0.2, training=self.training)", f"{self.attach('ident', nn.Identity())}({x})",
                 f"{x}.clone()", f"{x}.contiguous()", f"{x}.detach()", f"{x}.view_as({x})", f"{x} * 1.0"]
        if len(v.shape) in (4, 5):
            fmt = "channels_last" if len(v.shape) == 4 else "channels_last_3d"
            forms.append(f"{x}.contiguous(memory_format=torch.{fmt})")
        line = self.choice(forms)
        return out if self.commit(f"{out} = {line}", [x], [out]) else None

    def reuse(self, v: _Val) -> str | None:
        """Call a layer the program already has a second time (shared weights)."""
        fits = []
        for attr, mod, rank in self.modules:
            cin = mod.in_features if isinstance(mod, nn.Linear) else (
                mod.in_channels if isinstance(mod, nn.modules.conv._ConvNd) else mod.num_features)
            if rank == len(v.shape) and cin == v.shape[1]:
                fits.append(attr)
        if not fits:
            return None
        out = self.name()
        return out if self.commit(f"{out} = self.{self.choice(fits)}({v.name})", [v.name], [out]) else None

    # ----------------------------------------------------------------- blocks
    def parallel(self, v: _Val) -> str | None:
        """RepVGG/ACNet-like: branches of the same output shape, summed or concatenated."""
        c = v.shape[1]
        cout = self.choice([c, c, 4, 6])
        stride = self.choice([1, 1, 1, 2])
        mode = self.choice(["zeros", "zeros", "zeros", "reflect", "replicate", "circular"])
        loose = self.chance(0.3)   # kernels and paddings drawn per branch: shapes may agree at the nominal size only
        outs = []
        for _ in range(self.rng.randint(2, 3)):
            if loose:
                b = self.conv(v, cout=cout, k=self.choice([1, 2, 3]), stride=stride, padding=self.choice([0, 1]),
                              mode=mode, groups=1)
            elif stride == 1 and cout == c and self.chance(0.25):
                b = self.norm(v) if self.chance(0.7) else v.name   # identity (or BN-only) branch
            else:
                k = self.choice([1, 3, 3] + ([(1, 3), (3, 1)] if self.d == 2 else []))
                ks = k if isinstance(k, tuple) else (k,) * self.d
                pad = tuple(kk // 2 for kk in ks)
                b = self.conv(v, cout=cout, k=k, stride=stride, padding=pad if len(set(pad)) > 1 else pad[0],
                              mode=mode, groups=1 if self.chance(0.8) else None)
                if b and self.chance(0.6):
                    b = self.norm(self.vals[b])
            if b:
                outs.append(b)
        if len(outs) < 2:
            return None
        out = self.name()
        if self.chance(0.75):
            line = f"{out} = " + " + ".join(outs)
        else:
            line = f"{out} = torch.cat([{', '.join(outs)}], 1)"
        return out if self.commit(line, outs, [out]) else None

    def residual(self, v: _Val) -> str | None:
        """conv-bn-relu-conv-bn, added to the input (``out += identity`` or ``out = out + identity``)."""
        c = v.shape[1]
        mode = self.choice(["zeros", "zeros", "reflect", "replicate", "circular"])
        a = self.conv(v, cout=c, k=3, stride=1, padding=1, mode=mode, groups=1)
        if a is None:
            return None
        a = self.norm(self.vals[a]) or a
        self.activation(self.vals[a])
        b = self.conv(self.vals[a], cout=c, k=self.choice([1, 3]), stride=1, padding="same", mode=mode)
        if b is None:
            return None
        b = self.norm(self.vals[b]) or b
        if self.chance(0.5):
            ok = self.commit(f"{b} += {v.name}", [b, v.name], [], mutates=b)
        else:
            nb = self.name()
            ok = self.commit(f"{nb} = {b} + {v.name}", [b, v.name], [nb])
            b = nb
        if ok and self.chance(0.7):
            self.activation(self.vals[b])
        return b if ok else None

    def mutate_shared(self, v: _Val) -> str | None:
        """A value read by one branch, mutated in place, then read again: the branches see different values."""
        first = self.rng.choice([self.conv, self.scale_shift, self.pool, self.identity, self.norm])
        if not self.spatial(v):
            first = self.rng.choice([self.scale_shift, self.linear, self.identity])
        before = first(v)
        if before is None:
            return None
        if self.chance(0.5):
            self.activation(v)   # may be a pure one: then nothing is mutated, which is fine too
        else:
            self.inplace(v)
        after = self.conv(v) if self.spatial(v) and self.chance(0.5) else self.scale_shift(v)
        if after is None:
            return None
        return self.binary(self.vals[after], self.vals[before])

    def conv_pool(self, v: _Val) -> str | None:
        """conv (maybe with BN) then average pooling (ceil mode, count_include_pad, padding): a merge
        candidate whose exactness can depend on the input size."""
        a = self.conv(v)
        if a is None:
            return None
        if self.chance(0.4):
            a = self.norm(self.vals[a]) or a
        k = self.tup(lambda: self.rng.randint(2, 3), 0.2)
        kmin = min(k) if isinstance(k, tuple) else k
        stride = self.choice([None, 2, 1, 3])
        pool = getattr(nn, f"AvgPool{self.d}d")(k, stride=stride, padding=self.rng.randint(0, kmin // 2),
                                                 ceil_mode=self.chance(0.6), count_include_pad=self.chance(0.5))
        out = self.name()
        return out if self.commit(f"{out} = {self.attach('avg', pool)}({a})", [a], [out]) else None

    def head(self, v: _Val) -> str | None:
        """A classifier head: global pool (or flatten), Linear, maybe BatchNorm1d / ReLU, Linear."""
        x = v.name
        if self.spatial(v):
            f = self.name()
            d = self.d
            form = self.choice([f"torch.flatten(F.adaptive_avg_pool{d}d({x}, 1), 1)", f"{x}.mean({_fmt(self.sdims())})",
                                f"{x}.flatten(1)", f"{x}.view({x}.size(0), -1)"])
            if not self.commit(f"{f} = {form}", [x], [f]):
                return None
            v = self.vals[f]
        h = self.linear(v)
        if h is None:
            return None
        if self.chance(0.4):
            h = self.norm(self.vals[h]) or h
        if self.chance(0.6):
            h = self.activation(self.vals[h]) or h
        return self.linear(self.vals[h]) or h

    # ----------------------------------------------------------------- program
    OPS = {
        "conv": (0.16, "spatial"), "conv_transpose": (0.04, "spatial"), "norm": (0.09, "any"),
        "scale_shift": (0.08, "any"), "activation": (0.11, "any"), "inplace": (0.07, "used"),
        "binary": (0.08, "any"), "cat": (0.05, "any"), "pool": (0.08, "spatial"), "pad": (0.04, "spatial"),
        "reshape": (0.06, "spatial"), "linear": (0.04, "flat"), "unflatten": (0.015, "flat"),
        "identity": (0.04, "any"), "reuse": (0.03, "any"), "parallel": (0.04, "spatial"),
        "residual": (0.03, "spatial"), "mutate_shared": (0.04, "used"), "conv_pool": (0.03, "spatial"),
        "head": (0.015, "any"),
    }

    def build(self) -> None:
        n_inputs = 2 if self.chance(0.1) else 1
        self.channels = tuple(self.choice([1, 2, 3, 3, 4, 4, 6]) for _ in range(n_inputs))
        if self.d == 1:
            size, aspect = self.rng.randint(8, 20), (0,)
        elif self.d == 2:
            size = self.rng.randint(7, 16)
            aspect = (0, self.choice([0, 0, 0, 1, -1, 2]))
        else:
            size, aspect = self.rng.randint(6, 8), (0, 0, self.choice([0, 0, 1]))
        self.size, self.aspect = size, aspect
        self.sizes = (size, size + 1, size + 3)
        gen_inputs = torch.Generator().manual_seed(self.seed)
        self.input_names = [f"x{i}" for i in range(n_inputs)]
        for name, c in zip(self.input_names, self.channels):
            shape = (NOMINAL_BATCH, c, *(size + a for a in aspect))
            self.env[name] = torch.randn(shape, generator=gen_inputs, dtype=torch.float64).to(self.dtype)
            self.vals[name] = _Val(name, shape)
        if n_inputs == 2:   # use the second input early
            self.step = 1
            self.conv(self.vals["x1"]) if self.chance(0.5) else self.binary(self.vals["x0"], self.vals["x1"])
        if self.chance(0.06):   # mutate the caller's input at the start
            self.inplace(self.vals["x0"])
        n_ops = self.rng.randint(3, 12)
        names = list(self.OPS)
        weights = [self.OPS[n][0] for n in names]
        target = self.step + n_ops
        for _ in range(300):
            if self.step >= target:
                break
            op = self.rng.choices(names, weights)[0]
            need = self.OPS[op][1]
            inputs_too = self.chance(0.1)   # mutating the caller's inputs: now and then
            pred = {"spatial": self.spatial, "flat": self.flat, "any": lambda v: True,
                    "used": lambda v: inputs_too or v.name not in self.input_names}[need]
            v = self.pick(pred, prefer_used=need == "used")
            if v is not None:
                getattr(self, op)(v)
        self.outputs = self.choose_outputs()

    def choose_outputs(self) -> Any:
        last = max(self.vals.values(), key=lambda v: (v.touched, v.name not in self.input_names))
        def dangling() -> list[_Val]:
            return [v for v in self.vals.values()
                    if v.uses == 0 and v.name != last.name and v.name not in self.input_names]
        for _ in range(2):   # fold dead-end branches into the output where shapes allow
            cands = [v for v in dangling() if len(v.shape) == len(last.shape)]
            if cands and self.chance(0.6):
                out = self.binary(last, self.choice(cands))
                if out is not None:
                    last = self.vals[out]
        if dangling() and self.chance(0.3):
            other = self.choice(dangling())
            if self.chance(0.2):
                return {"out": last.name, "aux": other.name}
            return (last.name, other.name)
        return last.name

    def source(self) -> str:
        args = ", ".join(self.input_names)
        body = "\n".join(f"        {line}" for line in self.lines)
        if isinstance(self.outputs, dict):
            ret = "{" + ", ".join(f"{k!r}: {v}" for k, v in self.outputs.items()) + "}"
        elif isinstance(self.outputs, tuple):
            ret = ", ".join(self.outputs)
        else:
            ret = self.outputs
        return f"    def forward(self, {args}):\n{body}\n        return {ret}\n"


def _describe(b: _Builder, seed: int, runs_at: tuple[int, ...], source: str, channels_last: bool) -> str:
    sym = {1: ["L"], 2: ["H", "W"], 3: ["D", "H", "W"]}[b.d]
    dims = ", ".join(s if a == 0 else f"{s}{a:+d}" for s, a in zip(sym, b.aspect))
    ins = ", ".join(f"{n}: (N, {c}, {dims})" for n, c in zip(b.input_names, b.channels))
    layout = " (channels_last: inputs and 4-D weights)" if channels_last else ""
    head = (f"# random_program({seed}): {str(b.dtype).replace('torch.', '')}, inputs {ins}{layout}; "
            f"sizes {'/'.join(map(str, b.sizes))} (nominal {b.sizes[0]}), runs at {'/'.join(map(str, runs_at))}; "
            f"shapes below at batch {NOMINAL_BATCH}, nominal size")
    attrs = "\n".join(f"    #   self.{a} = {t}" for a, t in b.attrs)
    return f"{head}\nclass {b.cls.__name__}(nn.Module):\n    # __init__:\n{attrs}\n{source}"


def _runs(module: nn.Module, inputs: tuple[torch.Tensor, ...], grad: bool = False) -> bool:
    try:
        with torch.set_grad_enabled(grad):
            out = module(*inputs)
        leaves = out.values() if isinstance(out, dict) else (out if isinstance(out, tuple) else (out,))
        return all(isinstance(t, torch.Tensor) and bool(torch.isfinite(t).all()) for t in leaves)
    except Exception:  # noqa: BLE001
        return False


def random_program(seed: int) -> Program:
    """A random valid program from ``seed`` (deterministic). It runs at its nominal size, batch 1 to 3,
    with and without autograd; :attr:`Program.runs_at` lists the sizes where it runs at batch 2."""
    rng = random.Random(seed)
    for attempt in range(50):
        b = _Builder(seed, rng)
        try:
            b.build()
        except _Abort:
            continue
        if b.step < 2:
            continue
        source = b.source()
        filename = f"<fxrebirth random_program({seed})>"
        text = f"class {b.cls.__name__}(nn.Module):\n{source}"
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        namespace = dict(_GLOBALS)
        exec(compile(text, filename, "exec"), namespace)
        b.cls.forward = namespace[b.cls.__name__].forward
        module = b.root.eval()
        channels_last = b.d == 2 and random.Random(f"layout {seed}").random() < 0.08
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        program = Program(seed, module, b.dtype, b.d, b.channels, b.aspect, b.sizes, (), "", source, channels_last)
        nominal = b.sizes[0]
        if not all(_runs(module, program.inputs(n, nominal, salt=9)) for n in (1, 2, 3)):
            continue
        if not _runs(module, program.inputs(2, nominal, salt=8), grad=True):
            continue
        program.runs_at = tuple(s for s in b.sizes if s == nominal or _runs(module, program.inputs(2, s, salt=9)))
        program.description = _describe(b, seed, program.runs_at, source, channels_last)
        return program
    raise RuntimeError(f"random_program({seed}): no valid program in 50 attempts")  # pragma: no cover


# --------------------------------------------------------------------------- the end-to-end check
@dataclass
class Outcome:
    """What :func:`check_program` found. ``problems`` holds ``(kind, text)`` with kind ``"wrong"``,
    ``"crash"`` or ``"mutated"``; empty when the program passed (matched, or refused clearly)."""

    seed: int
    refused: str | None = None           # optimize() raised the project's error: its message
    checked: int = 0                     # (size, batch) pairs compared
    guarded: int = 0                     # (size, batch) pairs where the result raised the project's error
    worst: float = 0.0
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> set[str]:
        return {k for k, _ in self.problems}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:240] if text else ''}"


def _clone(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone() for t in inputs)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()}


def _same_state(before: dict[str, torch.Tensor], module: nn.Module) -> str | None:
    after = module.state_dict(keep_vars=True)
    if set(before) != set(after):
        return f"state_dict keys changed: {sorted(set(before) ^ set(after))}"
    for k, v in before.items():
        if after[k].shape != v.shape or after[k].dtype != v.dtype or not torch.equal(after[k].detach(), v):
            return f"{k} changed"
    if module.training:
        return "module left in training mode"
    return None


def check_options(seed: int) -> dict[str, Any]:
    """The optimize() options a seed is checked with: example batch 1 or 2; ``cost_model=None`` (every
    exact merge accepted) on about a third of the seeds."""
    rng = random.Random(f"check options {seed}")
    return {"batch": rng.choice([1, 2]), "accept_all": rng.random() < 0.35}


def check_program(
    program: Program,
    optimize: Callable[..., Any],
    error: type[BaseException],
    relative_error: Callable[[Any, Any], float],
    tolerance: Callable[[torch.dtype], float],
    *,
    batch: int | None = None,
    accept_all: bool | None = None,
) -> Outcome:
    """Optimise ``program.module`` on an example at the nominal size and compare the result with the
    original at every size in ``program.sizes`` where the original runs, at each of
    :data:`CHECK_BATCHES`. Passing means: ``optimize`` raised ``error``, or at every (size, batch) the
    result raised ``error`` or matched (``relative_error <= tolerance(dtype)``); and neither the
    module nor the example inputs were modified. Any other exception is a ``"crash"``."""
    opts = check_options(program.seed)
    batch = opts["batch"] if batch is None else batch
    accept_all = opts["accept_all"] if accept_all is None else accept_all
    outcome = Outcome(program.seed)
    module = program.module
    example = program.inputs(batch, program.nominal, salt=0)
    example_copy = _clone(example)
    state = _state(module)
    kwargs = {"cost_model": None} if accept_all else {}
    gm = None
    try:
        gm, _report = optimize(module, example, **kwargs)
    except error as exc:
        outcome.refused = _first_line(exc)
    except Exception as exc:  # noqa: BLE001
        outcome.problems.append(("crash", f"optimize(batch={batch}, {kwargs}) raised {_first_line(exc)}"))
    changed = _same_state(state, module)
    if changed:
        outcome.problems.append(("mutated", f"optimize() modified the model: {changed}"))
    for i, (a, b) in enumerate(zip(example, example_copy)):
        if not torch.equal(a, b):
            outcome.problems.append(("mutated", f"optimize() modified example input {i}"))
    if gm is None:
        return outcome
    tol = tolerance(program.dtype)
    for size in program.sizes:
        for n in CHECK_BATCHES:
            inputs = program.inputs(n, size, salt=1 + size)
            try:
                with torch.no_grad():
                    expected = module(*_clone(inputs))
            except Exception:  # noqa: BLE001 - the original does not run here: nothing to compare
                continue
            try:
                with torch.set_grad_enabled(n == CHECK_BATCHES[-1]):  # the result runs with and without autograd
                    actual = gm(*_clone(inputs))
            except error:
                outcome.guarded += 1
                continue
            except Exception as exc:  # noqa: BLE001
                outcome.problems.append(("crash", f"result at size {size}, batch {n} raised {_first_line(exc)}"))
                continue
            outcome.checked += 1
            err = relative_error(expected, actual)
            outcome.worst = max(outcome.worst, err)
            if not err <= tol:
                outcome.problems.append(("wrong", f"size {size}, batch {n}: relative error {err:.3g} > {tol:g}"))
    changed = _same_state(state, module)
    if changed:
        outcome.problems.append(("mutated", f"running the result modified the model: {changed}"))
    return outcome
