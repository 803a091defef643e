"""Deployment runtimes beyond PyTorch and ONNX Runtime: OpenVINO and ExecuTorch.

Both are optional extras (``pip install 'fxrebirth[openvino]'``, ``'fxrebirth[executorch]'``), imported
only when a row or an export asks for them (:func:`fxrebirth.measure.runtimes.available` gives the
one-line reason a runtime cannot be used here, which the speed table prints in the row instead of
failing). The records of :mod:`fxrebirth.measure.runtimes` name the runners, exporters and the
``fxrebirth export`` writers (``save_*``) and checkers (``load_*``) below.

* **OpenVINO** (CPU plugin) reads the ONNX file the ``onnxruntime`` rows use, so both run the same graph,
  and never goes through OpenVINO's model converter (``ovc``), the part of OpenVINO that sends usage
  telemetry. It is compiled with the latency hint, one stream and the threads torch uses. Its precision is
  explicit: ``f32`` (``INFERENCE_PRECISION_HINT``), or ``bf16``, which OpenVINO otherwise picks by itself on
  a CPU with AVX512-BF16 or AMX: an fp32 row must say f32 to be one. OpenVINO's thread pool has no spinning
  setting to turn off.
* **ExecuTorch** runs a ``.pte`` program: ``torch.export``, lowered with the XNNPACK partitioner (what
  XNNPACK cannot run stays on ExecuTorch's portable kernels), run by the runtime's Python bindings with
  its thread pool reset to the threads torch uses. An operator without a kernel (``avg_pool3d``, through
  which PyTorch computes LRN) fails when the program loads; the runtime's lowering
  (:data:`fxrebirth.frontends.deploy.LRN_AS_AVG_POOL`) rewrites LRN first.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import logging
import warnings
from typing import Callable

import torch
from torch import nn

from fxrebirth.equivalence import MIN_BATCH
from fxrebirth.measure.runners import export_onnx, ort_session

__all__ = ["openvino_bf16_missing", "openvino_compiled", "openvino_runner", "openvino_bf16_runner",
           "OpenVINOModule", "executorch_program", "write_pte", "executorch_file_runner", "ExecutorchMethod",
           "executorch_method", "executorch_runner", "save_onnx", "save_openvino", "save_pte", "load_onnx",
           "load_openvino", "load_pte"]

log = logging.getLogger(__name__)


def openvino_bf16_missing() -> str | None:
    """Why OpenVINO cannot compute bf16 on this CPU, or None when it can."""
    if _openvino_has_bf16():
        return None
    return "this CPU has no bf16 arithmetic for OpenVINO (OPTIMIZATION_CAPABILITIES lacks BF16)"


def _openvino_has_bf16() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_compiled(onnx_path: str, precision: str = "f32", threads: int | None = None):
    """The OpenVINO CPU compilation of the ONNX file ``onnx_path`` at ``precision`` (``f32`` or ``bf16``)."""
    if precision not in ("f32", "bf16"):
        raise ValueError(f"OpenVINO precision {precision!r}: use f32 or bf16")
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": precision,
              "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
    return core.compile_model(core.read_model(onnx_path), "CPU", config)


def openvino_runner(onnx_path: str, x: torch.Tensor, precision: str = "f32") -> Callable[[], object]:
    """One synchronous OpenVINO inference of ``x`` per call (one infer request, reused)."""
    request = openvino_compiled(onnx_path, precision).create_infer_request()
    array = x.numpy()
    return lambda: request.infer({0: array})


def openvino_bf16_runner(onnx_path: str, x: torch.Tensor) -> Callable[[], object]:
    """:func:`openvino_runner` at bf16."""
    return openvino_runner(onnx_path, x, "bf16")


class OpenVINOModule(nn.Module):
    """An ONNX file compiled by OpenVINO's CPU plugin at ``precision``, called like the model it was
    exported from (float32 tensors in and out): what evaluates a runtime's own accuracy, e.g. in bf16.
    Export with a free batch dimension (``export_onnx(..., dynamic_batch=True)``) to call it on batches
    of any size."""

    def __init__(self, onnx_path: str, precision: str = "f32") -> None:
        super().__init__()
        self.precision = precision
        self._compiled = openvino_compiled(onnx_path, precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._compiled(x.detach().float().contiguous().numpy())
        return torch.from_numpy(out[0].copy())


def executorch_program(model: nn.Module, x: torch.Tensor) -> bytes:
    """The ``.pte`` program of ``model`` at ``x``'s shape, lowered to XNNPACK where it can run there."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
        warnings.simplefilter("ignore")
        program = torch.export.export(copy.deepcopy(model).eval() if model.training else model, (x,))
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        return lowered.to_executorch().buffer


def write_pte(model: nn.Module, x: torch.Tensor, path: str, onnx_exporter: str = "torchscript") -> None:
    """Write :func:`executorch_program` to ``path`` (``onnx_exporter`` is not used: no ONNX is involved)."""
    with open(path, "wb") as f:
        f.write(executorch_program(model, x))


def executorch_file_runner(path: str, x: torch.Tensor) -> Callable[[], object]:
    """:func:`executorch_runner` of the ``.pte`` file at ``path``."""
    with open(path, "rb") as f:
        return executorch_runner(f.read(), x)


class ExecutorchMethod:
    """A loaded ``forward`` method, holding the program's bytes and the loaded program: the runtime reads
    both while it runs and keeps no reference of its own (freed, they were read as garbage shapes)."""

    def __init__(self, program: bytes, threads: int | None = None) -> None:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        portable_lib._unsafe_reset_threadpool(threads or torch.get_num_threads())
        self.program = program
        self.loaded = Runtime.get().load_program(program)
        try:
            self.method = self.loaded.load_method("forward")
        except RuntimeError as exc:
            missing = _missing_kernels(program)
            if missing:
                raise RuntimeError(f"ExecuTorch has no kernel for {', '.join(missing)}") from exc
            raise

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.execute([x])[0]


def executorch_method(program: bytes, threads: int | None = None) -> ExecutorchMethod:
    """The ``forward`` method of a ``.pte`` program, loaded by the ExecuTorch runtime with ``threads``
    XNNPACK threads (default: torch's). Raises RuntimeError naming the operators without a kernel."""
    return ExecutorchMethod(program, threads)


def _missing_kernels(program: bytes) -> list[str]:
    """The operators the program calls that this ExecuTorch build has no kernel for."""
    try:
        from executorch.exir._serialize._program import deserialize_pte_binary
        from executorch.extension.pybindings import portable_lib

        registered = set(portable_lib._get_operator_names())
        plan = deserialize_pte_binary(program).program.execution_plan[0]
        used = {f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators}
        return sorted(op for op in used if op not in registered)
    except Exception as exc:  # noqa: BLE001 - only a better message is lost
        log.debug("could not list the program's operators: %s", exc)
        return []


def executorch_runner(program: bytes, x: torch.Tensor) -> Callable[[], object]:
    method = executorch_method(program)
    return lambda: method(x)


def save_onnx(model: nn.Module, x: torch.Tensor, folder: str) -> tuple[list[str], torch.Tensor]:
    """``fxrebirth export --to`` ONNX: ``model.onnx`` in ``folder`` with a free batch dimension, and the
    input it is checked on (batch :data:`~fxrebirth.equivalence.MIN_BATCH` at least)."""
    path = export_onnx(model, x, os.path.join(folder, "model.onnx"), dynamic_batch=True)
    return [path], torch.randn(max(MIN_BATCH, x.shape[0]), *x.shape[1:])


def save_openvino(model: nn.Module, x: torch.Tensor, folder: str) -> tuple[list[str], torch.Tensor]:
    """``fxrebirth export --to`` OpenVINO: the IR (``model.xml`` and ``model.bin``, weights in f32) read from
    :func:`save_onnx`'s file, never through OpenVINO's converter."""
    import openvino as ov

    (onnx_path,), probe = save_onnx(model, x, folder)
    xml = os.path.join(folder, "model.xml")
    ov.save_model(ov.Core().read_model(onnx_path), xml, compress_to_fp16=False)
    return [xml, xml[:-4] + ".bin"], probe


def save_pte(model: nn.Module, x: torch.Tensor, folder: str) -> tuple[list[str], torch.Tensor]:
    """``fxrebirth export --to`` ExecuTorch: ``model.pte`` at ``x``'s shapes, checked at them."""
    path = os.path.join(folder, "model.pte")
    write_pte(model, x, path)
    return [path], torch.randn_like(x)


def load_onnx(files: list[str], x: torch.Tensor) -> torch.Tensor:
    """The output of the ONNX file ``files[0]`` on ``x``, computed by ONNX Runtime."""
    session = ort_session(files[0])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def load_openvino(files: list[str], x: torch.Tensor) -> torch.Tensor:
    """The output of the OpenVINO IR ``files[0]`` on ``x``, computed by OpenVINO's CPU plugin in f32."""
    import openvino as ov

    compiled = ov.Core().compile_model(files[0], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return torch.from_numpy(compiled(x.numpy())[0].copy())


def load_pte(files: list[str], x: torch.Tensor) -> torch.Tensor:
    """The output of the ``.pte`` program ``files[0]`` on ``x``, computed by ExecuTorch."""
    with open(files[0], "rb") as f:
        return executorch_method(f.read())(x)
