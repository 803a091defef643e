"""Models handed to a deployment runtime: what a runtime needs rewritten first (:func:`lower_for`) and the
one verified export, ``fxrebirth export`` (:func:`export_model`).

A runtime may lack a kernel the model needs. ExecuTorch has none for ``avg_pool3d``, through which
PyTorch computes local response normalisation, so for ExecuTorch every LRN is first rewritten exactly
into a 2-D average pooling (:class:`fxrebirth.passes.lrn.LrnAsAvgPool2d`, verified like every exact
rewrite). OpenVINO refuses a ceil-mode max pooling whose window is wider than its padded input (the
Caffe GoogLeNet's at 32x32), so for OpenVINO those are written in floor mode after a -inf pad
(:class:`fxrebirth.passes.pooling.PadCeilMaxPool`, exact at the example's size and guarded to it).
Other runtimes take the model as it is.

An export is written only after its file, run by its own runtime, matched the model it came from: the
norm-wise relative error of the outputs on a random batch at most the float32 whole-model tolerance
(:data:`fxrebirth.equivalence.TOLERANCES`). ONNX and OpenVINO files take any batch size and are checked
at batch :data:`fxrebirth.equivalence.MIN_BATCH`; an ExecuTorch program has the example's shapes and is
checked at them.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from fxrebirth.equivalence import MIN_BATCH, relative_error, tolerance
from fxrebirth.errors import EquivalenceError, FxRebirthError, first_line

__all__ = ["TARGETS", "lower_for", "needs_lowering", "export_model", "Exported"]

log = logging.getLogger(__name__)

TARGETS = ("onnx", "openvino", "executorch")


def needs_lowering(model: nn.Module, runtime: str) -> bool:
    """Whether ``model`` may hold an operation ``runtime`` cannot run: LRN for ExecuTorch, a ceil-mode max
    pooling for OpenVINO (whether its window fits is known only at a size: :func:`lower_for` looks)."""
    if runtime == "executorch":
        return any(isinstance(m, nn.LocalResponseNorm) for m in model.modules()) or _calls(model, "local_response_norm")
    if runtime.startswith("openvino"):
        return any(isinstance(m, nn.MaxPool2d) and m.ceil_mode for m in model.modules()) or \
            _calls(model, "max_pool2d", ceil_mode=True)
    return False


def _calls(model: nn.Module, name: str, **kwargs: object) -> bool:
    graph = getattr(model, "graph", None)
    return graph is not None and any(getattr(n.target, "__name__", "") == name and
                                     all(n.kwargs.get(k) == v for k, v in kwargs.items()) for n in graph.nodes)


def lower_for(model: nn.Module, runtime: str, x: torch.Tensor) -> tuple[nn.Module, str]:
    """``model`` as ``runtime`` can run it, and a note saying what was rewritten ("" for nothing). The
    lowering is an exact rewrite, verified (and the whole model compared) as the exact tier's are."""
    if not needs_lowering(model, runtime):
        return model, ""
    from fxrebirth.frontends.library import optimize
    from fxrebirth.passes import lrn, pooling

    if runtime == "executorch":
        rules, name, what = lrn.rules(), "lrn_as_avg_pool2d", "LRN rewritten exactly as avg_pool2d"
    else:
        rules, name = pooling.lowering_rules(wider_only=True), "pad_ceil_max_pool"
        what = "ceil-mode max pooling(s) wider than their input padded with -inf (exact at this size)"
    lowered, report = optimize(model, x, rules=rules)
    count = report.rules[name].rewrites if name in report.rules else 0
    return (lowered, f"{count} {what}") if count else (model, "")


@dataclass
class Exported:
    """What :func:`export_model` wrote: the file(s), the error measured against the model, the batch."""

    path: str
    files: list[str]
    error: float
    checked_batch: int
    note: str = ""


def export_model(model: nn.Module, x: torch.Tensor, to: str, path: str) -> Exported:
    """Write ``model`` (at ``x``'s shape) for runtime ``to`` (``onnx``, ``openvino``: an IR ``.xml`` with
    its ``.bin``; ``executorch``: a ``.pte``) to ``path``, after checking the written file against
    ``model``; raise :class:`~fxrebirth.errors.EquivalenceError` (and write nothing) when it differs."""
    if to not in TARGETS:
        raise FxRebirthError(f"unknown export target {to!r}; use one of {', '.join(TARGETS)}")
    from fxrebirth.measure.deploy import unavailable

    reason = unavailable({"onnx": "onnxruntime"}.get(to, to))
    if reason:
        raise FxRebirthError(f"cannot export to {to}: {reason}")
    model = copy.deepcopy(model).eval() if model.training else model  # the user's module keeps its mode
    with tempfile.TemporaryDirectory(prefix="fxrebirth-export-") as folder:
        lowered, note = lower_for(model, to, x)
        if to == "executorch":
            files, probe = _executorch(lowered, x, folder)
        else:
            files, probe = _onnx_or_openvino(lowered, x, folder, to)
        with torch.no_grad():
            error = relative_error(model(probe), _run(to, files, probe))
        if error > tolerance(torch.float32):
            raise EquivalenceError(f"the {to} export of the model differs from it by {error:.2e} (norm-wise, "
                                   f"tolerance {tolerance(torch.float32):.0e}); nothing was written")
        written = _move(files, path)
    log.info("exported to %s: %s (error %.2e at batch %d)", to, written[0], error, probe.shape[0])
    return Exported(path=written[0], files=written, error=error, checked_batch=probe.shape[0], note=note)


def _onnx_or_openvino(model: nn.Module, x: torch.Tensor, folder: str, to: str) -> tuple[list[str], torch.Tensor]:
    from fxrebirth.measure.runners import export_onnx

    onnx_path = export_onnx(model, x, os.path.join(folder, "model.onnx"), dynamic_batch=True)
    probe = torch.randn(max(MIN_BATCH, x.shape[0]), *x.shape[1:])
    if to == "onnx":
        return [onnx_path], probe
    import openvino as ov

    xml = os.path.join(folder, "model.xml")
    ov.save_model(ov.Core().read_model(onnx_path), xml, compress_to_fp16=False)
    return [xml, xml[:-4] + ".bin"], probe


def _executorch(model: nn.Module, x: torch.Tensor, folder: str) -> tuple[list[str], torch.Tensor]:
    from fxrebirth.measure.deploy import executorch_program

    path = os.path.join(folder, "model.pte")
    with open(path, "wb") as f:
        f.write(executorch_program(model, x))
    return [path], torch.randn_like(x)


def _run(to: str, files: list[str], x: torch.Tensor) -> torch.Tensor:
    """The written file's output on ``x``, computed by its own runtime."""
    if to == "onnx":
        from fxrebirth.measure.runners import ort_session

        session = ort_session(files[0])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if to == "openvino":
        import openvino as ov

        compiled = ov.Core().compile_model(files[0], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return torch.from_numpy(compiled(x.numpy())[0].copy())
    from fxrebirth.measure.deploy import executorch_method

    with open(files[0], "rb") as f:
        return executorch_method(f.read())(x)


def _move(files: list[str], path: str) -> list[str]:
    """Move the checked files to ``path`` (the first file's name; companions keep its stem)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FxRebirthError(f"--output {path}: the folder {folder} does not exist")
    stem, _ = os.path.splitext(path)
    targets = [path] + [stem + os.path.splitext(f)[1] for f in files[1:]]
    try:
        for source, target in zip(files, targets):
            shutil.move(source, target)
    except OSError as exc:
        raise FxRebirthError(f"--output {path}: cannot write it ({first_line(exc, 200)})") from None
    return targets
