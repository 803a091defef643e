"""The pass pipeline: rules applied to a fixpoint, linted after each pass, every rewrite verified.

Each rule runs as one pass (:class:`RulePass`): a sweep over the graph that applies the rule wherever
its pattern matches and its check passes. For every rewrite the pipeline

1. lets the rule insert its replacement beside the matched nodes,
2. verifies it locally (:func:`fxrebirth.rewrite.verify.local_error`, float64, random activations), and
3. swaps it in, or -- on a mismatch -- erases it, logs a warning and records the rollback.

Passes repeat in order until a whole round changes nothing (the fixpoint); ``graph.lint()`` runs
after every pass that changed the graph. Rules of a later ``phase`` join once the earlier phases have
reached their fixpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch.fx as fx

from fxrebirth.errors import PipelineError
from fxrebirth.rewrite.cost import CostModel, RooflineCost
from fxrebirth.graph.aliasing import keep_output_aliases, output_aliases
from fxrebirth.graph.guards import check_size, is_guard
from fxrebirth.graph.metadata import SYMBOLIC_KEY, reads_only_shape
from fxrebirth.graph.mutation import eliminate_dead_code, is_impure, mutated_input, tainted
from fxrebirth.graph.surgery import prune_unused_attributes
from fxrebirth.rewrite.report import Decision, Report, RuleStats
from fxrebirth.rewrite.rules import Match, Rule, RuleContext, RewriteRefused, describe, users_of
from fxrebirth.graph.variants import VARIANTS_KEY
from fxrebirth.rewrite.verify import DEFAULT_TOLERANCE, UnverifiableError, local_error

__all__ = ["PassResult", "RulePass", "Pipeline", "prune_unused_attributes"]

log = logging.getLogger(__name__)

NOT_FROZEN = "parameters are not frozen (pipeline frozen=False): folding would change what training updates"


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: torch.fx's ``PassResult`` fields (``graph_module``, ``modified``), so that a
    :class:`RulePass` or a :class:`Pipeline` runs under ``torch.fx.passes.infra.pass_manager.PassManager``,
    and the pass's :class:`Report` (what it did and refused)."""

    graph_module: fx.GraphModule
    modified: bool
    report: Report | None = None


def _erase_dead(graph: fx.Graph, nodes: Sequence[fx.Node]) -> None:
    pending = [n for n in dict.fromkeys(nodes) if not getattr(n, "_erased", False)]
    progress = True
    while pending and progress:
        progress = False
        for node in list(pending):
            if not node.users and not is_impure(node):
                graph.erase_node(node)
                pending.remove(node)
                progress = True


@dataclass(frozen=True)
class RulePass:
    """One sweep of one rule over the graph.

    ``cost_model`` gates rules with ``gated = True``: a rewrite is kept only when the model estimates
    the new nodes cheaper than the nodes they replace (unless the rule's name is in ``force``).
    """

    rule: Rule
    verify: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    frozen: bool = True
    cost_model: CostModel | None = None
    forced: bool = False

    @property
    def name(self) -> str:
        return self.rule.name

    def __call__(self, gm: fx.GraphModule, report: Report | None = None, rolled_back: set[fx.Node] | None = None, *,
                 recompile: bool = True, limit: int | None = None,
                 mutated: frozenset[fx.Node] | None = None) -> PassResult:
        """Apply the rule wherever it matches. ``rolled_back`` (shared across a pipeline's iterations)
        holds the output nodes whose rewrite was undone, so they are not tried again. ``recompile=False``
        leaves regenerating ``gm``'s Python code to the caller (a pipeline does it once at the end).
        ``limit``: stop once the report holds that many applied rewrites (to replay a prefix of a run).
        ``mutated``: the graph's tainted values (:func:`fxrebirth.graph.mutation.tainted`), when the caller has
        them: no rewrite touches them, so they stay the same for a whole pipeline run. Called as
        ``rule_pass(gm)`` (as torch.fx's PassManager does), it reports into a fresh :class:`Report`."""
        rolled_back = set() if rolled_back is None else rolled_back
        report = Report() if report is None else report
        stats = report.stats(self.rule.name)
        ctx = RuleContext(gm, frozen=self.frozen)
        modified = False
        mutated = tainted(gm.graph) if mutated is None else mutated
        watched = _watch(gm)
        restored: set[str] = set()
        for node in list(gm.graph.nodes):
            if limit is not None and len(report.applied) >= limit:
                break
            if getattr(node, "_erased", False):
                continue
            match = self.rule.pattern(node, ctx)
            if match is None or match.output in rolled_back:
                continue
            if self._attempt(gm, match, ctx, report, stats, rolled_back, mutated, restored):
                modified = True
        _check_untouched(watched, gm, restored, self.rule.name)
        if modified:
            self._tidy(gm, recompile)
        return PassResult(gm, modified, report)

    def _attempt(self, gm: fx.GraphModule, match: Match, ctx: RuleContext, report: Report, stats: RuleStats,
                 rolled_back: set[fx.Node], mutated: frozenset[fx.Node], restored: set[str]) -> bool:
        """One match: refused, rewritten and rolled back, or rewritten and applied (True)."""
        reason = NOT_FROZEN if (self.rule.changes_parameters and not self.frozen) else None
        reads = [a for n in match.nodes + match.replaced for a in n.all_input_nodes] + list(match.nodes)
        reason = reason or _mutation_reason(reads + list(match.inputs), mutated) or self.rule.check(match, ctx)
        if reason is not None:
            stats.refuse(describe(match.output), reason)
            return False
        label = f"{self.rule.name!r} at {describe(match.output)}"
        ctx.begin(_first(match.replaced), label, reads)
        why = None
        try:
            replacement = _as_mapping(match, self.rule.rewrite(match, ctx))
        except RewriteRefused as exc:
            replacement, why = {}, str(exc)
        except Exception:
            restored.update(ctx.restore_edited())
            ctx.rollback()
            raise
        edited = ctx.restore_edited()
        restored.update(edited)
        if edited and why is None:
            why = (f"the rule edited {', '.join(map(repr, edited))} in place (undone); rules must create new "
                   "tensors with ctx.add_tensor")
        why = why or self._gate(match, ctx, stats) or self._verify(gm, match, replacement, ctx, report, stats) \
            or _move_guards(match, replacement, ctx.created_nodes)
        if why is not None:
            ctx.rollback()
            rolled_back.add(match.output)
            stats.rolled_back += 1
            stats.refuse(describe(match.output), why)
            log.log(logging.DEBUG if why.startswith("cost") else logging.WARNING,
                    "%s at %s rolled back: %s", self.rule.name, describe(match.output), why)
            return False
        self._apply(gm, match, replacement, ctx, report, stats, label)
        return True

    def _apply(self, gm: fx.GraphModule, match: Match, replacement: dict[fx.Node, fx.Node], ctx: RuleContext,
               report: Report, stats: RuleStats, label: str) -> None:
        """Swap the replacement in for the matched nodes and record the rewrite."""
        for old, new in replacement.items():
            for key, value in old.meta.items():
                new.meta.setdefault(key, value)
            old.replace_all_uses_with(new)
        _erase_dead(gm.graph, match.nodes + match.replaced)
        stats.rewrites += 1
        stats.rewritten.append(describe(match.output))
        report.applied.append((self.rule.name, describe(match.output)))
        report.guards += [f"{label}: {guard.describe()}" for _, guard in ctx.guards]
        log.debug("%s rewrote %s", self.rule.name, describe(match.output))

    def _tidy(self, gm: fx.GraphModule, recompile: bool) -> None:
        """After a pass that changed ``gm``: dead code and unused attributes removed, the graph linted."""
        eliminate_dead_code(gm.graph)
        prune_unused_attributes(gm)
        try:
            gm.graph.lint()
        except Exception as exc:
            raise PipelineError(f"rule {self.rule.name!r} left an invalid graph: {exc}") from exc
        if recompile:
            gm.recompile()

    def _gate(self, match: Match, ctx: RuleContext, stats: RuleStats) -> str | None:
        if not self.rule.gated or self.cost_model is None:
            return None
        removed = [n for n in match.nodes + match.replaced if n.op != "get_attr" and _dies(n, match)]
        before = sum(self.cost_model.node_cost(n) for n in dict.fromkeys(removed))
        after = sum(self.cost_model.node_cost(n) for n in ctx.created_nodes
                    if n.op != "get_attr" and n.target is not check_size)
        accepted = self.forced or self.cost_model.accepts(self.rule.name, describe(match.output), before, after)
        stats.decisions.append(Decision(describe(match.output), before, after, accepted, self.forced))
        if accepted:
            return None
        return f"cost gate: estimated {before * 1e6:.1f} us -> {after * 1e6:.1f} us (not faster)"

    def _verify(
        self, gm: fx.GraphModule, match: Match, replacement: dict[fx.Node, fx.Node], ctx: RuleContext,
        report: Report, stats: RuleStats,
    ) -> str | None:
        if not self.verify:
            return None
        start = time.perf_counter()
        try:
            error = max(local_error(gm, old, new, match.inputs, ctx.exact_values, guards=ctx.guards)
                        for old, new in replacement.items())
        except UnverifiableError as exc:
            return f"cannot verify: {exc}"
        finally:
            report.verify_s += time.perf_counter() - start
        if not error <= self.tolerance:
            return f"verification failed: relative error {error:.2e} > {self.tolerance:.0e}"
        stats.max_error = max(stats.max_error, error)
        return None


def _mutation_reason(touched: Sequence[fx.Node], mutated: frozenset[fx.Node]) -> str | None:
    """Why a match must not be rewritten: it touches (computes, reads or replaces) a value written in place,
    or an alias of one."""
    if not mutated:
        return None
    for node in touched:
        if node in mutated:
            writers = [u for u in mutated if mutated_input(u) is not None]
            direct = [u for u in writers if u is node or mutated_input(u) is node or node in u.users]
            writer = describe(min(direct or writers)) if writers else "an in-place operation"
            return (f"{describe(node)} is written in place (by {writer}, or through a value that aliases it); "
                    "fxrebirth does not move computation across a mutation")
    return None


def _watch(gm: fx.GraphModule) -> list[tuple[str, object, int]]:
    """Every parameter and buffer with its version counter, to catch a rule that edits one in place."""
    named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    return [(name, t, t._version) for name, t in named]


def _check_untouched(watched: list[tuple[str, object, int]], gm: fx.GraphModule, restored: set[str],
                     rule: str) -> None:
    current = dict(gm.named_parameters(remove_duplicate=False))
    current.update(gm.named_buffers(remove_duplicate=False))
    for name, tensor, version in watched:
        if name in restored or name not in current:
            continue
        if current[name] is not tensor or tensor._version != version:
            raise PipelineError(
                f"rule {rule!r} changed the tensor {name!r} in place outside what it matched; rules must not "
                "edit existing tensors (create new ones with ctx.add_tensor). The model is left unoptimised.")


def _first(nodes: Sequence[fx.Node]) -> fx.Node:
    """The earliest of ``nodes`` in graph order (new nodes go before it, so they precede every use).
    Nodes of one graph compare by position (``Node.__lt__``); walking the graph instead made a pass
    quadratic in graph size."""
    return min(nodes)


def _as_mapping(match: Match, result: fx.Node | Mapping[fx.Node, fx.Node]) -> dict[fx.Node, fx.Node]:
    mapping = dict(result) if isinstance(result, Mapping) else {match.output: result}
    if set(mapping) != set(match.replaced):
        raise PipelineError(f"rewrite must replace exactly the match's replaced nodes {list(match.replaced)}")
    return mapping


def _dies(node: fx.Node, match: Match) -> bool:
    """Does ``node`` disappear once the match's replaced nodes are rewired (all users inside the match)?"""
    inside = set(match.nodes) | set(match.replaced)
    return node in match.replaced or all(u in inside for u in users_of(node))


def _shape_record(node: fx.Node) -> tuple:
    return (getattr(node.meta.get("tensor_meta"), "shape", None), tuple(node.meta.get(VARIANTS_KEY) or ()),
            node.meta.get(SYMBOLIC_KEY))


def _hoist(new: fx.Node, before: fx.Node, created: Sequence[fx.Node]) -> bool:
    """Move ``new`` and the nodes the rewrite created for it up to just before ``before`` (a shape reader
    that precedes it), when everything else they read already exists there; return whether it moved."""
    fresh = set(created)
    needed, stack = set(), [new]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        for arg in node.all_input_nodes:
            if arg in fresh:
                stack.append(arg)
            elif not arg < before:
                return False
    for node in sorted(needed):
        if not node < before:
            before.prepend(node)
    return True


def _move_guards(match: Match, replacement: Mapping[fx.Node, fx.Node], created: Sequence[fx.Node]) -> str | None:
    """Shape readers (size guards, metadata queries: :func:`fxrebirth.graph.metadata.reads_only_shape`) read
    values that a rewrite may remove. On a replaced node they follow the new value; on a matched node that
    dies they move to the replacement of the match's output when that has the same shape: the same
    symbolic shape where capture recorded one (a proof), else the same shape at the example and at every
    variant. Otherwise the rewrite is refused (a guard or a query is never lost)."""
    new = replacement.get(match.output)
    moves = []
    for node in match.nodes:
        readers = [u for u in node.users if reads_only_shape(u)]
        if not readers or node in replacement or not _dies(node, match):
            continue
        record = _shape_record(node)
        if new is None or record != _shape_record(match.output) or record[0] is None:
            what = "a guard checks" if any(is_guard(r) for r in readers) else "the model reads"
            return f"it would remove {describe(node)}, whose size {what}"
        early = [r for r in readers if not is_guard(r) and not r > new]
        if early and not _hoist(new, min(early), created):
            return f"it would remove {describe(node)}, whose size is read before its replacement can exist"
        moves += [(r, node) for r in readers]
    for reader, node in moves:
        reader.replace_input_with(node, new)
        if is_guard(reader):
            new.append(reader)  # right after the value it now reads
    return None


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of rules run to a fixpoint.

    ``verify``: check every rewrite numerically (float64, local) and roll back mismatches.
    ``frozen``: parameters and statistics may be treated as constants (inference); with ``False`` only
    rules that leave parameters alone run, the others report why they did not.
    ``max_iterations``: rounds before giving up on reaching a fixpoint (a warning, not an error).
    ``cost_model``: gates rules marked ``gated`` (merges that can make a layer slower); ``None`` turns
    the gate off. ``force``: names of gated rules applied whatever the cost model says.
    ``max_rewrites``: stop after that many rewrites. The pipeline is deterministic, so this replays the
    first rewrites of a full run (how :func:`fxrebirth.optimize` finds the rewrite that broke a model).
    """

    rules: tuple[Rule, ...]
    verify: bool = True
    tolerance: float = DEFAULT_TOLERANCE
    frozen: bool = True
    max_iterations: int = 20
    cost_model: CostModel | None = field(default_factory=lambda: RooflineCost())
    force: frozenset[str] = frozenset()
    max_rewrites: int | None = None
    passes: tuple[RulePass, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise PipelineError(f"rule names must be unique in a pipeline; repeated: {duplicates}")
        unknown = set(self.force) - set(names)
        if unknown:
            raise PipelineError(f"force= names unknown rule(s) {sorted(unknown)}; known rules: {', '.join(names)}")
        passes = tuple(
            RulePass(r, self.verify, self.tolerance, self.frozen, self.cost_model, r.name in self.force)
            for r in self.rules
        )
        object.__setattr__(self, "passes", passes)

    def run(self, gm: fx.GraphModule, report: Report | None = None) -> tuple[PassResult, Report]:
        """Rewrite ``gm`` in place to a fixpoint; return the result and the (updated) report."""
        report = report if report is not None else Report()
        report.verified = self.verify
        for rule in self.rules:
            report.stats(rule.name)
        start = time.perf_counter()
        modified_any = False
        rolled_back: dict[str, set[fx.Node]] = {rule.name: set() for rule in self.rules}
        mutated = tainted(gm.graph)
        aliases = output_aliases(gm.graph)
        for phase in sorted({rule.phase for rule in self.rules}):
            active = [p for p in self.passes if p.rule.phase <= phase]
            for _ in range(self.max_iterations):
                report.iterations += 1
                modified = False
                for rule_pass in active:
                    modified |= rule_pass(gm, report, rolled_back[rule_pass.name], recompile=False,
                                          limit=self.max_rewrites, mutated=mutated).modified
                modified_any |= modified
                if not modified:
                    break
            else:
                log.warning("pipeline did not reach a fixpoint in %d iterations", self.max_iterations)
        if modified_any:
            keep_output_aliases(gm, aliases)  # a removed no-op must not make outputs share memory
            gm.recompile()
        report.passes_s += time.perf_counter() - start
        return PassResult(gm, modified_any, report), report

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        """:meth:`run` as a pass (``pipeline(gm)``, as torch.fx's PassManager calls it); the report is the
        result's ``report``."""
        return self.run(gm)[0]
