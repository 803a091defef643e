"""What the speed table times: the PyTorch runtimes' runners (a function that runs a model once on a fixed
input), the ONNX export and the ONNX Runtime session, and :func:`environment`, the machine and library
versions a measurement was taken with. The records of :mod:`fxrebirth.measure.runtimes` name these.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import itertools
import os
import platform
import warnings
from typing import Any, Callable

import torch
from torch import nn

from fxrebirth.measure.runtimes import get_runtime, runtime_names

__all__ = ["environment", "eager_runner", "fx_fuse_runner", "inductor_runner", "fxrebirth_compile_runner",
           "compiled_runner", "export_onnx", "onnx_mb", "ort_session", "ort_runner"]


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
    """Where a measurement was taken: CPU, thread counts and the version of every registered runtime's
    package (None where it is not installed), keyed by the package's name."""
    env = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "os": platform.platform(terse=True),
           "python": platform.python_version(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
           "onnxruntime_intra_op_threads": torch.get_num_threads()}  # every runtime takes torch's count
    for package in dict.fromkeys(get_runtime(name).package for name in runtime_names()):
        if package is not None:
            env[package] = _version(package)
    return env


def _version(package: str) -> str | None:
    """The installed version of ``package`` (from its metadata, else its ``__version__``), or None."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        if importlib.util.find_spec(package) is None:
            return None
        return getattr(importlib.import_module(package), "__version__", "unknown")


def eager_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)
    return run


def fx_fuse_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Eager, after ``torch.fx.experimental.optimization.fuse`` (folds Conv+BN) of a copy of ``model``."""
    from torch.fx.experimental.optimization import fuse

    return eager_runner(fuse(copy.deepcopy(model)), x)


def inductor_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """``torch.compile`` with Inductor's ``freezing`` config on."""
    return compiled_runner(model, x, freezing=True)


def fxrebirth_compile_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """``torch.compile(backend="fxrebirth")``: the exact tier, then Inductor with freezing."""
    return compiled_runner(model, x, backend="fxrebirth")


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
