"""The speed table: a model, its exact tier and its reborn version under every runtime, side by side.

:func:`benchmark` is what ``fxrebirth bench`` prints and ``fxrebirth run`` puts in its report: the
:func:`speed_table` of the default variants under the chosen runtimes, and the time per layer kind of the
original and the reborn model. For each batch size it builds every (model variant, runtime) pair, then times them all in shuffled interleaved
rounds in this one process (:func:`fxrebirth.measure.timing.interleaved_medians`), so that ratios are measured
under the same conditions. Runtimes:

the records of :mod:`fxrebirth.measure.runtimes` (:func:`~fxrebirth.measure.runtimes.runtime_names`), each
with the model variants the default table times under it. Today: PyTorch eager; ``torch.fx`` fuse; Inductor
with freezing; ``torch.compile`` through the exact tier; ONNX Runtime (every graph optimisation, as many
intra-op threads as torch, spinning off: a spinning pool steals the cores from the next variant of a round;
the ONNX exporter is the faster of the two for the original model, ``exporter="auto"`` times both, and the
same one is used for the others); OpenVINO's CPU plugin on the same ONNX file at a forced precision (f32,
or bf16 where the CPU has it; :mod:`fxrebirth.measure.deploy`) and through its ``torch.compile`` backend;
ExecuTorch running a ``.pte`` lowered to XNNPACK. ``lowering`` (given by the callers that may rewrite
models, :func:`fxrebirth.frontends.deploy.lower_for`) first rewrites what a runtime has no kernel for,
and the row says what it rewrote.

A runtime that is not installed, or fails on a model, keeps its row with a one-line reason.

Beside latency: size on disk (the ``state_dict`` for PyTorch runtimes, the ``.onnx`` file for ONNX Runtime),
peak memory of inference measured in a separate process per variant (:func:`inference_memory`), and FLOPs.

This module measures; the runners and exports it times are in :mod:`fxrebirth.measure.runners`, the rows
and their rendering in :mod:`fxrebirth.measure.table`, the memory subprocess in
:mod:`fxrebirth.measure.memory` (its child is started as this module's ``__main__``). Their public names
are re-exported here.
"""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

import torch
from torch import nn

from fxrebirth.measure.timing import interleaved_medians
from fxrebirth.errors import first_line
from fxrebirth.graph.capture import capture
from fxrebirth.measure.memory import memory_child, inference_memory
from fxrebirth.measure.runners import (compiled_runner, eager_runner, environment, export_onnx, onnx_mb, ort_runner,
                                       ort_session)
from fxrebirth.measure.runtimes import DEFAULT_RUNTIME, Runtime, available, get_runtime, runtime_names, variants_of
from fxrebirth.measure.table import Row, SpeedTable

__all__ = ["environment", "eager_runner", "compiled_runner", "ort_runner", "ort_session", "export_onnx", "Row", "SpeedTable", "speed_table", "inference_memory", "layer_breakdown",
           "eager_latency", "benchmark", "variants_for", "layer_times", "runtime_runner", "Lowering"]

log = logging.getLogger(__name__)

Lowering = Callable[[nn.Module, str, torch.Tensor], tuple[nn.Module, str]]
"""``(model, runtime, example) -> (model the runtime can run, note)``."""


def variants_for(runtimes: Sequence[str]) -> list[tuple[str, str]]:
    """The default variants under ``runtimes`` (:func:`~fxrebirth.measure.runtimes.variants_of`), and the
    original under the default runtime always (every ratio's base); an unknown name is refused naming the
    known ones."""
    chosen = [get_runtime(r).name for r in runtimes]
    return [(v, r) for v, r in variants_of(runtime_names()) if r in chosen or (v, r) == ("original", DEFAULT_RUNTIME)]


def benchmark(
    model: nn.Module,
    *,
    exact: nn.Module | None,
    reborn: nn.Module | None,
    image_size: int,
    batches: Sequence[int],
    rounds: int,
    runtimes: Sequence[str] | None = None,
    exporter: str = "auto",
    memory: bool = True,
    layers: bool = True,
    name: str = "model",
    progress: Callable[[str], None] | None = None,
    lowering: Lowering | None = None,
) -> SpeedTable:
    """The speed report of ``fxrebirth bench`` and ``fxrebirth run``: :func:`speed_table` of the default
    variants under ``runtimes`` (default: every registered one) and, with ``layers``, the eager milliseconds per layer kind of the original and
    the reborn model at batch 1 (``table.layers_ms``, :func:`layer_times`)."""
    table = speed_table(model, exact=exact, reborn=reborn, image_size=image_size, batches=batches, rounds=rounds,
                        variants=variants_for(runtime_names() if runtimes is None else runtimes), exporter=exporter, memory=memory, name=name,
                        progress=progress, lowering=lowering)
    if layers:
        table.layers_ms = layer_times(model, reborn, torch.randn(1, 3, image_size, image_size))
    return table


def layer_times(model: nn.Module, reborn: nn.Module | None, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """:func:`layer_breakdown` of ``model`` and of ``reborn`` (empty without one), keyed ``original``/``reborn``."""
    return {"original": layer_breakdown(model, x), "reborn": layer_breakdown(reborn, x) if reborn is not None else {}}


def _file_mb(path: str) -> float:
    return os.path.getsize(path) / 2**20


def _state_dict_mb(model: nn.Module, folder: str, name: str) -> float:
    path = os.path.join(folder, f"{name}.state_dict.pt")
    torch.save(model.state_dict(), path)
    return _file_mb(path)


def speed_table(
    model: nn.Module,
    *,
    exact: nn.Module | None = None,
    reborn: nn.Module | None = None,
    image_size: int = 224,
    batches: Sequence[int] = (1, 8),
    rounds: int = 20,
    variants: Sequence[tuple[str, str]] | None = None,
    exporter: str = "auto",
    memory: bool = True,
    name: str = "model",
    progress: Callable[[str], None] | None = None,
    lowering: Lowering | None = None,
) -> SpeedTable:
    """Measure ``variants`` ((model variant, runtime) pairs; model variants ``original``, ``exact tier``,
    ``reborn``; default: :func:`~fxrebirth.measure.runtimes.variants_of` every registered runtime) at every
    batch size, side by side. ``exact``/``reborn`` default to none: their rows are skipped. ``exporter``: ``torchscript``, ``dynamo`` or ``auto`` (the faster for the original)."""
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter={exporter!r}: use auto, torchscript or dynamo")
    models = {"original": _in_eval(model), "exact tier": _in_eval(exact), "reborn": _in_eval(reborn)}
    wanted = [(v, get_runtime(r).name) for v, r in (variants_of() if variants is None else variants)
              if models.get(v) is not None]
    say = progress or (lambda message: log.info("speed table: %s", message))
    rows = {(v, r): Row(v, r) for v, r in wanted}
    for (_, runtime), row in rows.items():
        reason = available(runtime)
        row.note = f"unavailable: {reason}" if reason else ""
    with tempfile.TemporaryDirectory(prefix="fxrebirth-speed-") as folder:
        chosen, exporter_ms = _measure(models, rows, folder, image_size, batches, rounds, exporter, memory, say,
                                       lowering)
    return SpeedTable(model=name, image_size=image_size, batches=list(batches), rounds=rounds,
                      rows=list(rows.values()), environment=environment(), exporter=chosen, exporter_ms=exporter_ms)


def _in_eval(model: nn.Module | None) -> nn.Module | None:
    """``model`` in eval mode, copied first if it is training (the caller's module keeps its mode)."""
    return copy.deepcopy(model).eval() if model is not None and model.training else model


def _skipped(row: Row) -> bool:
    return row.note.startswith(("failed", "unavailable"))


def _artifact(folder: str, variant: str, runtime: str, batch: int) -> str:
    """The file a file runtime runs: one per variant, batch and file type (runtimes reading the same type,
    ONNX Runtime and OpenVINO, share it)."""
    return os.path.join(folder, f"{variant}-b{batch}{get_runtime(runtime).suffix}")


def runtime_runner(model: nn.Module, runtime: str, x: torch.Tensor, folder: str, exporter: str = "torchscript",
                   name: str = "model") -> Callable[[], object]:
    """A runner of ``model`` at ``x`` under any registered runtime: a file runtime's file is written to
    ``folder`` first (as ``name``; ``exporter`` is the ONNX exporter), a PyTorch runtime compiles on this call."""
    record = get_runtime(runtime)
    reason = available(runtime)
    if reason:
        raise RuntimeError(f"{runtime} is unavailable: {reason}")
    if not record.runs_file:
        return record.run(model, x)
    path = _artifact(folder, name, runtime, x.shape[0])
    if not os.path.exists(path):
        record.export(model, x, path, exporter)
    return record.run(path, x)


def _prepare(models: dict[str, nn.Module | None], key: tuple[str, str], row: Row, folder: str, x: torch.Tensor,
             exporter: str, lowering: Lowering | None) -> Callable[[], object]:
    """The runner of one row at ``x``'s batch; a lowering's note goes on the row."""
    variant, runtime = key
    model = models[variant]
    if lowering is not None:
        model, note = lowering(model, runtime, x)
        row.note = note or row.note
    return runtime_runner(model, runtime, x, folder, exporter, name=variant)


def _measure(models: dict[str, nn.Module | None], rows: dict[tuple[str, str], Row], folder: str, image_size: int,
             batches: Sequence[int], rounds: int, exporter: str, memory: bool,
             say: Callable[[str], None], lowering: Lowering | None) -> tuple[str, dict[str, float]]:
    """Fill ``rows`` (latency per batch, setup, size, FLOPs, memory); return the exporter used and, when
    ``exporter="auto"``, the original's latency under each exporter."""
    model = models["original"]
    exporter_ms: dict[str, float] = {}
    chosen = "torchscript" if exporter == "auto" else exporter
    for batch in batches:
        x = torch.randn(batch, 3, image_size, image_size)
        runs: dict[tuple[str, str], Callable[[], object]] = {}
        judge = next((get_runtime(r) for v, r in rows if v == "original" and "exporter-choice" in get_runtime(r).tags
                      and not _skipped(rows[v, r])), None)
        if exporter == "auto" and judge is not None and not exporter_ms:
            say(f"choosing the ONNX exporter (under {judge.name})")
            chosen, exporter_ms = _faster_exporter(model, x, folder, rounds, judge)
        for key, row in rows.items():
            if _skipped(row):
                continue
            say(f"batch {batch}: preparing {row.name}")
            start = time.perf_counter()
            try:
                runs[key] = _prepare(models, key, row, folder, x, chosen, lowering)
                runs[key]()
            except Exception as exc:  # one runtime failing must not lose the rest of the table
                row.note = f"failed: {type(exc).__name__}: {first_line(exc, 120)}"
                log.warning("speed table: %s %s", row.name, row.note)
                runs.pop(key, None)
                continue
            if row.setup_s is None:
                row.setup_s = time.perf_counter() - start
        say(f"batch {batch}: timing {len(runs)} variants, {rounds} rounds")
        for key, ms in interleaved_medians(runs, rounds).items():
            rows[key].ms[batch] = ms
        del runs
    _sizes_flops(models, rows, folder, image_size, keep_modules=memory)
    if memory:
        _memories(rows, folder, image_size, say)
    return chosen, exporter_ms


def _memories(rows: dict[tuple[str, str], Row], folder: str, image_size: int, say: Callable[[str], None]) -> None:
    """Peak memory of every row that ran at batch 1, each in a process of its own."""
    for (variant, runtime), row in rows.items():
        path = _artifact(folder, variant, runtime, 1) if get_runtime(runtime).runs_file else \
            os.path.join(folder, f"{variant}.module.pt")
        if _skipped(row) or not os.path.exists(path):
            continue
        say(f"memory of {row.name} (own process)")
        try:
            row.memory = inference_memory(path, runtime, (1, 3, image_size, image_size))
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            log.warning("speed table: %s", exc)


def _faster_exporter(model: nn.Module, x: torch.Tensor, folder: str, rounds: int,
                     judge: Runtime) -> tuple[str, dict[str, float]]:
    """The ONNX exporter whose file of ``model`` runs faster under ``judge``, and both latencies."""
    runs = {}
    for exporter in ("torchscript", "dynamo"):
        path = os.path.join(folder, f"choose-{exporter}{judge.suffix}")
        try:
            judge.export(model, x, path, exporter)
            runs[exporter] = judge.run(path, x)
        except Exception as exc:  # an exporter that cannot export this model is not the faster one
            log.warning("speed table: the %s exporter failed: %s", exporter, str(exc).strip()[:200])
    if not runs:
        return "torchscript", {}
    ms = interleaved_medians(runs, max(5, rounds // 2))
    return min(ms, key=ms.get), ms


def _sizes_flops(models: dict[str, nn.Module | None], rows: dict[tuple[str, str], Row], folder: str,
                 image_size: int, keep_modules: bool) -> None:
    """Size on disk (the file a file runtime ran at batch 1, else the ``state_dict``) and FLOPs of every
    row; ``keep_modules`` also writes each model variant whole, for the memory subprocesses to load."""
    from fxrebirth.graph.capture import capture
    from fxrebirth.rewrite.cost import graph_flops

    x = torch.randn(1, 3, image_size, image_size)
    for variant, model in models.items():
        if model is None or not any(v == variant for v, _ in rows):
            continue
        if keep_modules:
            torch.save(model, os.path.join(folder, f"{variant}.module.pt"))
        size = _state_dict_mb(model, folder, variant)
        try:
            gflops = graph_flops(capture(model, (x,))) / 1e9
        except Exception as exc:  # FLOPs are a column, not a reason to lose the table
            log.warning("speed table: FLOPs of %s not counted: %s", variant, exc)
            gflops = None
        for (v, runtime), row in rows.items():
            if v != variant:
                continue
            row.gflops = gflops
            path = _artifact(folder, variant, runtime, 1)
            if not get_runtime(runtime).runs_file:
                row.size_mb = size
            elif os.path.exists(path):
                row.size_mb = onnx_mb(path)


def layer_breakdown(model: nn.Module, x: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Eager milliseconds by layer kind (``conv``, ``max_pool``, ``local_response_norm``, ``cat``, ...),
    each node timed on its own (:func:`fxrebirth.rewrite.cost.profile_nodes`); nodes without a canonical kind are
    ``other``."""
    from fxrebirth.graph.capture import capture
    from fxrebirth.rewrite.cost import profile_nodes
    from fxrebirth.graph.ops import kind_of

    gm = capture(model, (x,))
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, float] = {}
    for name, seconds in profile_nodes(gm, (x,), repeats=repeats).items():
        node = nodes[name]
        kind = kind_of(node) or (getattr(node.target, "__name__", None) or str(node.target)).split(".")[-1]
        out[kind] = out.get(kind, 0.0) + seconds * 1e3
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":  # the child process of inference_memory
    if len(sys.argv) == 6 and sys.argv[1] == "memory":
        memory_child(*sys.argv[2:])
    else:
        sys.exit("usage: python -m fxrebirth.measure.speed memory MODEL_PATH RUNTIME N,C,H,W THREADS")


def eager_latency(model: nn.Module, reborn: nn.Module, x: torch.Tensor, rounds: int = 20) -> dict[str, object]:
    """The original ``model`` (captured, eval mode, a copy) against ``reborn`` in eager PyTorch on ``x``:
    median milliseconds of ``rounds`` interleaved rounds (:mod:`fxrebirth.measure.timing`) and their ratio."""
    original = capture(copy.deepcopy(model).eval(), (x,))
    with torch.inference_mode():
        med = interleaved_medians({"original": lambda: original(x), "reborn": lambda: reborn(x)}, rounds)
    return {"input_shape": list(x.shape), "runtime": DEFAULT_RUNTIME, "original_ms": med["original"],
            "reborn_ms": med["reborn"], "speedup": med["original"] / med["reborn"], "rounds": rounds}
