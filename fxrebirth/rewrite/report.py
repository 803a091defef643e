"""The report of a pipeline run: what each rule did, what it refused and why, and what it cost."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Decision", "Refusal", "RuleStats", "Report"]


@dataclass(frozen=True)
class Refusal:
    """A rule matched but did not rewrite: where, and why."""

    node: str
    reason: str


@dataclass(frozen=True)
class Decision:
    """A cost-gate decision: estimated seconds of the replaced and the new nodes."""

    node: str
    before_s: float
    after_s: float
    accepted: bool
    forced: bool = False


@dataclass
class RuleStats:
    """Per-rule outcome: rewrites applied, refusals (deduplicated), worst verification error."""

    rewrites: int = 0
    refusals: list[Refusal] = field(default_factory=list)
    rolled_back: int = 0
    max_error: float = 0.0
    rewritten: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def refuse(self, node: str, reason: str) -> None:
        # a set beside the list (not a field: not in to_dict): a pass re-refuses the same nodes every
        # iteration, and a list lookup made that quadratic in graph size
        seen = self.__dict__.get("_seen")
        if seen is None:
            seen = self.__dict__["_seen"] = set(self.refusals)
        refusal = Refusal(node, reason)
        if refusal not in seen:
            seen.add(refusal)
            self.refusals.append(refusal)


@dataclass
class Report:
    """What an optimisation did. ``str(report)`` prints a table; :meth:`to_dict` gives the data.

    ``applied``: every rewrite in the order applied, as ``(rule, node)``; ``guards``: the size guards the
    rewrites recorded (:mod:`fxrebirth.graph.guards`); ``checks``: what the whole-model check compared and at
    which inputs, or what was skipped (``verify=False``, ``check_output=False``) and any fallback.
    ``output_error``: the optimised model against the original, both run in the model's dtype (what users
    see; the rounding criterion, :mod:`fxrebirth.rewrite.precision`), or the float64 figure where there is
    no float32 one; ``output_error64``: the same comparison in float64 (the algebra's error).
    """

    model: str = ""
    rules: dict[str, RuleStats] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    iterations: int = 0
    capture_s: float = 0.0
    passes_s: float = 0.0
    verify_s: float = 0.0
    check_s: float = 0.0
    verified: bool = True
    output_error: float | None = None
    output_error64: float | None = None
    applied: list[tuple[str, str]] = field(default_factory=list)
    guards: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    def stats(self, rule: str) -> RuleStats:
        return self.rules.setdefault(rule, RuleStats())

    @property
    def rewrites(self) -> int:
        return sum(s.rewrites for s in self.rules.values())

    @property
    def max_error(self) -> float:
        return max((s.max_error for s in self.rules.values()), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rewrites"] = self.rewrites
        data["max_error"] = self.max_error
        return data

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, *, reasons: int = 3) -> str:
        """A plain-text table; ``reasons`` caps the refusal reasons listed per rule."""
        lines = [f"fxrebirth report{': ' + self.model if self.model else ''}"]
        width = max([len(name) for name in self.rules] + [4])
        lines.append(f"  {'rule':<{width}}  rewrites  refused  rolled back  max rel. error (float64)")
        for name, s in self.rules.items():
            lines.append(
                f"  {name:<{width}}  {s.rewrites:>8}  {len(s.refusals):>7}  {s.rolled_back:>11}  {s.max_error:.1e}"
            )
        for name, s in self.rules.items():
            if not s.refusals:
                continue
            counts: dict[str, list[str]] = {}
            for r in s.refusals:
                counts.setdefault(r.reason, []).append(r.node)
            lines.append(f"  refused by {name}:")
            for reason, nodes in list(counts.items())[:reasons]:
                more = f" (+{len(nodes) - 1} more)" if len(nodes) > 1 else ""
                lines.append(f"    - {nodes[0]}{more}: {reason}")
            if len(counts) > reasons:
                lines.append(f"    - ... {len(counts) - reasons} more reasons (see report.to_dict())")

        for name, s in self.rules.items():
            if not s.decisions:
                continue
            accepted = sum(d.accepted for d in s.decisions)
            lines.append(f"  cost gate of {name}: {accepted} accepted, {len(s.decisions) - accepted} rejected")
            for d in s.decisions[:reasons]:
                verdict = "forced" if d.forced else ("accepted" if d.accepted else "rejected")
                lines.append(f"    - {d.node}: {d.before_s * 1e6:.1f} us -> {d.after_s * 1e6:.1f} us, {verdict}")

        def row(label: str, before: float, after: float, fmt: str = "{:,}") -> str:
            ratio = f"{before / after:.2f}x" if after else "-"
            return f"  {label:<12} {fmt.format(before):>16} -> {fmt.format(after):>16}  ({ratio})"

        lines.append(row("nodes", self.nodes_before, self.nodes_after))
        lines.append(row("parameters", self.params_before, self.params_after))
        lines.append(row("FLOPs", self.flops_before, self.flops_after))
        timing = f"  time: capture {self.capture_s:.2f} s, passes {self.passes_s:.2f} s"
        timing += f" (of which verification {self.verify_s:.2f} s)" if self.verified else " (verification off)"
        timing += f", {self.iterations} iteration(s) to fixpoint"
        lines.append(timing + (f", whole-model check {self.check_s:.2f} s" if self.check_s else ""))
        if self.output_error is not None:
            lines.append(f"  whole-model relative error (worst of the checked inputs): {self.output_error:.1e}"
                         + (f" (in float64: {self.output_error64:.1e})" if self.output_error64 is not None
                            and self.output_error64 != self.output_error else ""))
        if self.guards:
            lines.append(f"  size guards ({len(self.guards)}; each raises ShapeGuardError at sizes where its rewrite "
                         "would be wrong):")
            lines += [f"    - {g}" for g in self.guards[:reasons]]
            if len(self.guards) > reasons:
                lines.append(f"    - ... {len(self.guards) - reasons} more (see report.guards)")
        if self.checks:
            lines.append("  checks:")
            lines += [f"    - {c}" for c in self.checks]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
