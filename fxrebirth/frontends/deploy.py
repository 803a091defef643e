"""Models handed to a deployment runtime: what a runtime needs rewritten first (:func:`lower_for`) and the
one verified export, ``fxrebirth export`` (:func:`export_model`).

A runtime may lack a kernel the model needs. ExecuTorch has none for ``avg_pool3d``, through which
PyTorch computes local response normalisation, so for ExecuTorch every LRN is first rewritten exactly
into a 2-D average pooling (:class:`fxrebirth.passes.lrn.LrnAsAvgPool2d`, verified like every exact
rewrite). OpenVINO refuses a ceil-mode max pooling whose window is wider than its padded input (the
Caffe GoogLeNet's at 32x32), so for OpenVINO those are written in floor mode after a -inf pad
(:class:`fxrebirth.passes.pooling.PadCeilMaxPool`, exact at the example's size and guarded to it).
Other runtimes take the model as it is. Each runtime's record (:mod:`fxrebirth.measure.runtimes`)
names its lowering: :data:`LRN_AS_AVG_POOL`, :data:`CEIL_POOL_PADDED`, or none.

An export is written only after its file, run by its own runtime, matched the model it came from: the
norm-wise relative error of the outputs on a random batch at most the float32 whole-model tolerance
(:data:`fxrebirth.equivalence.TOLERANCES`). The targets are the runtimes tagged ``export``; each record
names how its files are written and run back (ONNX and OpenVINO files take any batch size and are checked
at batch :data:`fxrebirth.equivalence.MIN_BATCH`; an ExecuTorch program has the example's shapes and is
checked at them).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fxrebirth.equivalence import relative_error, tolerance
from fxrebirth.errors import EquivalenceError, FxRebirthError, first_line
from fxrebirth.measure.runtimes import available, for_target, get_runtime, resolve

__all__ = ["Lowering", "LRN_AS_AVG_POOL", "CEIL_POOL_PADDED", "lower_for", "needs_lowering", "export_model",
           "Exported"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lowering:
    """An exact rewrite a runtime needs first: ``needed(model)`` says whether the model may hold what it
    rewrites, ``rules()`` are the rules (the one named ``rule`` does the work), ``what`` ends the note."""

    needed: Callable[[nn.Module], bool]
    rules: Callable[[], list]
    rule: str
    what: str

    def __call__(self, model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, str]:
        """``model`` with the rule applied (verified as the exact tier's rewrites are) and a note, or
        ``model`` and "" when nothing was rewritten."""
        if not self.needed(model):
            return model, ""
        from fxrebirth.frontends.library import optimize

        lowered, report = optimize(model, x, rules=self.rules())
        count = report.rules[self.rule].rewrites if self.rule in report.rules else 0
        return (lowered, f"{count} {self.what}") if count else (model, "")


def _has_lrn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.LocalResponseNorm) for m in model.modules()) or _calls(model, "local_response_norm")


def _has_ceil_pool(model: nn.Module) -> bool:
    """Whether the model has a ceil-mode max pooling (whether its window fits is known only at a size)."""
    return any(isinstance(m, nn.MaxPool2d) and m.ceil_mode for m in model.modules()) or \
        _calls(model, "max_pool2d", ceil_mode=True)


def _lrn_rules() -> list:
    from fxrebirth.passes import lrn

    return lrn.rules()


def _wide_pool_rules() -> list:
    from fxrebirth.passes import pooling

    return pooling.lowering_rules(wider_only=True)


LRN_AS_AVG_POOL = Lowering(_has_lrn, _lrn_rules, "lrn_as_avg_pool2d", "LRN rewritten exactly as avg_pool2d")
"""For a runtime without ``avg_pool3d`` (ExecuTorch): every LRN as a 2-D average pooling."""
CEIL_POOL_PADDED = Lowering(_has_ceil_pool, _wide_pool_rules, "pad_ceil_max_pool",
                            "ceil-mode max pooling(s) wider than their input padded with -inf (exact at this size)")
"""For a runtime that refuses a ceil-mode window wider than its padded input (OpenVINO)."""


def needs_lowering(model: nn.Module, runtime: str) -> bool:
    """Whether ``model`` may hold an operation ``runtime`` cannot run (its record's lowering says)."""
    lowering = get_runtime(runtime).lowering
    return lowering is not None and getattr(resolve(lowering), "needed", lambda m: True)(model)


def _calls(model: nn.Module, name: str, **kwargs: object) -> bool:
    graph = getattr(model, "graph", None)
    return graph is not None and any(getattr(n.target, "__name__", "") == name and
                                     all(n.kwargs.get(k) == v for k, v in kwargs.items()) for n in graph.nodes)


def lower_for(model: nn.Module, runtime: str, x: torch.Tensor) -> tuple[nn.Module, str]:
    """``model`` as ``runtime`` can run it, and a note saying what was rewritten ("" for nothing): the
    lowering its record names. The lowering is an exact rewrite, verified (and the whole model compared)
    as the exact tier's are."""
    return get_runtime(runtime).lower(model, x)


@dataclass
class Exported:
    """What :func:`export_model` wrote: the file(s), the error measured against the model, the batch."""

    path: str
    files: list[str]
    error: float
    checked_batch: int
    note: str = ""


def export_model(model: nn.Module, x: torch.Tensor, to: str, path: str) -> Exported:
    """Write ``model`` (at ``x``'s shape) for export target ``to`` (:func:`fxrebirth.measure.runtimes.target_names`:
    ONNX, an OpenVINO IR ``.xml`` with its ``.bin``, an ExecuTorch ``.pte``) to ``path``, after checking the
    written file, run by its runtime, against ``model``; raise :class:`~fxrebirth.errors.EquivalenceError`
    (and write nothing) when it differs."""
    runtime = for_target(to)
    reason = available(runtime.name)
    if reason:
        raise FxRebirthError(f"cannot export to {to}: {reason}")
    model = copy.deepcopy(model).eval() if model.training else model  # the user's module keeps its mode
    with tempfile.TemporaryDirectory(prefix="fxrebirth-export-") as folder:
        lowered, note = runtime.lower(model, x)
        files, probe = resolve(runtime.save)(lowered, x, folder)
        with torch.no_grad():
            error = relative_error(model(probe), resolve(runtime.load)(files, probe))
        if error > tolerance(torch.float32):
            raise EquivalenceError(f"the {to} export of the model differs from it by {error:.2e} (norm-wise, "
                                   f"tolerance {tolerance(torch.float32):.0e}); nothing was written")
        written = _move(files, path)
    log.info("exported to %s: %s (error %.2e at batch %d)", to, written[0], error, probe.shape[0])
    return Exported(path=written[0], files=written, error=error, checked_batch=probe.shape[0], note=note)


def _move(files: list[str], path: str) -> list[str]:
    """Move the checked files to ``path`` (the first file's name; companions keep its stem)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FxRebirthError(f"--save {path}: the folder {folder} does not exist")
    stem, _ = os.path.splitext(path)
    targets = [path] + [stem + os.path.splitext(f)[1] for f in files[1:]]
    try:
        for source, target in zip(files, targets):
            shutil.move(source, target)
    except OSError as exc:
        raise FxRebirthError(f"--save {path}: cannot write it ({first_line(exc, 200)})") from None
    return targets
