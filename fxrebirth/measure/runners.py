"""What the speed table times: a runner per runtime (a function that runs a model once on a fixed input),
the ONNX export and ONNX Runtime session behind the ``onnxruntime`` one, and :func:`environment`, the
machine and library versions a measurement was taken with. :mod:`fxrebirth.measure.speed` builds its
table from these; the runtimes are described in its docstring.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import os
import platform
import warnings
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["RUNTIMES", "ARTIFACT_RUNTIMES", "artifact_runner", "environment", "eager_runner", "compiled_runner", "export_onnx", "onnx_mb", "ort_session",
           "ort_runner", "variant_runner"]

RUNTIMES = ("eager", "fx fuse", "inductor+freezing", "compile(fxrebirth)", "onnxruntime", "openvino", "openvino bf16",
            "compile(openvino)", "executorch")
ARTIFACT_RUNTIMES = ("onnxruntime", "openvino", "openvino bf16", "executorch")
"""Runtimes that run a file written from the model (``.onnx``, ``.pte``) instead of the module itself."""


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Where a measurement was taken: CPU, thread counts and library versions."""
    env = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "os": platform.platform(terse=True),
           "python": platform.python_version(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads()}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
        env["onnxruntime_intra_op_threads"] = torch.get_num_threads()
    except ImportError:
        env["onnxruntime"] = None
    from importlib import metadata

    for package in ("openvino", "executorch"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    return env


def eager_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)
    return run


_FRESH = itertools.count()


def compiled_runner(model: nn.Module, x: torch.Tensor, freezing: bool = False, **kwargs: Any) -> Callable[[], object]:
    """``torch.compile`` of a copy of ``model`` behind a function of its own, compiled by its first call.

    Dynamo keeps compiled code per code object and reuses it for any instance of the same class whose
    guards pass; two compiles of one class under different Inductor settings then shared the first one's
    code. A fresh code object per variant keeps every variant's compilation its own. ``freezing`` patches
    Inductor's global config around that first call: ``options={"freezing": True}`` measured no effect
    here (resnet18: 1.00x eager with it, 0.62x with the patched config).
    """
    import torch._inductor.config as inductor_config

    namespace = {"model": copy.deepcopy(model)}
    source = "def variant(x):\n    return model(x)\n"
    exec(compile(source, f"<fxrebirth variant {next(_FRESH)}>", "exec"), namespace)  # noqa: S102
    compiled = torch.compile(namespace["variant"], dynamic=False, **kwargs)

    def run() -> object:
        with torch.no_grad():
            return compiled(x)

    with inductor_config.patch(freezing=freezing):
        run()
    return run


def export_onnx(model: nn.Module, x: torch.Tensor, path: str, exporter: str = "torchscript",
                dynamic_batch: bool = False) -> str:
    """Export ``model`` to ``path`` with the TorchScript-based (``dynamo=False``, opset 17) or the
    ``dynamo`` exporter (opset 18); ``dynamic_batch`` leaves the batch size of the input and output
    free. The exporters print progress and, on failure, whole graphs: that output is kept out of ours
    (it would corrupt ``--json``) and failures raise with their first line."""
    dynamo = exporter == "dynamo"
    chatter = io.StringIO()
    options: dict[str, Any] = {}
    if dynamic_batch and dynamo:
        options["dynamic_shapes"] = ({0: torch.export.Dim.DYNAMIC},)
    elif dynamic_batch:
        options.update(input_names=["input"], output_names=["output"],
                       dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=dynamo, opset_version=18 if dynamo else 17, **options)
    return path


def onnx_mb(path: str) -> float:
    """Size of an exported model, external weight files (``path.data``, the dynamo exporter's) included."""
    folder, name = os.path.split(path)
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder or ".") if f.startswith(name)) / 2**20


def ort_session(path: str, threads: int | None = None):
    """An ONNX Runtime CPU session with every graph optimisation, ``threads`` intra-op threads (default:
    torch's) and spinning off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_runner(path: str, x: torch.Tensor) -> Callable[[], object]:
    session = ort_session(path)
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def variant_runner(model: nn.Module, runtime: str, x: torch.Tensor) -> Callable[[], object]:
    if runtime == "eager":
        return eager_runner(model, x)
    if runtime == "fx fuse":
        from torch.fx.experimental.optimization import fuse

        return eager_runner(fuse(copy.deepcopy(model)), x)
    if runtime == "inductor+freezing":
        return compiled_runner(model, x, freezing=True)
    if runtime == "compile(fxrebirth)":
        return compiled_runner(model, x, backend="fxrebirth")
    if runtime == "compile(openvino)":
        import openvino.torch  # noqa: F401 - registers the backend

        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": str(torch.get_num_threads())}
        return compiled_runner(model, x, backend="openvino", options={"device": "CPU", "config": config})
    raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")


def artifact_runner(path: str, runtime: str, x: torch.Tensor) -> Callable[[], object]:
    """A runner of the file at ``path`` (``.onnx`` for ONNX Runtime and OpenVINO, ``.pte`` for ExecuTorch)."""
    from fxrebirth.measure import deploy

    if runtime == "onnxruntime":
        return ort_runner(path, x)
    if runtime in deploy.OPENVINO_PRECISION:
        return deploy.openvino_runner(path, x, deploy.OPENVINO_PRECISION[runtime])
    if runtime == "executorch":
        with open(path, "rb") as f:
            return deploy.executorch_runner(f.read(), x)
    raise ValueError(f"{runtime!r} runs no file; file runtimes: {', '.join(ARTIFACT_RUNTIMES)}")
