r"""Choosing which candidates to merge: the dynamic programme over a network's candidates.

Optimal under two stated approximations, as in Kim et al. (ICML 2023): importances and latency gains add up
over the chosen candidates. Candidates are ordered by where their span (first to last node in graph order)
ends; two whose spans overlap conflict (this also keeps apart candidates that share a node, whatever
strategy marked them). With ``w_j = floor(gain_j / unit)``, over candidates ``j`` and gains ``g``::

    best[j][g] = min(best[j-1][g], importance_j + best[p(j)][max(0, g - w_j)])

(``p(j)``: the last candidate ending before ``j`` starts) is the least summed importance that saves at least
``g`` units; flooring makes every claimed gain a lower bound of the estimate. The **front** is
``best[n][g]`` over every ``g``: estimated speed-up against summed importance. A candidate whose importance
was not measured counts 0 (it is chosen by its gain alone); ties go to fewer merges of larger gains (:data:`TIE`).
"""

from __future__ import annotations

import bisect
import math
from typing import Protocol, Sequence

__all__ = ["choose", "fill", "TIE"]

TIE = 1e-12
"""What each merge adds to the summed importance, so that among equally important sets the DP prefers
fewer merges, of larger gains (far below any measured importance)."""


class Choosable(Protocol):
    gain_s: float
    importance: float | None
    span: tuple[int, int]


def choose(cands: Sequence[Choosable], need_s: float, unit_s: float, limit_s: float = math.inf
           ) -> tuple[list[int], list[tuple[float, float, list[int]]], float]:
    """The dynamic programme (``unit_s``: the gain grid's step). Returns the indices (into ``cands``) of the
    least important conflict-free set saving at least ``need_s`` (``[]`` if none does; ``need_s=inf``: the
    set saving the most), the front as ``(gain_s, summed importance, chosen indices)`` at each gain where the
    least importance rises, and the most any set saves on the grid. The grid stops at ``limit_s``."""
    usable = sorted((i for i, c in enumerate(cands) if c.gain_s > 0), key=lambda i: cands[i].span[1])
    ends = [cands[i].span[1] for i in usable]
    weights = [int(cands[i].gain_s // unit_s) for i in usable]
    top = min(sum(weights), int(limit_s // unit_s) if math.isfinite(limit_s) else sum(weights))
    inf = math.inf
    best = [[0.0] + [inf] * top]
    take: list[list[bool]] = [[False] * (top + 1)]
    before = [bisect.bisect_left(ends, cands[i].span[0]) for i in usable]  # rows of candidates ending earlier
    for j, i in enumerate(usable):
        # ties (importance equal or unmeasured) go to fewer merges of larger gains: a merge's accuracy cost is
        # never known to be nothing
        imp = (cands[i].importance or 0.0) + TIE * (1 + 1 / max(weights[j], 1))
        prev, base, w = best[j], best[before[j]], weights[j]
        row, took = list(prev), [False] * (top + 1)
        for g in range(top + 1):
            with_it = imp + base[max(0, g - w)]
            if with_it < row[g]:
                row[g], took[g] = with_it, True
        best.append(row)
        take.append(took)

    def chosen_for(g: int) -> list[int]:
        picked, j = [], len(usable)
        while j > 0 and g > 0:
            if take[j][g]:
                picked.append(usable[j - 1])
                g, j = max(0, g - weights[j - 1]), before[j - 1]
            else:
                j -= 1
        return sorted(picked)

    final = best[-1]
    need = top if math.isinf(need_s) else (math.ceil(need_s / unit_s - 1e-9) if need_s > 0 else 0)
    picked = chosen_for(need) if need <= top and final[need] < inf else []
    front = [(g * unit_s, final[g], chosen_for(g))
             for g in range(top + 1) if final[g] < inf and (g == top or final[g + 1] > final[g])]
    return picked, front, top * unit_s


def fill(cands: Sequence[Choosable], picked: list[int]) -> list[int]:
    """``picked`` and every other candidate with a positive gain that conflicts with none chosen, largest gain
    first: what "merge everything worth merging" adds below the grid's step."""
    chosen = list(picked)
    for i in sorted(range(len(cands)), key=lambda i: -cands[i].gain_s):
        c = cands[i]
        if i in chosen or c.gain_s <= 0:
            continue
        if all(c.span[1] < cands[k].span[0] or cands[k].span[1] < c.span[0] for k in chosen):
            chosen.append(i)
    return sorted(chosen)
