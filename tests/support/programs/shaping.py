"""Lines that change a value's shape: pooling (average, max, adaptive, global), explicit padding,
reshapes, views, permutes and pixel (un)shuffles (some with literal sizes), and back from (N, features)
to a spatial value."""

from __future__ import annotations

import math

from torch import nn

from tests.support.programs.core import BuilderCore
from tests.support.programs.program import divisors, spell, Value


class ShapingOps(BuilderCore):
    """Builder lines that pool, pad or reshape a value."""

    def pool(self, v: Value) -> str | None:
        d, x, out = self.d, v.name, self.name()
        dims = spell(self.sdims())
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
                line = (f"{out} = F.avg_pool{d}d({x}, {spell(k)}, stride={spell(stride)}, padding={padding}, "
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
                line = (f"{out} = F.max_pool{d}d({x}, {spell(k)}, stride={spell(stride)}, padding={padding}, "
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
                f"{x}.mean({dims}, keepdim=True)", f"{x}.mean(dim={spell(list(self.sdims()))}, keepdim=True)",
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

    def pad(self, v: Value) -> str | None:
        d, x, out = self.d, v.name, self.name()
        n = self.rng.randint(1, d)
        mode = self.rng.choices(["constant", "reflect", "replicate", "circular"], [0.4, 0.2, 0.2, 0.2])[0]
        low = -1 if mode == "constant" and self.chance(0.1) else 0
        pads = tuple(self.rng.randint(low, 2) for _ in range(2 * n))
        if self.chance(0.6):
            value = self.choice([0.0, 0.0, 0.5, -1.0]) if mode == "constant" else None
            extra = f", value={value}" if value else ""
            line = f"{out} = F.pad({x}, {spell(pads)}, mode={mode!r}{extra})"
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

    def reshape(self, v: Value) -> str | None:
        d, x, out = self.d, v.name, self.name()
        c, sp = v.shape[1], v.shape[2:]
        lit = ", ".join(str(s) for s in sp)
        dyn = ", ".join(f"{x}.size({i})" for i in self.sdims())
        r = self.rng.random()
        forms: list[str] = []
        if r < 0.2 and d > 1:
            forms = [f"{x}.transpose(2, 3)", f"{x}.transpose(-1, -2)", f"{x}.transpose(2, 3).contiguous()"]
        elif r < 0.35:
            g = self.choice([g for g in divisors(c) if 1 < g < c] or [1])
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
                forms = [f"{lin}({x}.permute{spell(last)}).permute{spell(back)}"]
            else:
                s = self.attach("cscale", self.signed((c,)))
                forms = [f"({x}.permute{spell(last)} * {s}).permute{spell(back)}"]
        elif r < 0.85 and d == 2:
            forms = [f"F.pixel_unshuffle({x}, 2)"] + ([f"F.pixel_shuffle({x}, 2)"] if c % 4 == 0 else [])
        else:  # to (N, features)
            forms = [f"torch.flatten({x}, 1)", f"{x}.flatten(1)", f"{x}.view({x}.size(0), -1)",
                     f"{x}.reshape(-1, {math.prod(v.shape[1:])})",
                     f"{self.attach('flat', nn.Flatten())}({x})"]
        line = f"{out} = {self.choice(forms)}"
        return out if self.commit(line, [x], [out]) else None

    def unflatten(self, v: Value) -> str | None:
        x, out, f = v.name, self.name(), v.shape[1]
        ones = ", ".join("1" for _ in range(self.d))
        idx = ", ".join(["None"] * self.d)
        line = f"{out} = " + self.choice([f"{x}.view(-1, {f}, {ones})", f"{x}.reshape({x}.size(0), {f}, {ones})",
                                          f"{x}[:, :, {idx}]", x + ".unsqueeze(-1)" * self.d])
        return out if self.commit(line, [x], [out]) else None
