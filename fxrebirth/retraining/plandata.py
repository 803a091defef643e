"""The plan as data: :class:`Candidate` and :class:`Plan`, their choice, JSON, table and check against a model.

One plan type holds the candidates of every retraining strategy (:mod:`fxrebirth.retraining.strategy`); how
they are found and measured is :mod:`fxrebirth.retraining.planning`, how they are chosen
:mod:`fxrebirth.retraining.selection`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx

from fxrebirth.graph.regions import Region, RegionError, check_regions
from fxrebirth.retraining.planformats import PLAN_FORMAT, upgrade
from fxrebirth.retraining.selection import choose, fill
from fxrebirth.rewrite.validate import OptionError

__all__ = ["Candidate", "Plan", "FrontPoint", "kept_ids", "PLAN_FORMAT"]



@dataclass
class Candidate:
    """A candidate merge: the region (its ``kind`` names the strategy that marked it), its latency now and
    merged on the plan's runtime (seconds), its importance (None: not measured), its span in graph order,
    FLOPs and weighted depth now and merged, and whether it is chosen."""

    region: Region
    latency_now_s: float
    latency_new_s: float
    importance: float | None
    span: tuple[int, int]
    flops_now: int = 0
    flops_new: int = 0
    depth_now: int = 0
    depth_new: int = 0
    selected: bool = False

    @property
    def strategy(self) -> str:
        return self.region.kind

    @property
    def gain_s(self) -> float:
        return self.latency_now_s - self.latency_new_s

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["region"] = self.region.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Candidate":
        return cls(**dict(data, region=Region.from_dict(data["region"]), span=tuple(data["span"])))


@dataclass
class FrontPoint:
    """One point of the estimated front: the speed-up, the summed importance, the candidates chosen."""

    speedup: float
    importance: float
    chosen: list[str]


def kept_ids(ids: list[str], names: "list[str] | tuple[str, ...]") -> list[str]:
    """The candidate ids that ``names`` keep: equal to a name or starting with it. :class:`RegionError` for a
    name that matches none, naming the ids there are (a typo must not silently merge what it meant)."""
    kept = []
    for name in names:
        matched = [i for i in ids if i == name or i.startswith(name)]
        if not matched:
            shown = ", ".join(ids[:30]) + (f", ... ({len(ids)} in all)" if len(ids) > 30 else "")
            raise RegionError(f"keep {name!r}: no candidate has that id or prefix; candidates: {shown}")
        kept += [i for i in matched if i not in kept]
    return kept


@dataclass
class Plan:
    """Candidates of every strategy, their measured cost and importance, and the choice among them."""

    model: str
    input_shape: list[int]
    latency_s: float
    source: str
    candidates: list[Candidate] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)
    calibration_shape: list[int] | None = None
    front: list[FrontPoint] = field(default_factory=list)

    @property
    def selected(self) -> list[Candidate]:
        return [c for c in self.candidates if c.selected]

    @property
    def estimated_latency_s(self) -> float:
        return self.latency_s - sum(c.gain_s for c in self.selected)

    @property
    def estimated_speedup(self) -> float:
        left = self.estimated_latency_s
        return self.latency_s / left if left > 0 else math.inf

    def by_strategy(self, selected: bool = True) -> dict[str, list[Candidate]]:
        """The (selected) candidates grouped by strategy name, in graph order within each."""
        out: dict[str, list[Candidate]] = {}
        for c in sorted(self.selected if selected else self.candidates, key=lambda c: c.span):
            out.setdefault(c.strategy, []).append(c)
        return out

    def select(self, target_speedup: float | None = None, budget_s: float | None = None,
               keep: "list[str] | tuple[str, ...]" = (), steps: int = 2000) -> None:
        """Choose (see :mod:`fxrebirth.retraining.planning`): for a target speed-up or a latency budget the
        least important conflict-free set that reaches it (:class:`OptionError` when none does), otherwise the
        set that saves the most plus every other candidate worth merging. ``keep``: ids or id prefixes never
        chosen. ``steps``: the gain grid's resolution, in steps of the whole latency."""
        if target_speedup is not None and budget_s is not None:
            raise OptionError("give target_speedup= or budget_s=, not both")
        kept = set(kept_ids([c.region.id for c in self.candidates], keep))
        usable = [c for c in self.candidates if c.region.id not in kept]
        goal = budget_s if budget_s is not None else self.latency_s / target_speedup if target_speedup else None
        unit = self.latency_s / steps
        need = self.latency_s - goal if goal is not None else math.inf
        picked, front, most = choose(usable, need, unit, self.latency_s - unit)
        if goal is None:
            picked = fill(usable, picked)
        for c in self.candidates:
            c.selected = False
        for i in picked:
            usable[i].selected = True
        self.front = [FrontPoint(self.latency_s / (self.latency_s - gain), imp, [usable[i].region.id for i in ids])
                      for gain, imp, ids in front]
        if goal is not None and not picked and need > 0:
            wanted = f"{self.latency_s / goal:.2f}x" if goal > 0 else "a latency of 0"
            raise OptionError(f"no set of merges reaches {wanted} on this runtime (the most, estimated: "
                              f"{self.latency_s / (self.latency_s - most):.2f}x); lower the target")

    def drop(self, region_id: str) -> None:
        """Deselect a candidate by id (``KeyError`` naming the known ids if there is none)."""
        for c in self.candidates:
            if c.region.id == region_id:
                c.selected = False
                return
        raise KeyError(f"no candidate {region_id!r}; candidates: {[c.region.id for c in self.candidates]}")

    def keep(self, names: "list[str] | tuple[str, ...]") -> None:
        """Deselect every candidate whose id is one of ``names`` or starts with one (:func:`kept_ids`)."""
        for region_id in kept_ids([c.region.id for c in self.candidates], names):
            self.drop(region_id)

    def validate(self, gm: fx.GraphModule) -> None:
        """Raise :class:`RegionError` unless the selected candidates fit ``gm`` (the captured model): valid,
        disjoint regions that each strategy finds there, whose replacing layers fit the regions' shapes."""
        from fxrebirth.retraining.strategy import get_strategy

        check_regions(gm.graph, [c.region for c in self.selected])
        for name, cands in self.by_strategy().items():
            get_strategy(name).check(gm, [c.region for c in cands])

    def to_json(self, **kwargs: Any) -> str:
        data = asdict(self)
        data["candidates"] = [c.to_dict() for c in self.candidates]
        return json.dumps({"format": PLAN_FORMAT, **data}, **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """A plan from :meth:`to_json`, or from fxrebirth 0.2's rebirth or depth planner (converted)."""
        data = upgrade(json.loads(text))
        data["candidates"] = [Candidate.from_dict(c) for c in data["candidates"]]
        data["front"] = [FrontPoint(**p) for p in data.get("front", [])]
        return cls(**data)

    def table(self, limit: int = 40) -> str:
        """The candidates (selected first, then by gain), the choice and the front, as text."""
        lines = [f"plan: {self.model}, input {self.input_shape}, latency {self.latency_s * 1e3:.2f} ms ({self.source})"
                 + (f"; importance at {self.calibration_shape}" if self.calibration_shape else ""),
                 f"  {'candidate':<44} {'depth':>7} {'now ms':>8} {'new ms':>8} {'gain':>7} {'importance':>10} "
                 f"{'MFLOPs':>15}  sel  replaces"]
        ranked = sorted(self.candidates, key=lambda c: (not c.selected, -c.gain_s))
        for c in ranked[:limit]:
            importance = "-" if c.importance is None else f"{c.importance:.2e}"
            summary = c.region.summary()
            lines.append(f"  {c.region.id[:44]:<44} {c.depth_now:>3}->{c.depth_new:<3} {c.latency_now_s * 1e3:>8.3f} "
                         f"{c.latency_new_s * 1e3:>8.3f} {c.gain_s * 1e3:>7.3f} {importance:>10} "
                         f"{c.flops_now / 1e6:>7.0f}->{c.flops_new / 1e6:<7.0f}  {'yes' if c.selected else ' no'}  "
                         f"{summary[:80]}{'...' if len(summary) > 80 else ''}")
        if len(ranked) > limit:
            lines.append(f"  ... {len(ranked) - limit} more")
        by = ", ".join(f"{n}: {len(cs)}" for n, cs in self.by_strategy().items()) or "none"
        lines.append(f"  selected {len(self.selected)} of {len(self.candidates)} ({by}); estimated latency "
                     f"{self.estimated_latency_s * 1e3:.2f} ms ({self.estimated_speedup:.2f}x), before retraining")
        if any(c.importance is not None for c in self.candidates) and self.front:
            lines.append("  front (estimated speed-up: summed importance): " + ", ".join(
                f"{p.speedup:.2f}x: {p.importance:.3g}" for p in self.front[:: max(1, len(self.front) // 12)]))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

