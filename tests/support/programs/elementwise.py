"""Element-wise lines: per-channel scale and shift, activations (ReLU in every spelling, in place or
not), in-place arithmetic (on intermediate values and on inputs, often aliased), binary ops with
broadcast, concatenation, identities (dropout in eval, clones, views)."""

from __future__ import annotations

import torch
from torch import nn

from tests.support.programs.core import BuilderCore
from tests.support.programs.program import MAX_CHANNELS, Value


class ElementwiseOps(BuilderCore):
    """Builder lines that combine or transform values element by element."""

    def scale_shift(self, v: Value) -> str | None:
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

    def activation(self, v: Value) -> str | None:
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

    def inplace(self, v: Value) -> str | None:
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
            def fits(u: Value) -> bool:
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

    def binary(self, v: Value, u: Value | None = None) -> str | None:
        if u is None:
            def fits(w: Value) -> bool:
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

    def cat(self, v: Value) -> str | None:
        def fits(w: Value) -> bool:
            return (len(w.shape) == len(v.shape) and w.shape[0] == v.shape[0] and w.shape[2:] == v.shape[2:]
                    and w.shape[1] + v.shape[1] <= 3 * MAX_CHANNELS)
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

    def identity(self, v: Value) -> str | None:
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
