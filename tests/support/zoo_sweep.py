"""The zoo's sweep of the models :mod:`tests.support.zoo` builds: :func:`sweep_one`, its
per-entry-point runners (``fxrebirth.optimize``, the ``torch.compile`` backend, ``torch.export``) and the
verdicts on their outputs (float32 and float64 errors, "rounding").
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Any, Sequence

import torch
from torch import nn

from fxrebirth.equivalence import MIN_BATCH, WEIGHT_ROUNDING, relative_error, tolerance
from fxrebirth.errors import CaptureError, first_line
from fxrebirth.frontends.library import optimize as _optimize
from fxrebirth.graph.capture import capture as _capture
from fxrebirth.rewrite.cost import ReplayedCost, RooflineCost
from fxrebirth.rewrite.endtoend import weight_rounding
from tests.support.zoo_checks import count_ops, foldable_batchnorms
from tests.support.zoo import SIZES, build_sized, family_of, is_reparameterisable

__all__ = ["ENTRY_POINTS", "sweep_one"]

ENTRY_POINTS = ("optimize", "backend", "export")


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
    row = _new_row(source, name, statistics)
    try:
        model, size, row["batchnorm_statistics"] = build_sized(source, name, seed, size, statistics)
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
    references = _references(model, size, seed, row, start)
    if references is None:
        return row
    x, reference, reference64 = references
    bound = tolerance(torch.float32)
    for point in entry_points:
        row[point] = _run_point(point, model, x, reference, bound, row, reference64)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _new_row(source: str, name: str, statistics: str) -> dict[str, Any]:
    """The row's first keys: what the model is, before it is built."""
    row: dict[str, Any] = {"source": source, "name": name}
    try:
        row["family"] = family_of(source, name)
    except Exception:  # noqa: BLE001 - an unregistered name: the build below says why
        row["family"] = "?"
    row["reparameterisable"] = is_reparameterisable(source, row["family"], name)
    row["statistics"] = statistics
    return row


def _references(model: nn.Module, size: int | tuple[int, int], seed: int, row: dict[str, Any],
                start: float) -> tuple[torch.Tensor, Any, Any] | None:
    """(the input at batch :data:`~fxrebirth.equivalence.MIN_BATCH`, the original's output on it, its float64
    copy's output or None); the row's ``noise32``. None (the reason in the row) when the original fails."""
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(MIN_BATCH, 3, h, w, generator=torch.Generator().manual_seed(seed + 2))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = model(x)
    except Exception as exc:  # noqa: BLE001
        row.update(reason=f"original model at batch {MIN_BATCH}: {type(exc).__name__}: {first_line(exc)}",
                   seconds=time.perf_counter() - start)
        return None
    reference64 = _in_float64(model, x)
    if reference64 is not None:
        row["noise32"] = _finite(relative_error(reference64, reference))
    return x, reference, reference64


def _run_point(point: str, model: nn.Module, x: torch.Tensor, reference: Any, bound: float,
               row: dict[str, Any], reference64: Any) -> dict[str, Any]:
    """The entry ``point``'s dict of the row (see :func:`sweep_one`)."""
    began = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            entry = _run(point, model, x, reference, bound, row)
            if entry.get("status") == "mismatch" and reference64 is not None:
                entry["error64"] = _error64(point, model, x, reference64, entry)
    except Exception as exc:  # noqa: BLE001 - a bug of the harness itself must not stop the sweep
        entry = {"status": "error", "reason": f"harness: {type(exc).__name__}: {first_line(exc)}"}
    entry.pop("_module", None)
    entry.pop("_report", None)
    entry["seconds"] = round(time.perf_counter() - began, 2)
    if entry.get("status") == "mismatch":
        _explain(point, entry, row, bound)
    return entry


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


def _explain(point: str, entry: dict[str, Any], row: dict[str, Any], bound: float) -> None:
    """A float32 mismatch becomes ``"rounding"`` when the entry point run again on float64 copies of the model
    and input (``error64``: no weight rounded) is within ``bound`` of the float64 original, and, for optimize
    and export, the float32 result is the float64 one's program with its weights rounded
    (``weights64``: :func:`~fxrebirth.rewrite.endtoend.weight_rounding` within
    :data:`~fxrebirth.equivalence.WEIGHT_ROUNDING`); the backend's graphs cannot be compared, and its float64
    run proves its rewrites. Without a float64 run that repeats the rewrites it is ``"unproven"``;
    otherwise it stays a mismatch. ``noise32`` (the original's own float32 rounding) is quoted beside."""
    error64, noise, gap = entry.get("error64"), row.get("noise32"), entry.get("weights64")
    if isinstance(noise, float):
        entry["reason"] += f" (the original's own float32 rounding: {noise:.2e})"
    if not isinstance(error64, float):  # the float64 run failed or rewrote less (its own 1e-10 check refused)
        entry["status"] = "unproven"
        entry["reason"] += "; the float64 run could not repeat the rewrites, so rounding is not told from a wrong rewrite"
        return
    entry["reason"] += f"; run in float64: {error64:.2e}"
    if point != "backend":
        entry["reason"] += ("; not the float64 run's program" if gap is None else
                            f"; weights {gap:.2g} units of rounding from the float64 run's")
    weights_rounded = point == "backend" or (isinstance(gap, float) and gap <= WEIGHT_ROUNDING)
    if error64 <= bound and weights_rounded:
        entry["status"] = "rounding"


def _run(point: str, model: nn.Module, x: torch.Tensor, reference: Any, bound: float, row: dict[str, Any],
         check: bool = True, decided: Any = None) -> dict:
    """One entry point on ``model``: its entry of the row (``row`` collects model-wide extras; the entry's
    ``_module`` and ``_report``, kept for :func:`_error64`, are dropped before it is stored).
    ``check=False``: the entry point skips its own whole-model check (the caller measures). ``decided``:
    a report whose cost-gate verdicts optimize and export replay (the float32 run's, for the float64 one)."""
    gate = {} if decided is None else {"cost_model": ReplayedCost.of(decided, RooflineCost())}
    if point == "optimize":
        return _run_optimize(model, x, reference, bound, row, check, gate)
    if point == "backend":
        return _run_backend(model, x, reference, bound, check)
    return _run_export(model, x, reference, bound, check, gate)


def _error64(point: str, model: nn.Module, x: torch.Tensor, reference64: Any, entry32: dict[str, Any]) -> float | str | None:
    """The entry point's error with float64 copies of ``model`` and ``x`` against the float64 original,
    its own whole-model check off (float64's 1e-10 bound is below what an ill-conditioned model's exact
    folds measure): tells a wrong rewrite from float32 rounding. None when that run fails or rewrote less
    than the float32 run (fewer rewrites, or fewer backend graphs folded), so that it proves nothing."""
    try:
        with torch.no_grad():
            model64 = copy.deepcopy(model).double()
        entry = _run(point, model64, x.double(), reference64, tolerance(torch.float32), {"source": "", "name": ""},
                     check=False, decided=entry32.get("_report"))
    except Exception:  # noqa: BLE001 - float32-only code: the float32 verdict stands
        return None
    for key in ("rewrites", "folded_graphs"):
        if entry.get(key) != entry32.get(key):
            return None
    if "_module" in entry32 and "_module" in entry:
        entry32["weights64"] = weight_rounding(entry32["_module"], entry["_module"])
    return entry.get("error")


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


def _run_optimize(model: nn.Module, x: torch.Tensor, reference: Any, bound: float, row: dict[str, Any],
                  check: bool = True, gate: dict[str, Any] | None = None) -> dict:
    entry: dict[str, Any] = {}
    try:
        before = count_ops(_capture(model, (x,)))
    except Exception as exc:  # noqa: BLE001 - recorded per entry point
        return _outcome(exc)
    entry["convs_before"], entry["bns_before"] = before["conv"], before["batch_norm"]
    try:
        gm, report = _optimize(model, x, check_output=check, **(gate or {}))
    except Exception as exc:  # noqa: BLE001
        entry.update(_outcome(exc))
        return entry
    after = count_ops(gm)
    entry["convs_after"], entry["bns_after"] = after["conv"], after["batch_norm"]
    entry["foldable_left"] = len(foldable_batchnorms(gm))
    data = report.to_dict()
    entry["rewrites"] = report.rewrites
    entry["rules"] = _rules_summary(data)
    entry["library_error"] = data.get("output_error")
    with torch.no_grad():
        output = gm(x)
    _judge(entry, reference, output, bound)
    entry["_module"], entry["_report"] = gm, report  # for _error64; not kept in the row
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


def _run_backend(model: nn.Module, x: torch.Tensor, reference: Any, bound: float, check: bool = True) -> dict:
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
        compiled = torch.compile(model, backend="fxrebirth", options={"compiler": "eager", "check_output": check})
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
    return entry


def _run_export(model: nn.Module, x: torch.Tensor, reference: Any, bound: float, check: bool = True,
                gate: dict[str, Any] | None = None) -> dict:
    from fxrebirth.frontends.export import optimize_exported

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, (x,))
    except Exception as exc:  # noqa: BLE001
        return _outcome(exc, exporting=True)
    entry: dict[str, Any] = {}
    try:
        optimized, report = optimize_exported(program, check_output=check, **(gate or {}))
        with torch.no_grad():
            output = optimized.module()(x)
    except Exception as exc:  # noqa: BLE001
        entry.update(_outcome(exc))
        return entry
    entry["rewrites"] = report.rewrites
    _judge(entry, reference, output, bound)
    entry["_module"], entry["_report"] = optimized.module(), report
    try:  # counted on the canonical form of the re-exported program, as for ``optimize``
        canonical = _capture(optimized.module(), (x,))
        after = count_ops(canonical)
        entry["convs_after"], entry["bns_after"] = after["conv"], after["batch_norm"]
        entry["foldable_left"] = len(foldable_batchnorms(canonical))
    except Exception as exc:  # noqa: BLE001 - the counts are extra information, not the outcome
        entry["count_error"] = f"{type(exc).__name__}: {first_line(exc)}"
    return entry
