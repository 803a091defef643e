"""torch.export entry point: optimise an ``ExportedProgram`` and get an ``ExportedProgram`` back.

Both forms of a program are accepted: as exported (``aten.conv2d``, ``aten.batch_norm``...) and after
``run_decompositions()`` (``aten.convolution``, ``_native_batch_norm_legit_no_training`` + ``getitem``,
``addmm`` on a transposed weight...). The program's module is lowered to the canonical form
(:mod:`fxrebirth.aten`), the exact pipeline runs, and the result is exported again, so it saves and
loads with ``torch.export.save/load`` and feeds ExecuTorch or the ONNX exporter like any program.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .api import optimize
from .errors import CaptureError
from .report import Report

__all__ = ["optimize_exported"]


def optimize_exported(
    program: torch.export.ExportedProgram, example_inputs: Any = None, **kwargs: Any
) -> tuple[torch.export.ExportedProgram, Report]:
    """Apply the exact tier to ``program``; return the re-exported program and the report.

    ``example_inputs`` defaults to the program's own (``program.example_inputs``); keyword inputs are
    not supported. Other keyword arguments go to :func:`fxrebirth.optimize`.
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise CaptureError(f"expected a torch.export.ExportedProgram, got {type(program).__name__}")
    if example_inputs is None:
        stored = getattr(program, "example_inputs", None)
        if stored is None:
            raise CaptureError("the program has no stored example inputs; pass example_inputs=")
        example_inputs, example_kwargs = stored
        if example_kwargs:
            raise CaptureError("programs with keyword inputs are not supported; export with positional inputs")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (example_inputs,)
    module = program.module()
    _drop_guards(module)
    optimized, report = optimize(module, inputs, **kwargs)
    return torch.export.export(optimized, inputs), report


def _drop_guards(module: fx.GraphModule) -> None:
    """Remove the unlifted module's input-guard call (the new export records its own guards)."""
    for node in list(module.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            module.graph.erase_node(node)
    module.recompile()
