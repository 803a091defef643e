"""Rules: pattern + check (with a reason) + rewrite.

A :class:`Rule` looks at one node at a time:

1. ``pattern(node, ctx)`` answers *is this the shape of graph I rewrite?* It returns a :class:`Match`
   (the node whose value will be replaced, the activations the replacement reads, the matched nodes,
   and whatever the rewrite needs) or ``None``. Patterns are silent: a non-match is not news.
2. ``check(match, ctx)`` answers *is the rewrite valid here?* It returns ``None`` or a reason string
   ("BatchNorm 'bn1' is in training mode"). Reasons are collected in the report.
3. ``rewrite(match, ctx)`` inserts the replacement next to the match (through ``ctx``, which records
   what it creates so it can be rolled back) and returns the node computing the new value. It does not
   rewire users: the pipeline verifies the replacement first and only then swaps it in.

Everything a rewrite needs travels in the Match; rules keep no state between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from fxrebirth.graph.capture import SOURCE_KEY, describe  # describe: re-exported for rule authors
from fxrebirth.equivalence import identical
from fxrebirth.errors import PipelineError
from fxrebirth.graph.ops import OPS, kind_of, normalize_kwargs
from fxrebirth.graph.surgery import fetch_attr

__all__ = ["Match", "Rule", "RuleContext", "RewriteRefused", "PHASES", "by_phase", "describe", "name_hint", "producer",
           "users_of"]

PHASES = ("cleanup", "preceding", "following", "prepare", "pooling", "chains", "branches")
"""The phases of the default pipeline, in the order they run: cleanup; folds into the preceding layer (always
exact); folds into the following layer (exact under conditions); moves that prepare a fold; padding and
pooling; the cost-gated merges of linear chains, then of branches. Each family of ``fxrebirth.passes`` gives
its rules by phase (:func:`by_phase`), and :func:`fxrebirth.frontends.library.default_rules` runs the
families phase by phase, so a rule added to a family joins the defaults where its phase says."""


def by_phase(groups: Mapping[str, Sequence["Rule"]], phase: str | None) -> list["Rule"]:
    """A family's rules: those of ``phase`` (a name of :data:`PHASES`; none when the family has no rule
    there), or with ``phase=None`` all of them, phase by phase."""
    unknown = set(groups) - set(PHASES) | ({phase} - set(PHASES) if phase is not None else set())
    if unknown:
        raise PipelineError(f"unknown rule phase(s) {sorted(unknown)}; the phases are {', '.join(PHASES)}")
    return [rule for name in PHASES if phase in (None, name) for rule in groups.get(name, ())]


class RewriteRefused(Exception):
    """Raised inside ``rewrite`` (by the rule or by :class:`RuleContext`) when the replacement turns out not
    to be exact after all, e.g. a folded weight that overflows the model's dtype. The pipeline undoes the
    rewrite and reports the message as the refusal's reason."""


@dataclass(frozen=True)
class Match:
    """What a pattern found.

    ``output``: the node whose value the rewrite replaces; ``inputs``: the activations (non-constant
    values) the replaced computation reads, which local verification feeds with random data;
    ``nodes``: every matched node, for the report and the cost gate; ``bindings``: named values for the
    rewrite; ``also_replaced``: further nodes a multi-output rewrite replaces (it then returns a
    mapping ``{old: new}`` covering ``output`` and these).

    :meth:`computed` is the channel from ``check`` to ``rewrite``: what the check computed to decide (a
    merged kernel, the folded weights) is kept on the match, and the rewrite takes it from there instead
    of computing it again. A match lives for one attempt, so nothing kept on it can go stale.
    """

    output: fx.Node
    inputs: tuple[fx.Node, ...]
    nodes: tuple[fx.Node, ...]
    bindings: Mapping[str, Any] = field(default_factory=dict)
    also_replaced: tuple[fx.Node, ...] = ()
    _computed: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def replaced(self) -> tuple[fx.Node, ...]:
        return (self.output,) + self.also_replaced

    def __getitem__(self, key: str) -> Any:
        return self.bindings[key]

    def computed(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, called once per match and ``key``: the first call (usually in ``check``) keeps the
        result, later ones (in ``rewrite``) return it. A rule's ``check`` keeps returning ``str | None``;
        a rule that never calls this is unaffected."""
        if key not in self._computed:
            self._computed[key] = compute()
        return self._computed[key]


def producer(node: fx.Node, *kinds: str) -> fx.Node | None:
    """``node``'s ``input`` argument when it is a canonical node of one of ``kinds`` that itself reads a
    graph value (the shape of every two-stage pattern), else None."""
    x = node.kwargs.get("input") if node.op == "call_function" else None
    if isinstance(x, fx.Node) and kind_of(x) in kinds and isinstance(x.kwargs.get("input"), fx.Node):
        return x
    return None


def users_of(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s value: its users, less those that read only its shape (size guards
    and metadata queries, :func:`fxrebirth.graph.metadata.reads_only_shape`), which move with the value when a
    rewrite replaces it."""
    from fxrebirth.graph.metadata import reads_only_shape

    return [u for u in node.users if not reads_only_shape(u)]


def name_hint(node: fx.Node) -> str:
    """A readable stem for tensors a rewrite creates: the source module's name, else the node's."""
    return str(node.meta.get(SOURCE_KEY) or node.name)


class Rule:
    """Base class of exact rewrite rules.

    Subclasses set ``name`` (unique in a pipeline), ``identity`` (the equation the rule applies, shown in
    reports and docs), ``changes_parameters`` (True when the rewrite treats weights or statistics as
    constants: such rules are refused by a pipeline that is not ``frozen``) and ``gated`` (True when
    the rewrite can make the model slower, so the pipeline's cost model must approve each one) and
    ``phase`` (the pipeline reaches a fixpoint with the phase-0 rules before it adds phase-1 rules, for
    rewrites that would hide better ones if they ran first).
    """

    name: str = "rule"
    identity: str = ""
    changes_parameters: bool = True
    gated: bool = False
    phase: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A rule class's docstring ends with the identity it declares, written once, in ``identity``."""
        super().__init_subclass__(**kwargs)
        identity = cls.__dict__.get("identity")
        if identity and cls.__doc__ and identity not in cls.__doc__:
            cls.__doc__ = f"{cls.__doc__.rstrip()}\n\n    Identity: ``{identity}``\n"

    def pattern(self, node: fx.Node, ctx: "RuleContext") -> Match | None:
        raise NotImplementedError

    def check(self, match: Match, ctx: "RuleContext") -> str | None:
        return None

    def rewrite(self, match: Match, ctx: "RuleContext") -> fx.Node | Mapping[fx.Node, fx.Node]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Rule {self.name}>"


class RuleContext:
    """What a rule may read and how it may write.

    Reading: :meth:`constant` gives the value of a ``get_attr`` node (or a Python number) as a tensor,
    ``None`` for a value computed at run time. Writing: :meth:`add_tensor` registers a new parameter
    and :meth:`call` a new canonical call, both inserted before the match's output and recorded so the
    pipeline can verify and, if needed, undo them. Tensors given to :meth:`add_tensor` should be the
    exact (float64) result; they are stored in the dtype of ``like`` and the exact value is kept for
    verification.
    """

    def __init__(self, gm: fx.GraphModule, *, frozen: bool = True) -> None:
        self.gm = gm
        self.frozen = frozen
        self.created_nodes: list[fx.Node] = []
        self.created_attrs: list[str] = []
        self.exact_values: dict[fx.Node, torch.Tensor] = {}
        self.guards: list[tuple[fx.Node, Any]] = []
        self._counter = 0
        self._insert_before: fx.Node | None = None
        self._label = ""
        self._snapshots: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    # -- reading ---------------------------------------------------------------------------------
    def constant(self, value: Any) -> torch.Tensor | None:
        """The tensor behind ``value`` when it is a constant (``get_attr`` node or number), else None."""
        if isinstance(value, bool):
            return None
        if isinstance(value, (int, float)):
            return torch.tensor(float(value), dtype=torch.float64)
        if isinstance(value, fx.Node) and value.op == "get_attr":
            if value in self.exact_values:
                return self.exact_values[value]
            attr = fetch_attr(self.gm, value.target)
            return attr.detach() if isinstance(attr, torch.Tensor) else None
        return None

    @property
    def device(self) -> torch.device:
        """Where the model's tensors live (that of its first parameter or buffer; CPU for none)."""
        tensor = next(iter(self.gm.parameters()), None)
        tensor = tensor if tensor is not None else next(iter(self.gm.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def stored(self, node: fx.Node) -> torch.Tensor:
        """The tensor object a ``get_attr`` node refers to (with its dtype, device and Parameter-ness)."""
        return fetch_attr(self.gm, node.target)

    @staticmethod
    def shape(node: Any) -> torch.Size | None:
        """The recorded shape of a node's value (from shape propagation), or None."""
        meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
        return getattr(meta, "shape", None)

    # -- writing ---------------------------------------------------------------------------------
    def begin(self, anchor: fx.Node, label: str = "", reads: Sequence[fx.Node] = ()) -> None:
        """Start a rewrite whose new nodes go before ``anchor`` (called by the pipeline). ``label`` names the
        rewrite in guard messages; the tensors of the ``get_attr`` nodes in ``reads`` are snapshot, so an
        edit made to them in place is undone (:meth:`restore_edited`)."""
        self.created_nodes, self.created_attrs, self._insert_before = [], [], anchor
        self.guards, self._label = [], label
        targets = dict.fromkeys(n.target for n in reads if n.op == "get_attr")
        self._snapshots = []
        for target in targets:
            tensor = fetch_attr(self.gm, target)
            if isinstance(tensor, torch.Tensor):
                self._snapshots.append((target, tensor, tensor.detach().clone()))

    def restore_edited(self) -> list[str]:
        """Put back every snapshot tensor a rewrite changed in place (or replaced); return their names."""
        edited = []
        for target, tensor, value in self._snapshots:
            current = fetch_attr(self.gm, target)
            if current is not tensor:
                _set_attr(self.gm, target, tensor)
            elif identical(current.detach(), value):
                continue
            with torch.no_grad():
                tensor.copy_(value)
            edited.append(target)
        return edited

    def guard(self, x: fx.Node, guard: Any) -> fx.Node:
        """Record that the rewrite is exact only where ``guard`` (a :class:`fxrebirth.graph.guards.SizeGuard`)
        holds for ``x``'s shape: a guard node that raises :class:`fxrebirth.ShapeGuardError` elsewhere."""
        from fxrebirth.graph.guards import check_size

        message = f"the rewrite {self._label} is exact only where {guard.describe()}; optimise the model " \
                  "again with an example of this size"
        with self.gm.graph.inserting_before(self._insert_before):
            node = self.gm.graph.call_function(check_size, (x, guard.as_data(), message))
        node.meta[SOURCE_KEY] = x.meta.get(SOURCE_KEY, x.name)
        self.created_nodes.append(node)
        self.guards.append((x, guard))
        return node

    def add_tensor(self, hint: str, exact: torch.Tensor, like: torch.Tensor) -> fx.Node:
        """A new ``get_attr`` node holding ``exact`` cast to ``like``'s dtype, device and memory format
        (channels_last and channels_last_3d kept for tensors of ``like``'s rank).

        The stored tensor is an ``nn.Parameter`` with ``like``'s ``requires_grad`` when ``like`` is a
        parameter, a buffer otherwise.
        """
        stored = exact.detach().to(device=like.device, dtype=like.dtype)
        _check_representable(hint, exact, stored)
        formats = {4: torch.channels_last, 5: torch.channels_last_3d}
        layout = formats.get(like.dim())
        if layout is not None and stored.dim() == like.dim() and not like.is_contiguous() \
                and like.is_contiguous(memory_format=layout):
            stored = stored.contiguous(memory_format=layout)
        else:
            stored = stored.contiguous()
        name = self._fresh_name(hint)
        if isinstance(like, torch.nn.Parameter):
            self.gm.register_parameter(name, torch.nn.Parameter(stored, requires_grad=like.requires_grad))
        else:
            self.gm.register_buffer(name, stored)
        self.created_attrs.append(name)
        with self.gm.graph.inserting_before(self._insert_before):
            node = self.gm.graph.get_attr(name)
        node.meta["tensor_meta"] = _tensor_meta(stored)
        self.created_nodes.append(node)
        self.exact_values[node] = exact.detach().to(dtype=torch.float64, device=like.device)
        return node

    def call(self, target: Callable[..., Any], like: fx.Node | None = None, **kwargs: Any) -> fx.Node:
        """A new call to ``target`` (canonicalised if it is a known op), inserted before the anchor.

        ``like``'s source module and tensor metadata are copied onto the new node (use it when the new
        node computes a value of the same shape as ``like``).
        """
        if target in OPS:
            kwargs = normalize_kwargs(OPS[target], (), kwargs)
        with self.gm.graph.inserting_before(self._insert_before):
            node = self.gm.graph.call_function(target, (), kwargs)
        if like is not None:
            for key in ("tensor_meta", SOURCE_KEY):
                if key in like.meta:
                    node.meta[key] = like.meta[key]
        self.created_nodes.append(node)
        return node

    @staticmethod
    def set_shape(node: fx.Node, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Record the shape and dtype of a new node whose value has no counterpart in the old graph."""
        node.meta["tensor_meta"] = _tensor_meta(torch.empty(tuple(shape), dtype=dtype, device="meta"))

    def rollback(self) -> None:
        """Erase what the current rewrite created."""
        for node in reversed(self.created_nodes):
            if not node.users:
                self.gm.graph.erase_node(node)
            self.exact_values.pop(node, None)
        for name in self.created_attrs:
            _delete_attr(self.gm, name)
        self.created_nodes, self.created_attrs, self.guards = [], [], []

    def _fresh_name(self, hint: str) -> str:
        base = "fxrebirth_" + "".join(c if c.isalnum() else "_" for c in hint).strip("_")
        while True:
            self._counter += 1
            name = f"{base}_{self._counter}"
            if not hasattr(self.gm, name):
                return name


def _check_representable(hint: str, exact: torch.Tensor, stored: torch.Tensor) -> None:
    """Refuse a folded tensor that is not finite, or that the model's dtype cannot hold: one that overflows
    (float16 tops out at 65504) or, in a half precision, loses more than the dtype's whole-model tolerance
    to rounding (float32 and float64 round by at most ~6e-8 relative: far inside their bounds). One pass
    over the tensor for float32, three for the half precisions: this runs for every folded weight."""
    from fxrebirth.equivalence import relative_error, tolerance

    if not stored.is_floating_point():
        return
    if not bool(torch.isfinite(stored).all()):
        if not bool(torch.isfinite(exact).all()):
            raise RewriteRefused(f"the folded tensor for {hint!r} is not finite (a zero variance or a division by 0)")
        raise RewriteRefused(
            f"the folded tensor for {hint!r} overflows {stored.dtype} (largest magnitude "
            f"{exact.abs().max().item():.3g})")
    if stored.dtype in (torch.float16, torch.bfloat16) and exact.numel():
        error = relative_error(exact, stored)
        if error > tolerance(stored.dtype):
            raise RewriteRefused(f"the folded tensor for {hint!r} loses {error:.1e} to {stored.dtype} rounding")


def _set_attr(gm: torch.nn.Module, target: str, value: Any) -> None:
    *path, last = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    setattr(owner, last, value)


def _delete_attr(gm: torch.nn.Module, target: str) -> None:
    *path, last = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    delattr(owner, last)


def _tensor_meta(t: torch.Tensor) -> Any:
    from fxrebirth.graph.capture import tensor_metadata

    return tensor_metadata(t)
