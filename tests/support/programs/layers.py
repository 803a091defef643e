"""Lines with weights: convolutions (module or functional, with a padding mode, maybe with BN and
ReLU), transposed convolutions, normalisations (BatchNorm, functional batch_norm, GroupNorm), Linear,
and a second call of a layer the program already has."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from tests.support.programs.core import BuilderCore
from tests.support.programs.program import MAX_CHANNELS, divisors, spell, Value


class LayerOps(BuilderCore):
    """Builder lines that apply a layer with weights to a value."""

    def conv(self, v: Value, cout: int | None = None, k: Any = None, stride: Any = None, padding: Any = None,
             mode: str | None = None, groups: int | None = None, bn: bool = False) -> str | None:
        c = v.shape[1]
        cout = cout or self.choice([c, c, 2, 3, 4, 6, 8] + ([2 * c] if 2 * c <= MAX_CHANNELS else []))
        if groups is None:
            common = [g for g in divisors(math.gcd(c, cout)) if g > 1]
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
            line = (f"{out} = F.conv{self.d}d({v.name}, {w}, {b}, stride={spell(stride)}, padding={spell(padding)}, "
                    f"dilation={spell(dilation)}, groups={groups})")
        else:
            mod = getattr(nn, f"Conv{self.d}d")(c, cout, k, stride=stride, padding=padding, dilation=dilation,
                                                  groups=groups, bias=bias, padding_mode=mode)
            if bn:
                mod = nn.Sequential(mod, getattr(nn, f"BatchNorm{self.d}d")(cout), nn.ReLU(inplace=self.chance(0.5)))
            line = f"{out} = {self.attach('conv', mod, None if bn else self.d + 2)}({v.name})"
        return out if self.commit(line, [v.name], [out]) else None

    def conv_transpose(self, v: Value) -> str | None:
        c = v.shape[1]
        cout = self.choice([c, 2, 3, 4, 6])
        common = [g for g in divisors(math.gcd(c, cout)) if g > 1]
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
            line = (f"{out} = F.conv_transpose{self.d}d({v.name}, {w}, {b}, stride={spell(stride)}, "
                    f"padding={padding}, output_padding={output_padding}, groups={groups}, dilation={dilation})")
        else:
            mod = getattr(nn, f"ConvTranspose{self.d}d")(c, cout, k, stride=stride, padding=padding,
                                                           output_padding=output_padding, groups=groups, bias=bias,
                                                           dilation=dilation)
            line = f"{out} = {self.attach('up', mod, self.d + 2)}({v.name})"
        return out if self.commit(line, [v.name], [out]) else None

    def norm(self, v: Value) -> str | None:
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
            groups = self.choice(divisors(c))
            line = f"{out} = {self.attach('gn', nn.GroupNorm(groups, c, eps=eps))}({v.name})"
        else:
            bn = getattr(nn, f"BatchNorm{dim}d")(c, eps=eps, affine=self.chance(0.85))
            line = f"{out} = {self.attach('bn', bn, len(v.shape))}({v.name})"
        return out if self.commit(line, [v.name], [out]) else None

    def linear(self, v: Value) -> str | None:
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

    def reuse(self, v: Value) -> str | None:
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
