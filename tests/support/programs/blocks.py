"""Multi-line blocks built from single lines: RepVGG-like parallel branches, residual blocks, a value
read, mutated in place and read again, conv then average pooling, classifier heads."""

from __future__ import annotations

from torch import nn

from tests.support.programs.elementwise import ElementwiseOps
from tests.support.programs.layers import LayerOps
from tests.support.programs.program import spell, Value
from tests.support.programs.shaping import ShapingOps


class BlockOps(ShapingOps, ElementwiseOps, LayerOps):
    """Builder blocks of several lines (they call the single-line kinds)."""

    def parallel(self, v: Value) -> str | None:
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

    def residual(self, v: Value) -> str | None:
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

    def mutate_shared(self, v: Value) -> str | None:
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

    def conv_pool(self, v: Value) -> str | None:
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

    def head(self, v: Value) -> str | None:
        """A classifier head: global pool (or flatten), Linear, maybe BatchNorm1d / ReLU, Linear."""
        x = v.name
        if self.spatial(v):
            f = self.name()
            d = self.d
            form = self.choice([f"torch.flatten(F.adaptive_avg_pool{d}d({x}, 1), 1)", f"{x}.mean({spell(self.sdims())})",
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
