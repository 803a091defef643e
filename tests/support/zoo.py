"""The model zoo: every attention-free image-classification model of torchvision and timm, through
every entry point of fxrebirth.

* :func:`population` defines which models are in the zoo (see its docstring for "attention");
* :func:`build` makes one with random weights and randomised BatchNorm, :func:`smallest_input` finds
  the smallest square size it runs at;
* ``sweep_one`` (:mod:`tests.support.zoo_sweep`) runs one model through ``fxrebirth.optimize``,
  the ``torch.compile`` backend and ``torch.export`` + :func:`fxrebirth.frontends.export.optimize_exported`,
  and returns a JSON-serialisable row;
* :func:`foldable_batchnorms` and :func:`count_ops` are structural checks of a graph, independent of
  the rules' own code.

timm is a development dependency, never a runtime one: it is imported inside the functions that need
it. ``benchmarks/zoo_sweep.py`` runs the whole zoo and writes ``docs/zoo.md``;
``tests/test_zoo.py`` is the CI sample.

This module owns the population and the building of models; the sweep (:func:`sweep_one`, the
entry-point runners, :data:`ENTRY_POINTS`) lives in :mod:`tests.support.zoo_sweep`, which imports
this module, and the structural checks in :mod:`tests.support.zoo_checks`, re-exported here.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterable, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from fxrebirth.errors import first_line
from fxrebirth.testing import randomize_batchnorm
from tests.support.zoo_checks import count_ops, foldable_batchnorms

__all__ = [
    "SOURCES", "SIZES", "REPARAMETERISABLE", "Candidate", "survey", "population", "family_of", "build",
    "build_sized", "randomize_all_batchnorms", "smallest_input", "foldable_batchnorms", "count_ops",
    "attention_in", "is_reparameterisable", "STATISTICS",
]

SOURCES = ("torchvision", "timm")
SIZES = tuple(range(64, 321, 32))
"""Square input sizes :func:`smallest_input` tries, smallest first: 64, 96, ..., 320."""
REPARAMETERISABLE = (
    ("byobnet", ("repvgg", "mobileone")), ("fastvit", ()), ("repvit", ()), ("repghost", ()),
    ("ghostnet", ("ghostnetv3",)),
)
"""timm families with train-time branches that ``timm.utils.model.reparameterize_model`` merges:
(family, name prefixes; empty = every model of the family)."""

_MATRIX_PRODUCTS = {"mm", "bmm", "matmul", "dot", "vdot", "mv"}
_ADD_PRODUCTS = {"addmm", "baddbmm", "addbmm", "addmv"}  # (input, a, b): the product is of a and b


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One model of a source, as surveyed on the meta device.

    ``attention``: why it counts as having attention (``None``: it has none); ``error``: why it could
    not be built on the meta device (it is then kept in the population, its size and attention unknown).
    """

    source: str
    name: str
    family: str
    params: int | None
    attention: str | None
    error: str | None = None


def _names(source: str) -> list[str]:
    if source == "torchvision":
        import torchvision

        return list(torchvision.models.list_models(module=torchvision.models))
    if source == "timm":
        import timm

        return list(timm.list_models())
    raise ValueError(f"unknown source {source!r}; use one of {SOURCES}")


def family_of(source: str, name: str) -> str:
    """The module that defines the model: timm's ``byobnet``, torchvision's ``resnet``, ..."""
    if source == "timm":
        import timm.models

        module = timm.models.model_entrypoint(name).__module__
    else:
        import torchvision

        module = torchvision.models.get_model_builder(name).__module__
    return module.rsplit(".", 1)[-1]


def _construct(source: str, name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if source == "timm":
            import timm

            return timm.create_model(name, pretrained=False)
        import torchvision

        return torchvision.models.get_model(name, weights=None)


def _nominal_size(source: str, name: str, model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size:
        return int(size[-2]), int(size[-1])
    return (299, 299) if name == "inception_v3" else (224, 224)


class _ProductWatch(TorchDispatchMode):
    """Records the matrix products whose two operands both depend on the input (and attention kernels)."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.tainted = WeakIdKeyDictionary()
        self.tainted[x] = True
        self.found: list[str] = []

    def _is_tainted(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value in self.tainted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if "scaled_dot_product" in name or name.startswith("_flash_attention") or name.startswith("_efficient_attention"):
            self.found.append(name)
        elif name in _MATRIX_PRODUCTS and len(args) >= 2 and self._is_tainted(args[0]) and self._is_tainted(args[1]):
            self.found.append(name)
        elif name in _ADD_PRODUCTS and len(args) >= 3 and self._is_tainted(args[1]) and self._is_tainted(args[2]):
            self.found.append(name)
        out = func(*args, **kwargs)
        flat = tree_leaves((args, kwargs))
        if any(self._is_tainted(a) for a in flat):
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    self.tainted[o] = True
        return out


def attention_in(model: nn.Module, input_size: tuple[int, int] | None = (224, 224)) -> str | None:
    """Why ``model`` has an attention block, or ``None``.

    An attention block computes its mixing weights from the data: a ``torch.nn.MultiheadAttention``, a
    module whose class name contains ``"Attention"``, or (when ``input_size`` is given: one forward at
    batch 1 on the device of the model's parameters, meant for the meta device) a matrix product
    (``mm``/``bmm``/``matmul``/``einsum``/``scaled_dot_product_attention``) of two tensors that both
    depend on the input. Gating that multiplies elementwise (squeeze-excite, ECA, CBAM, selective-kernel
    and split attention) is not attention; linear layers and MLP-Mixer's token mixing multiply by a
    weight, not by data, so they are not either.
    """
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__:
            return f"module {type(module).__name__}"
    if input_size is None:
        return None
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.empty(1, 3, *input_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _ProductWatch(x) as watch:
            model(x)
    finally:
        model.train(was_training)
    if watch.found:
        return f"a product of two input-dependent tensors ({watch.found[0]})"
    return None


def survey(sources: Sequence[str] = SOURCES) -> list[Candidate]:
    """Every model of ``sources``, built on the meta device (no memory, no weights; a builder that fails
    there is run on the CPU and its model moved to the meta device): its family, its parameter count and
    whether it has attention (:func:`attention_in`); sorted by (source, name)."""
    found = []
    for source in sources:
        for name in _names(source):
            try:
                family = family_of(source, name)
            except Exception as exc:  # noqa: BLE001 - a broken registry entry is reported, not fatal
                family = "?"
                found.append(Candidate(source, name, family, None, None, f"{type(exc).__name__}: {first_line(exc)}"))
                continue
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = _construct(source, name)
            except Exception:  # noqa: BLE001 - builders that compute with tensors (torchvision's regnet)
                try:  # ... are built on the CPU once, then moved to the meta device
                    model = _construct(source, name).to("meta")
                except Exception as exc:  # noqa: BLE001 - kept in the population as "not built"
                    found.append(Candidate(source, name, family, None, None,
                                           f"{type(exc).__name__}: {first_line(exc)}"))
                    continue
            params = sum(p.numel() for p in model.parameters())
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    attention = attention_in(model, _nominal_size(source, name, model))
            except Exception:  # noqa: BLE001 - the meta forward failed: judged by its modules alone
                attention = attention_in(model, None)
            found.append(Candidate(source, name, family, params, attention))
    return sorted(found, key=lambda c: (c.source, c.name))


def population(sources: Sequence[str] = SOURCES, max_params: int = 50_000_000,
               candidates: Iterable[Candidate] | None = None) -> list[Candidate]:
    """The zoo: the image-classification models of torchvision
    (``torchvision.models.list_models(module=torchvision.models)``) and timm (``timm.list_models()``)
    with no attention block and at most ``max_params`` parameters, sorted by (source, name).

    "Attention block" is defined by :func:`attention_in`: a ``torch.nn.MultiheadAttention``, a module
    whose class name contains ``"Attention"``, or a matrix product of two input-dependent tensors in the
    forward pass (run once on the meta device at the model's nominal input size). Squeeze-excite, ECA,
    CBAM, selective-kernel and split-attention gating are not attention; global-context blocks (GCNet:
    softmax-weighted pooling, a product of two input-dependent tensors) are. Models that cannot be built
    at all stay in (their size and attention unknown; ``Candidate.error`` says why: "not built" rows).
    ``candidates`` reuses a :func:`survey` instead of building every model again.
    """
    pool = list(candidates) if candidates is not None else survey(sources)
    kept = [c for c in pool if c.source in sources and c.attention is None
            and (c.params is None or c.params <= max_params)]
    return sorted(kept, key=lambda c: (c.source, c.name))


def randomize_all_batchnorms(model: nn.Module, generator: torch.Generator) -> None:
    """:func:`~fxrebirth.testing.randomize_batchnorm`, plus BatchNorm-like modules outside ``_NormBase``
    (frozen BatchNorm keeps its statistics and affine parameters as buffers)."""
    randomize_batchnorm(model, generator)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) or "BatchNorm" not in type(m).__name__:
                continue
            for attr, (low, high) in {"running_mean": (-1.0, 1.0), "running_var": (0.25, 2.0),
                                      "weight": (0.5, 1.5), "bias": (-1.0, 1.0)}.items():
                t = getattr(m, attr, None)
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    t.copy_(torch.rand(t.shape, generator=generator, dtype=torch.float64) * (high - low) + low)


def _calibrate_batchnorms(model: nn.Module, size: int | tuple[int, int], generator: torch.Generator) -> bool:
    """Set every BatchNorm's running mean and variance to the statistics of one random batch of 8 at
    ``size`` (the BatchNorms alone in training mode, cumulative average); False (statistics left as they
    were) when that forward fails."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats and m.running_mean is not None]
    if not norms:
        return True
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms]
    h, w = (size, size) if isinstance(size, int) else size
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(torch.randn(8, 3, h, w, generator=generator))
        return True
    except Exception:  # noqa: BLE001 - the caller keeps the uniform draws
        with torch.no_grad():
            for m, (_, mean, var) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
        return False
    finally:
        for m, (momentum, _, _) in zip(norms, saved):
            m.momentum = momentum
        model.eval()


STATISTICS = ("uniform", "calibrated")


def build_sized(source: str, name: str, seed: int, size: Any, statistics: str) -> tuple[nn.Module, Any, str]:
    """:func:`build`, returning ``(model, input size or None, how its BatchNorm statistics were set:
    "uniform" or "calibrated")``; the size is :func:`smallest_input` unless given."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics={statistics!r}: use one of {STATISTICS}")
    torch.manual_seed(seed)
    model = _construct(source, name).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    randomize_all_batchnorms(model, generator)
    if size is None:
        size = smallest_input(model)
    how = "uniform"
    if statistics == "calibrated" and size is not None and _calibrate_batchnorms(model, size, generator):
        how = "calibrated"
    return model, size, how


def build(source: str, name: str, seed: int = 0, size: int | tuple[int, int] | None = None,
          statistics: str = "uniform") -> nn.Module:
    """The model in eval mode, with random weights (drawn from ``seed``; nothing is downloaded) and no
    BatchNorm left at its initial values (timm zero-initialises some gammas, which would hide a wrong
    fold): weight (gamma) and bias (beta) drawn uniformly as :func:`~fxrebirth.testing.randomize_batchnorm`
    does, and running mean and variance

    * ``statistics="uniform"`` (default): drawn uniformly too (means in [-1, 1), variances in [0.25, 2));
    * ``statistics="calibrated"``: the statistics of one random batch of 8 at ``size`` (default
      :func:`smallest_input`); the uniform draws stay where that forward fails.

    Uniform statistics no longer normalise anything, and through a hundred layers some models become so
    ill-conditioned that float32 cannot evaluate them (timm's seresnet101 differs from its own float64
    copy by 0.43, norm-wise; calibrated, by 1.5e-5). Calibrated models are well-conditioned, but their
    small random logits put the float32 rounding of deep ones near 1e-5 (the sweep's ``noise32``).
    """
    return build_sized(source, name, seed, size, statistics)[0]


def _fixed_size(model: nn.Module) -> tuple[int, int] | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if isinstance(cfg, dict) and cfg.get("fixed_input_size") and cfg.get("input_size"):
        return int(cfg["input_size"][-2]), int(cfg["input_size"][-1])
    return None


def smallest_input(model: nn.Module, sizes: Sequence[int] = SIZES) -> int | tuple[int, int] | None:
    """The smallest square size in ``sizes`` (64, 96, ..., 320) at which ``model`` runs (batch 1,
    float32, no grad); a model that requires a fixed size (timm's ``fixed_input_size``) gets it, as an
    int when square, else ``(height, width)``. ``None`` when it runs at none of them."""
    fixed = _fixed_size(model)
    candidates: list[Any] = [fixed[0] if fixed[0] == fixed[1] else fixed] if fixed else list(sizes)
    for size in candidates:
        h, w = (size, size) if isinstance(size, int) else size
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model(torch.zeros(1, 3, h, w))
            return size
        except Exception:  # noqa: BLE001 - too small for this model: try the next size
            continue
    return None


def is_reparameterisable(source: str, family: str, name: str) -> bool:
    """Whether the model belongs to one of the :data:`REPARAMETERISABLE` timm families."""
    return source == "timm" and any(family == f and (not prefixes or name.startswith(prefixes))
                                    for f, prefixes in REPARAMETERISABLE)
