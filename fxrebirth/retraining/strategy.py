r"""The retraining-strategy protocol: what the planner and the job ask of a way to merge layers by retraining.

A retraining strategy finds candidates on a captured graph, says what one layer would replace each, and
after training turns its trainable form into the deployed one. The planner (:func:`fxrebirth.plan`) and
the job (:func:`fxrebirth.rebirth`) never ask which strategy they hold: they call these methods, so a new
strategy is one class and one :func:`register_strategy` call, in any file (a test file included).

=====================  ==================================================================================
method                 what it does
=====================  ==================================================================================
``mark(gm, **opts)``   candidates of the captured ``gm``: :class:`~fxrebirth.graph.regions.Region` s of
                       ``kind == name`` whose proposal is the replacing layer and its geometry
``layer(region)``      a freshly initialised replacing layer (timed by the planner, trained by the job)
``cut(gm, region)``    the region cut out of ``gm`` as a module of one input and one output (timed A/B
                       against ``layer``)
``importance(...)``    per candidate, what merging it alone costs on calibration images (``None``: not
                       measured; the plan then chooses it by gain alone)
``student(gm, rs)``    ``gm`` with the regions ``rs`` in their trainable form
``initialise(job, …)`` the trainable form's starting weights (calibration images used)
``finish(gm)``         the trained student's regions in deployed form (merged or swapped in)
=====================  ==================================================================================

``options`` names the planning options a strategy reads (``streamline_kernel``, ...) and ``training`` the
:class:`~fxrebirth.retraining.config.RebirthConfig` fields it reads beyond the common ones: an option no
chosen strategy reads is refused (:func:`check_options`), never silently ignored.

Two families of trainable form ship: :class:`SwitchStrategy` (the region behind a :class:`RegionSwitch`
holding the original and its replacement; ``finish`` keeps the replacement: streamline and branch) and the
depth strategy's student form (activations removed, merged exactly after training:
:mod:`fxrebirth.retraining.strategies`).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Iterable, Mapping

import torch
import torch.fx as fx
from torch import nn

from fxrebirth.graph.regions import Region, RegionError
from fxrebirth.retraining.initialise import extract_region
from fxrebirth.retraining.layers import RENAMED, build_rebirth, replace_regions
from fxrebirth.rewrite.validate import OptionError

__all__ = ["Strategy", "SwitchStrategy", "RegionSwitch", "register_strategy", "unregister_strategy", "get_strategy",
           "strategy_names",
           "strategy_of", "check_options", "COMMON_TRAINING"]

log = logging.getLogger(__name__)

COMMON_TRAINING = frozenset({"epochs", "batch_size", "lr", "temperature", "kd_weight", "warmup", "train_batch_norm",
                             "augment", "shift", "mixup_alpha", "eval_images", "seed", "device", "precision"})
"""RebirthConfig fields every strategy's job reads (end-to-end distillation, device, data); the others
belong to the strategies whose ``training`` names them."""


class Strategy:
    """A retraining strategy (see the module docstring). Subclasses set ``name``, ``options`` and
    ``training``, and implement :meth:`mark`, :meth:`student` and :meth:`finish`; the defaults of the other
    methods time the region against its proposal's layer and measure no importance."""

    name: ClassVar[str] = ""
    options: ClassVar[frozenset[str]] = frozenset()
    training: ClassVar[frozenset[str]] = frozenset()
    needs_calibration: ClassVar[bool] = False
    """True when :meth:`importance` needs calibration images (without them it is not measured)."""
    order: ClassVar[int] = 1
    """Student forms are placed in ascending ``order`` and finished in descending order (a strategy that
    rewrites the graph's own nodes goes before one that only calls modules in place of regions)."""

    def mark(self, gm: fx.GraphModule, **options: Any) -> list[Region]:
        raise NotImplementedError

    def layer(self, region: Region) -> nn.Module:
        """The replacing layer, freshly initialised: the module the region's proposal describes."""
        return build_rebirth(region.proposal)

    def cut(self, gm: fx.GraphModule, region: Region) -> nn.Module:
        """The region of ``gm`` as a module of its one input."""
        return extract_region(gm, region)

    def check(self, gm: fx.GraphModule, regions: list[Region]) -> None:
        """Raise :class:`RegionError` unless each region's replacing layer reads and produces the region's
        shapes in ``gm`` (the captured model)."""
        nodes = {n.name: n for n in gm.graph.nodes}
        for region in regions:
            if region.input not in nodes or region.output not in nodes:
                raise RegionError(f"region {region.id!r}: this model has no node {region.input!r}/{region.output!r}")
            shape = tuple(nodes[region.input].meta["tensor_meta"].shape)
            want = tuple(nodes[region.output].meta["tensor_meta"].shape)
            try:
                with torch.no_grad():
                    got = tuple(self.layer(region)(torch.zeros(shape)).shape)
            except RegionError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of an edited proposal is the plan's
                raise RegionError(f"region {region.id!r}: its rebirth layer does not fit: {exc}") from None
            if got != want:
                raise RegionError(f"region {region.id!r}: its rebirth layer produces {list(got)}, the region "
                                  f"{list(want)}")

    def importance(self, gm: fx.GraphModule, regions: list[Region], images: torch.Tensor,
                   batch: int = 64) -> dict[str, float] | None:
        """Per region id, what merging it alone costs on ``images`` (``gm`` captured at their size); None:
        not measured."""
        return None

    def student(self, gm: fx.GraphModule, regions: list[Region]) -> fx.GraphModule:
        raise NotImplementedError

    def initialise(self, job: Any, regions: list[Region], seed: int) -> int:
        """Set the trainable form's starting weights; return the forward-only calibration images used."""
        return 0

    def train_mode(self, gm: fx.GraphModule, training: bool) -> None:
        """Switch the trainable form between training and evaluation where ``nn.Module.train`` does not
        (the default: nothing to switch)."""

    def finish(self, gm: fx.GraphModule) -> fx.GraphModule:
        raise NotImplementedError


class RegionSwitch(nn.Module):
    """A region in the student: the original region's subgraph and its rebirth layer; ``active`` picks."""

    def __init__(self, original: nn.Module, rebirth: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.rebirth = rebirth
        self.register_buffer("active", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rebirth(x) if bool(self.active) else self.original(x)


class SwitchStrategy(Strategy):
    """A strategy whose trainable form is a :class:`RegionSwitch` per region (the original region and its
    replacement, switched on once initialised) and whose deployed form is the replacement alone."""

    def student(self, gm: fx.GraphModule, regions: list[Region]) -> fx.GraphModule:
        import copy
        import dataclasses

        renamed = gm.meta.get(RENAMED, {})  # inputs that an earlier strategy's switch now computes
        here = [dataclasses.replace(r, input=renamed.get(r.input, r.input)) for r in regions]
        switches = {r.id: RegionSwitch(copy.deepcopy(self.cut(gm, r)), self.layer(r)) for r in here}
        return replace_regions(gm, here, switches)

    def initialise(self, job: Any, regions: list[Region], seed: int) -> int:
        """Switch each region to its freshly initialised layer (a subclass may fit it first)."""
        for region in regions:
            job.switch(region.id).active.fill_(True)
        return 0

    def finish(self, gm: fx.GraphModule) -> fx.GraphModule:
        """``gm`` with every :class:`RegionSwitch` replaced by its rebirth layer (each must be switched on)."""
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), RegionSwitch):
                switch = gm.get_submodule(node.target)
                if not bool(switch.active):
                    raise RegionError(f"region at {node.target} was never merged")
                gm.add_submodule(node.target, switch.rebirth)
        gm.delete_all_unused_submodules()
        gm.recompile()
        return gm


_REGISTRY: dict[str, Strategy] = {}


def register_strategy(strategy: Strategy, *, replace: bool = False) -> Strategy:
    """Make ``strategy`` known to the planner, the job and the command line by its ``name``; returns it."""
    if not strategy.name:
        raise OptionError(f"{type(strategy).__name__}: a strategy needs a name")
    if strategy.name in _REGISTRY and not replace:
        raise OptionError(f"a strategy named {strategy.name!r} is registered already; give replace=True")
    _REGISTRY[strategy.name] = strategy
    return strategy


def unregister_strategy(name: str) -> None:
    """Forget the strategy registered as ``name`` (:class:`OptionError` if there is none)."""
    get_strategy(name)
    del _REGISTRY[name]


def strategy_names() -> list[str]:
    """The registered strategies' names, in registration order."""
    return list(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    """The strategy registered as ``name``; :class:`OptionError` naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise OptionError(f"no retraining strategy {name!r}; known: {', '.join(_REGISTRY)}") from None


def strategy_of(region: Region) -> Strategy:
    """The strategy that marked ``region`` (its ``kind``)."""
    return get_strategy(region.kind)


def check_options(chosen: Iterable[str], given: "Iterable[str] | Mapping[str, Any]", *, what: str = "training") -> None:
    """Refuse (:class:`OptionError`, one line) any of ``given`` (option names the caller set, or names with their
    values) that none of the ``chosen`` strategies reads (``what``: ``"training"`` checks
    :attr:`Strategy.training`, ``"options"`` :attr:`Strategy.options`)."""
    chosen = list(chosen)
    values = dict(given) if isinstance(given, Mapping) else None
    read = {n: getattr(get_strategy(n), what) for n in chosen}
    for option in given:
        if option in COMMON_TRAINING or any(option in r for r in read.values()):
            continue
        users = [n for n in strategy_names() if option in getattr(get_strategy(n), what)]
        by = f"read by the {' and '.join(users)} strateg{'ies' if len(users) > 1 else 'y'}" if users else \
            "read by no strategy"
        label = f"{option}={values[option]!r}" if values is not None else option
        raise OptionError(f"{label} is {by}; the chosen strategies are {', '.join(chosen) or 'none'}: drop {option}"
                          + (f" or choose {users[0]}" if users else ""))
