"""The core of the program builder (:class:`BuilderCore`): the program's state, seeded draws, and
:meth:`~BuilderCore.commit`, which tries each generated line on copies before running it for real."""

from __future__ import annotations

import itertools
import math
import random
import re
from typing import Any, Callable

import torch
from torch import nn

from tests.support.programs.program import PROGRAM_GLOBALS, MAX_CHANNELS, MAX_ELEMENTS, NOMINAL_BATCH, Abort, Value


class BuilderCore:
    """The state of a program being built (its root module, values, lines) and what every kind of line
    uses: seeded draws, attaching modules and tensors, trying a line then committing it, picking a value."""

    def __init__(self, seed: int, rng: random.Random) -> None:
        self.seed = seed
        self.rng = rng
        self.gen = torch.Generator().manual_seed(rng.getrandbits(62))
        r = rng.random()
        self.d = 2 if r < 0.7 else (1 if r < 0.85 else 3)
        self.dtype = torch.float64 if rng.random() < 0.25 else torch.float32
        # the package, tests.support.programs, as when this was one module
        self.cls = type(f"RandomProgram{seed}", (nn.Module,), {"__module__": __package__})
        self.root = self.cls()
        self.attrs: list[tuple[str, str]] = []   # (attribute, description)
        self.modules: list[tuple[str, nn.Module, int]] = []  # reusable layers: (attr, module, rank)
        self.pending: list[str] = []
        self.env: dict[str, torch.Tensor] = {}
        self.vals: dict[str, Value] = {}
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
        trial = dict(PROGRAM_GLOBALS)
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
                if t.shape[0] != NOMINAL_BATCH or t.numel() == 0 or t[0].numel() > MAX_ELEMENTS:
                    raise ValueError("bad size")
                if t.dim() > 2 and t.shape[1] > 3 * MAX_CHANNELS:
                    raise ValueError("too many channels")
                if not torch.isfinite(t).all():
                    raise ValueError("not finite")
        except Exception:  # noqa: BLE001 - an invalid line is simply not generated
            self._drop_pending()
            return False
        ns = dict(PROGRAM_GLOBALS)
        ns["self"] = self.root
        ns.update(self.env)
        try:
            with torch.no_grad():
                exec(code, ns)
        except Exception as exc:  # noqa: BLE001
            raise Abort(str(exc)) from exc
        self.step += 1
        for r in reads:
            self.vals[r].uses += 1
            self.env[r] = ns[r]
        for o in outs:
            self.env[o] = ns[o]
            self.vals[o] = Value(o, tuple(ns[o].shape), touched=self.step)
        if mutates is not None:
            self.vals[mutates].touched = self.step
        shapes = ", ".join(str(tuple(self.env[o].shape)) for o in (outs or ([mutates] if mutates else [])))
        self.lines.append(f"{line}  # {shapes}" if shapes else line)
        self.pending = []
        return True

    def pick(self, pred: Callable[[Value], bool], prefer_used: bool = False) -> Value | None:
        cands = [v for v in self.vals.values() if pred(v)]
        if not cands:
            return None
        weights = [(0.55 ** (self.step - v.touched) + 0.04) * (3.0 if prefer_used and v.uses else 1.0) for v in cands]
        return self.rng.choices(cands, weights)[0]

    def spatial(self, v: Value) -> bool:
        return len(v.shape) == self.d + 2

    @staticmethod
    def flat(v: Value) -> bool:
        return len(v.shape) == 2

    def sdims(self) -> tuple[int, ...]:
        return tuple(range(2, self.d + 2))

    def tup(self, make: Callable[[], int], p_tuple: float = 0.2) -> Any:
        """An int, or (sometimes, for d > 1) a tuple with one value per spatial dimension."""
        if self.d > 1 and self.chance(p_tuple):
            return tuple(make() for _ in range(self.d))
        return make()

    def const_shape(self, v: Value) -> tuple[int, ...]:
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
