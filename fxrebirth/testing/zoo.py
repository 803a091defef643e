"""The model zoo: every attention-free image-classification model of torchvision and timm, through
every entry point of fxrebirth.

* :func:`population` defines which models are in the zoo (see its docstring for "attention");
* :func:`build` makes one with random weights and randomised BatchNorm, :func:`smallest_input` finds
  the smallest square size it runs at;
* :func:`sweep_one` runs one model through ``fxrebirth.optimize``, the ``torch.compile`` backend and
  ``torch.export`` + :func:`fxrebirth.frontends.export.optimize_exported`, and returns a JSON-serialisable row;
* :func:`foldable_batchnorms` and :func:`count_ops` are structural checks of a graph, independent of
  the rules' own code.

timm is a development dependency, never a runtime one: it is imported inside the functions that need
it. ``tests/benchmarks/zoo_sweep.py`` runs the whole zoo and writes ``docs/zoo.md``;
``tests/test_zoo.py`` is the CI sample.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from fxrebirth.equivalence import MIN_BATCH, relative_error, tolerance
from fxrebirth.errors import CaptureError, first_line
from fxrebirth.frontends.library import optimize as _optimize
from fxrebirth.graph.capture import capture as _capture
from fxrebirth.graph.ops import kind_of
from fxrebirth.testing import randomize_batchnorm

__all__ = [
    "SOURCES", "SIZES", "ENTRY_POINTS", "REPARAMETERISABLE", "Candidate", "survey", "population",
    "family_of", "build", "smallest_input", "foldable_batchnorms", "count_ops", "attention_in",
    "is_reparameterisable", "sweep_one", "STATISTICS",
]

SOURCES = ("torchvision", "timm")
SIZES = tuple(range(64, 321, 32))
"""Square input sizes :func:`smallest_input` tries, smallest first: 64, 96, ..., 320."""
ENTRY_POINTS = ("optimize", "backend", "export")
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


def _randomize_all_batchnorms(model: nn.Module, generator: torch.Generator) -> None:
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


def _build(source: str, name: str, seed: int, size: Any, statistics: str) -> tuple[nn.Module, Any, str]:
    """(model, input size or None, how its BatchNorm statistics were set: "uniform" or "calibrated")."""
    if statistics not in STATISTICS:
        raise ValueError(f"statistics={statistics!r}: use one of {STATISTICS}")
    torch.manual_seed(seed)
    model = _construct(source, name).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    _randomize_all_batchnorms(model, generator)
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
    small random logits put the float32 rounding of deep ones near 1e-5 (:func:`sweep_one`'s ``noise32``).
    """
    return _build(source, name, seed, size, statistics)[0]


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


def foldable_batchnorms(gm: fx.GraphModule) -> list[str]:
    """Eval-mode BatchNorms with a single-user conv/linear before them, or a lone conv (no padding) or
    linear consumer after them: what an exact fold could still remove."""
    found = []
    for node in gm.graph.nodes:
        if kind_of(node) != "batch_norm" or node.kwargs["training"]:
            continue
        producer = node.kwargs["input"]
        rank = len(node.meta["tensor_meta"].shape)
        if kind_of(producer) in ("conv", "conv_transpose") and len(producer.users) == 1:
            found.append(node.name)
        elif kind_of(producer) == "linear" and len(producer.users) == 1 and rank == 2:
            found.append(node.name)
        users = list(node.users)
        if len(users) == 1 and users[0].kwargs.get("input") is node:
            consumer = users[0]
            if kind_of(consumer) == "linear" and rank == 2:
                found.append(node.name)
            elif kind_of(consumer) == "conv" and all(p == 0 for p in consumer.kwargs["padding"]):
                found.append(node.name)
    return found


_ATEN_CONVS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d",
               "conv_transpose2d", "conv_transpose3d"}
_ATEN_BATCH_NORMS = {"batch_norm", "native_batch_norm", "_native_batch_norm_legit",
                     "_native_batch_norm_legit_no_training", "_batch_norm_with_update", "_batch_norm_no_update"}


def _aten_name(node: fx.Node) -> str | None:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    namespace, _, rest = str(node.target).partition(".")
    return rest.split(".")[0] if namespace == "aten" else None


def count_ops(gm: fx.GraphModule) -> dict[str, int]:
    """Convolutions (transposed included) and BatchNorms in a graph: canonical ``call_function`` nodes,
    ATen operators (a ``torch.export`` program's module) and any remaining ``call_module`` calls of
    ``nn.Conv*`` / BatchNorm modules."""
    counts = {"conv": 0, "batch_norm": 0}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        kind = kind_of(node)
        aten_name = _aten_name(node)
        if kind in ("conv", "conv_transpose") or aten_name in _ATEN_CONVS:
            counts["conv"] += 1
        elif kind == "batch_norm" or aten_name in _ATEN_BATCH_NORMS:
            counts["batch_norm"] += 1
        elif node.op == "call_module":
            module = modules.get(node.target)
            if isinstance(module, nn.modules.conv._ConvNd):
                counts["conv"] += 1
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                counts["batch_norm"] += 1
    return counts


def is_reparameterisable(source: str, family: str, name: str) -> bool:
    """Whether the model belongs to one of the :data:`REPARAMETERISABLE` timm families."""
    return source == "timm" and any(family == f and (not prefixes or name.startswith(prefixes))
                                    for f, prefixes in REPARAMETERISABLE)


def _rules_summary(report_dict: dict[str, Any]) -> dict[str, Any]:
    summary = {}
    for rule, stats in report_dict.get("rules", {}).items():
        refusals = stats.get("refusals", [])
        if not (stats.get("rewrites") or refusals or stats.get("rolled_back")):
            continue
        entry: dict[str, Any] = {"rewrites": stats.get("rewrites", 0), "refusals": len(refusals)}
        if stats.get("rolled_back"):
            entry["rolled_back"] = stats["rolled_back"]
        if refusals:
            entry["first_refusal"] = refusals[0]["reason"][:200]
        summary[rule] = entry
    return summary


def _outcome(exc: BaseException, exporting: bool = False) -> dict[str, Any]:
    """An exception as a status: capture failures (fxrebirth's, or torch.export's) are "not captured"."""
    status = "not captured" if exporting or isinstance(exc, CaptureError) else "error"
    return {"status": status, "reason": f"{'torch.export: ' if exporting else ''}{type(exc).__name__}: {first_line(exc)}"}


def _judge(entry: dict[str, Any], reference: Any, output: Any, bound: float) -> None:
    error = relative_error(reference, output)
    entry["error"] = _finite(error)
    if not error <= bound:
        entry["status"] = "mismatch"
        entry["reason"] = f"float32 relative error {error:.3e} > {bound:.0e}"
    else:
        entry.setdefault("status", "ok")


def _explain(entry: dict[str, Any], row: dict[str, Any], bound: float) -> None:
    """A float32 mismatch whose float64 error is within ``bound`` becomes ``"rounding"``: the rewrites are
    equivalent and only float32 evaluation order differs (the original's own rounding, ``noise32``, is in
    the reason); without a float64 verdict it stays a mismatch."""
    error64 = entry.get("error64")
    noise = row.get("noise32")
    if isinstance(noise, float):
        entry["reason"] += f" (the original's own float32 rounding: {noise:.2e})"
    if isinstance(error64, float) and error64 <= bound:
        entry["status"] = "rounding"
        entry["reason"] += f"; in float64 {error64:.2e} <= {bound:.0e}"
    elif isinstance(error64, float):
        entry["reason"] += f"; in float64 {error64:.2e}"


def _finite(error: float) -> float | str:
    return error if error != float("inf") else "inf"


def _in_float64(module: nn.Module, x: torch.Tensor) -> Any:
    """The output of a float64 copy of ``module`` on ``x`` in float64, or None where it cannot be cast."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return copy.deepcopy(module).double()(x.double())
    except Exception:  # noqa: BLE001 - float32-only code (a dtype written into the model)
        return None


def _judge64(entry: dict[str, Any], optimized: nn.Module, x: torch.Tensor, reference64: Any) -> None:
    """``error64``: the optimised model against the original, both cast to float64 (the whole-model
    check of :func:`fxrebirth.optimize`): what is left is the folded weights' rounding to float32."""
    if reference64 is None:
        return
    output64 = _in_float64(optimized, x)
    if output64 is not None:
        entry["error64"] = _finite(relative_error(reference64, output64))


def _run_optimize(model: nn.Module, x: torch.Tensor, reference: Any, bound: float, row: dict[str, Any],
                  reference64: Any) -> dict:
    entry: dict[str, Any] = {}
    try:
        before = count_ops(_capture(model, (x,)))
    except Exception as exc:  # noqa: BLE001 - recorded per entry point
        return _outcome(exc)
    entry["convs_before"], entry["bns_before"] = before["conv"], before["batch_norm"]
    try:
        gm, report = _optimize(model, x)
    except Exception as exc:  # noqa: BLE001
        entry.update(_outcome(exc))
        return entry
    after = count_ops(gm)
    entry["convs_after"], entry["bns_after"] = after["conv"], after["batch_norm"]
    entry["foldable_left"] = len(foldable_batchnorms(gm))
    data = report.to_dict()
    entry["rules"] = _rules_summary(data)
    entry["library_error"] = data.get("output_error")
    with torch.no_grad():
        output = gm(x)
    _judge(entry, reference, output, bound)
    _judge64(entry, gm, x, reference64)
    if row["source"] == "timm":
        entry["convs_timm_reparam"] = _timm_reparam_convs(model, x)
    return entry


def _timm_reparam_convs(model: nn.Module, x: torch.Tensor) -> int | str:
    from timm.utils.model import reparameterize_model

    try:
        fused = reparameterize_model(copy.deepcopy(model)).eval()
        return count_ops(_capture(fused, (x,)))["conv"]
    except Exception as exc:  # noqa: BLE001 - timm's own fusion failing is data, not a sweep failure
        return f"{type(exc).__name__}: {first_line(exc)}"


class _BackendLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.folded = 0
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "rewrites in a graph of" in message:
            self.folded += 1
        elif record.levelno >= logging.INFO and "optimising again" not in message:
            self.reasons.append(message.removeprefix("fxrebirth backend: "))


def _run_backend(model: nn.Module, x: torch.Tensor, reference: Any, bound: float, reference64: Any) -> dict:
    import torch._dynamo
    from torch._dynamo.utils import counters

    import fxrebirth.frontends.backend as backend

    logger = logging.getLogger(backend.__name__)
    handler, level = _BackendLog(), logger.level
    said = getattr(backend, "_said", None)
    if isinstance(said, set):
        said.clear()  # the backend logs each reason once per process; this sweep wants it per model
    torch._dynamo.reset()
    counters.clear()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    entry: dict[str, Any] = {}
    try:
        compiled = torch.compile(model, backend="fxrebirth", options={"compiler": "eager"})
        with torch.no_grad():
            output = compiled(x)
    except Exception as exc:  # noqa: BLE001
        entry.update(_outcome(exc))
        return entry
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        entry["graphs"] = int(counters["stats"].get("unique_graphs", 0))
        entry["graph_breaks"] = int(sum(counters["graph_break"].values()))
        torch._dynamo.reset()
    entry["folded_graphs"] = handler.folded
    if handler.folded == 0:
        entry["status"] = "not captured"
        entry["reason"] = handler.reasons[0][:300] if handler.reasons else "no graph was optimised"
    elif handler.reasons:  # some graphs folded, others compiled unchanged: why, for the record
        entry["unfolded_reasons"] = [r[:300] for r in handler.reasons[:3]]
    _judge(entry, reference, output, bound)
    if entry["status"] == "mismatch" and reference64 is not None:  # is it the rewrites or float32?
        _backend64(entry, model, x, reference64)
    return entry


def _backend64(entry: dict[str, Any], model: nn.Module, x: torch.Tensor, reference64: Any) -> None:
    """``error64`` for the backend: a float64 copy of ``model`` compiled and run in float64."""
    import torch._dynamo

    torch._dynamo.reset()
    try:
        compiled = torch.compile(copy.deepcopy(model).double(), backend="fxrebirth", options={"compiler": "eager"})
        with torch.no_grad():
            entry["error64"] = _finite(relative_error(reference64, compiled(x.double())))
    except Exception:  # noqa: BLE001 - float32-only code: the float32 verdict stands
        pass
    finally:
        torch._dynamo.reset()


def _run_export(model: nn.Module, x: torch.Tensor, reference: Any, bound: float, reference64: Any) -> dict:
    from fxrebirth.frontends.export import optimize_exported

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (x,))
    except Exception as exc:  # noqa: BLE001
        return _outcome(exc, exporting=True)
    entry: dict[str, Any] = {}
    try:
        optimized, report = optimize_exported(program)
        with torch.no_grad():
            output = optimized.module()(x)
    except Exception as exc:  # noqa: BLE001
        entry.update(_outcome(exc))
        return entry
    entry["rewrites"] = report.rewrites
    _judge(entry, reference, output, bound)
    _judge64(entry, optimized.module(), x, reference64)
    try:  # counted on the canonical form of the re-exported program, as for ``optimize``
        canonical = _capture(optimized.module(), (x,))
        after = count_ops(canonical)
        entry["convs_after"], entry["bns_after"] = after["conv"], after["batch_norm"]
        entry["foldable_left"] = len(foldable_batchnorms(canonical))
    except Exception as exc:  # noqa: BLE001 - the counts are extra information, not the outcome
        entry["count_error"] = f"{type(exc).__name__}: {first_line(exc)}"
    return entry


def sweep_one(source: str, name: str, entry_points: Sequence[str] = ENTRY_POINTS,
              size: int | tuple[int, int] | None = None, seed: int = 0,
              statistics: str = "uniform") -> dict[str, Any]:
    """One model through each entry point; a JSON-serialisable row.

    Keys: ``source``, ``name``, ``family``, ``params``, ``built`` (and ``reason`` when not), ``size``
    (the input size: ``size`` or :func:`smallest_input`), ``reparameterisable``, ``seconds``, and one
    dict per entry point with ``status`` ("ok", "not captured", "mismatch", "error"), ``reason`` (the
    first line of the exception, or the measured error for a mismatch), ``error`` (float32 norm-wise
    relative error against the original model at batch 2 on the same input; a mismatch is one above
    ``tolerance(torch.float32)``), ``seconds``; for ``optimize`` also convolutions and BatchNorms
    before and after, ``foldable_left`` (:func:`foldable_batchnorms`), per-rule rewrites and refusals
    (counts and the first refusal's reason), and for timm models ``convs_timm_reparam`` (the
    convolutions after ``timm.utils.model.reparameterize_model``). For optimize and export, ``error64``
    is the same comparison with both models cast to float64; the row's ``noise32`` is the original's own
    float32 rounding (its float32 output against its float64 copy's): a float32 error near it is rounding,
    not a wrong rewrite. ``statistics`` goes to :func:`build`; ``batchnorm_statistics`` says how it set
    them. Exceptions are caught per entry point.
    """
    unknown = set(entry_points) - set(ENTRY_POINTS)
    if unknown:
        raise ValueError(f"unknown entry point(s) {sorted(unknown)}; use {ENTRY_POINTS}")
    start = time.perf_counter()
    row: dict[str, Any] = {"source": source, "name": name}
    try:
        row["family"] = family_of(source, name)
    except Exception:  # noqa: BLE001 - an unregistered name: the build below says why
        row["family"] = "?"
    row["reparameterisable"] = is_reparameterisable(source, row["family"], name)
    row["statistics"] = statistics
    try:
        model, size, row["batchnorm_statistics"] = _build(source, name, seed, size, statistics)
    except Exception as exc:  # noqa: BLE001
        row.update(built=False, reason=f"{type(exc).__name__}: {first_line(exc)}",
                   seconds=time.perf_counter() - start)
        return row
    row["built"] = True
    row["params"] = sum(p.numel() for p in model.parameters())
    if size is None:
        row.update(size=None, reason=f"runs at none of the sizes {SIZES[0]}..{SIZES[-1]}",
                   seconds=time.perf_counter() - start)
        return row
    row["size"] = size if isinstance(size, int) else list(size)
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(MIN_BATCH, 3, h, w, generator=torch.Generator().manual_seed(seed + 2))
    bound = tolerance(torch.float32)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = model(x)
    except Exception as exc:  # noqa: BLE001
        row.update(reason=f"original model at batch {MIN_BATCH}: {type(exc).__name__}: {first_line(exc)}",
                   seconds=time.perf_counter() - start)
        return row
    reference64 = _in_float64(model, x)
    if reference64 is not None:
        row["noise32"] = _finite(relative_error(reference64, reference))
    for point in entry_points:
        began = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if point == "optimize":
                    entry = _run_optimize(model, x, reference, bound, row, reference64)
                elif point == "backend":
                    entry = _run_backend(model, x, reference, bound, reference64)
                else:
                    entry = _run_export(model, x, reference, bound, reference64)
        except Exception as exc:  # noqa: BLE001 - a bug of the harness itself must not stop the sweep
            entry = {"status": "error", "reason": f"harness: {type(exc).__name__}: {first_line(exc)}"}
        entry["seconds"] = round(time.perf_counter() - began, 2)
        if entry.get("status") == "mismatch":
            _explain(entry, row, bound)
        row[point] = entry
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row
