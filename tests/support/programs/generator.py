"""The whole generator: :class:`_Builder` (every kind of line, drawn by weight, then the outputs and
the ``forward`` source) and :func:`random_program`, which builds, compiles and validates a program."""

from __future__ import annotations

import linecache
import random
from typing import Any

import torch
from torch import nn

from tests.support.programs.blocks import BlockOps
from tests.support.programs.program import PROGRAM_GLOBALS, NOMINAL_BATCH, Program, Abort, Value


class _Builder(BlockOps):
    """A random program, built line by line (:meth:`build`), with its ``forward`` source (:meth:`source`)."""

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
            self.vals[name] = Value(name, shape)
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
        def dangling() -> list[Value]:
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
        except Abort:
            continue
        if b.step < 2:
            continue
        source = b.source()
        filename = f"<fxrebirth random_program({seed})>"
        text = f"class {b.cls.__name__}(nn.Module):\n{source}"
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        namespace = dict(PROGRAM_GLOBALS)
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
