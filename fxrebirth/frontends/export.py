"""torch.export entry point: optimise an ``ExportedProgram`` and get an ``ExportedProgram`` back.

Both forms of a program are accepted: as exported (``aten.conv2d``, ``aten.batch_norm``...) and after
``run_decompositions()`` (``aten.convolution``, ``_native_batch_norm_legit_no_training`` + ``getitem``,
``addmm`` on a transposed weight...). The program's module is lowered to the canonical form
(:mod:`fxrebirth.graph.aten`), the exact pipeline runs, and the result is exported again, so it saves and
loads with ``torch.export.save/load`` and feeds ExecuTorch or the ONNX exporter like any program.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from fxrebirth.frontends.library import optimize
from fxrebirth.errors import CaptureError, first_line
from fxrebirth.graph.guards import DynamicSizeGuardError
from fxrebirth.rewrite.report import Report

__all__ = ["optimize_exported"]

log = logging.getLogger(__name__)


def optimize_exported(
    program: torch.export.ExportedProgram, example_inputs: Any = None, **kwargs: Any
) -> tuple[torch.export.ExportedProgram, Report]:
    """Apply the exact tier to ``program``; return the re-exported program and the report.

    ``example_inputs`` defaults to the program's own (``program.example_inputs``); keyword inputs are
    not supported. Other keyword arguments go to :func:`fxrebirth.optimize`. The result accepts the sizes
    the input program did: where the program has dynamic dims, no rewrite that is exact only at some sizes
    is applied on them (the report names each rule so disabled, and why).
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
    dynamic = _dynamic_shapes(program)
    if dynamic is None:
        optimized, report = optimize(module, inputs, **kwargs)
        return torch.export.export(optimized, inputs), report
    return _dynamic_export(module, inputs, dynamic, kwargs)


def _dynamic_export(module: fx.GraphModule, inputs: tuple, dynamic: tuple,
                    kwargs: dict[str, Any]) -> tuple[torch.export.ExportedProgram, Report]:
    """Optimise and export again with the input program's dynamic dims. A rewrite exact only at some
    sizes (a size guard, :mod:`fxrebirth.graph.guards`) on a dynamic dim is not applied: its rule is
    disabled and the model optimised again, so the program runs at every size the input program did;
    the report says which rule and why. A guard of capture (the model's shape queries resolved at the
    example's sizes) cannot be lifted: that raises :class:`~fxrebirth.errors.CaptureError`."""
    disable, notes = list(kwargs.pop("disable", ())), []
    while True:
        optimized, report = optimize(module, inputs, disable=disable, **kwargs)
        try:
            program = torch.export.export(optimized, inputs, dynamic_shapes=dynamic)
        except DynamicSizeGuardError as exc:
            if exc.rule is None or exc.rule in disable:
                raise CaptureError(f"the program's dynamic sizes cannot be kept: {exc}; export the input program "
                                   "with those sizes static to optimise it at the example's") from None
            why = str(exc).split(" left dynamic: ", 1)[-1].split("; ONNX and exported programs", 1)[0]
            notes.append(f"rule {exc.rule!r} disabled: the program's sizes are dynamic, and {why}")
            log.info("optimize_exported: %s", notes[-1])
            disable.append(exc.rule)
            continue
        except Exception as exc:  # noqa: BLE001 - a program that became size-specific is still a valid program
            log.warning("the optimised program could not keep the input program's dynamic sizes (%s: %s); it is "
                        "exported at the example's sizes", type(exc).__name__, first_line(exc))
            report.checks.append("exported at the example's sizes: the dynamic sizes of the input program could "
                                 f"not be kept ({type(exc).__name__}: {first_line(exc, 200)})")
            program = torch.export.export(optimized, inputs)
        report.checks += notes
        return program, report


def _dynamic_shapes(program: torch.export.ExportedProgram) -> tuple | None:
    """The input program's dynamic dims as a ``dynamic_shapes`` spec (``Dim.DYNAMIC`` where the exported
    input's size is symbolic), so that the optimised program accepts the sizes the original did; ``None``
    when every size is static."""
    names = set(program.graph_signature.user_inputs)
    spec, dynamic = [], False
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in names:
            continue
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            spec.append(None)
            continue
        dims = {d: torch.export.Dim.DYNAMIC for d, n in enumerate(value.shape) if isinstance(n, torch.SymInt)}
        dynamic |= bool(dims)
        spec.append(dims or None)
    return tuple(spec) if dynamic else None


def _drop_guards(module: fx.GraphModule) -> None:
    """Remove the unlifted module's input-guard call (the new export records its own guards)."""
    for node in list(module.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            module.graph.erase_node(node)
    module.recompile()
