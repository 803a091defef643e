"""The speed table: a model, its exact tier and its reborn version under every runtime, side by side.

:func:`speed_table` is what ``fxrebirth bench`` prints and ``fxrebirth run`` puts in its report. For each
batch size it builds every (model variant, runtime) pair, then times them all in shuffled interleaved
rounds in this one process (:func:`fxrebirth.measure.timing.interleaved_medians`), so that ratios are measured
under the same conditions. Runtimes:

* ``eager``: PyTorch eager under ``torch.inference_mode()``;
* ``fx fuse``: ``torch.fx.experimental.optimization.fuse`` (folds Conv+BN), eager;
* ``inductor+freezing``: ``torch.compile`` with Inductor's ``freezing`` config on;
* ``compile(fxrebirth)``: ``torch.compile(backend="fxrebirth")`` (the exact tier, then Inductor with freezing);
* ``onnxruntime``: ONNX Runtime, every graph optimisation, as many intra-op threads as torch, spinning
  off (a spinning pool steals the cores from the next variant of a round). The exporter is the faster of
  the two for the original model (``exporter="auto"`` times both) and the same one is used for the others.

Beside latency: size on disk (the ``state_dict`` for PyTorch runtimes, the ``.onnx`` file for ONNX Runtime),
peak memory of inference measured in a separate process per variant (:func:`inference_memory`), and FLOPs.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from fxrebirth.measure.timing import interleaved_medians
from fxrebirth.errors import first_line

__all__ = ["environment", "eager_runner", "compiled_runner", "ort_runner", "ort_session", "export_onnx", "Row", "SpeedTable", "speed_table", "inference_memory", "layer_breakdown", "variant_runner", "RUNTIMES"]

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "fx fuse", "inductor+freezing", "compile(fxrebirth)", "onnxruntime")
DEFAULT_VARIANTS = (
    ("original", "eager"), ("original", "fx fuse"), ("original", "inductor+freezing"),
    ("original", "compile(fxrebirth)"), ("original", "onnxruntime"),
    ("exact tier", "eager"),
    ("reborn", "eager"), ("reborn", "compile(fxrebirth)"), ("reborn", "onnxruntime"),
)
# the original's row each runtime is compared with ("vs original, same runtime")
_BASELINE = {"eager": "eager", "fx fuse": "eager", "inductor+freezing": "inductor+freezing",
             "compile(fxrebirth)": "inductor+freezing", "onnxruntime": "onnxruntime"}


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


def export_onnx(model: nn.Module, x: torch.Tensor, path: str, exporter: str = "torchscript") -> str:
    """Export ``model`` to ``path`` with the TorchScript-based (``dynamo=False``, opset 17) or the
    ``dynamo`` exporter (opset 18). The exporters print progress and, on failure, whole graphs: that
    output is kept out of ours (it would corrupt ``--json``) and failures raise with their first line."""
    dynamo = exporter == "dynamo"
    chatter = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, dynamo=dynamo, opset_version=18 if dynamo else 17)
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


@dataclass
class Row:
    """One (model variant, runtime) of the table."""

    variant: str
    runtime: str
    ms: dict[int, float] = field(default_factory=dict)
    """Median latency per batch size."""
    setup_s: float | None = None
    """First call at the first batch size: compilation, or export and session creation."""
    size_mb: float | None = None
    memory: dict[str, float] | None = None
    """:func:`inference_memory` at batch 1 (MB)."""
    gflops: float | None = None
    """Per image, counted on the variant's graph (runtimes do not change it)."""
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.variant}, {self.runtime}"


@dataclass
class SpeedTable:
    """Rows measured side by side, with the environment they were measured in."""

    model: str
    image_size: int
    batches: list[int]
    rounds: int
    rows: list[Row]
    environment: dict[str, Any]
    exporter: str = "torchscript"
    exporter_ms: dict[str, float] = field(default_factory=dict)
    """Original model under ONNX Runtime by exporter, when ``exporter="auto"`` compared them."""

    def row(self, variant: str, runtime: str) -> Row | None:
        return next((r for r in self.rows if r.variant == variant and r.runtime == runtime), None)

    def ratio(self, row: Row, batch: int, runtime: str | None = None) -> float | None:
        """Speed-up of ``row`` over the original under ``runtime`` (default: the row's own runtime's
        baseline, see ``_BASELINE``)."""
        base = self.row("original", runtime or _BASELINE[row.runtime])
        if base is None or batch not in base.ms or batch not in row.ms:
            return None
        return base.ms[batch] / row.ms[batch]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, out in zip(self.rows, data["rows"]):
            out["speedup_same_runtime"] = {b: self.ratio(row, b) for b in row.ms}
            out["speedup_vs_original_onnxruntime"] = {b: self.ratio(row, b, "onnxruntime") for b in row.ms}
        return data

    def markdown(self) -> str:
        env = self.environment
        lines = [
            f"{self.model}, {self.image_size}x{self.image_size}, fp32, median of {self.rounds} shuffled interleaved "
            f"rounds in one process. {env['cpu']} ({env['cpu_count']} CPUs), torch {env['torch']} with "
            f"{env['torch_threads']} threads ({env['torch_interop_threads']} inter-op), ONNX Runtime "
            f"{env.get('onnxruntime')} with {env.get('onnxruntime_intra_op_threads')} intra-op threads "
            f"(spinning off, all graph optimisations, {self.exporter} exporter"
            + (", the faster for the original: " + ", ".join(f"{k} {v:.2f} ms" for k, v in self.exporter_ms.items())
               if self.exporter_ms else "") + f"), Python {env['python']}.", "",
        ]
        head = ["variant", "runtime"]
        for b in self.batches:
            head += [f"batch {b} ms", "vs original, same runtime", "vs original under ORT"]
        head += ["size on disk MB", "inference memory MB (process peak)", "GFLOPs/image"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = [row.variant, row.runtime + (f" ({row.note})" if row.note else "")]
            for b in self.batches:
                ms = row.ms.get(b)
                same, ort = self.ratio(row, b), self.ratio(row, b, "onnxruntime")
                cells += [f"{ms:.2f}" if ms is not None else "-", f"{same:.2f}x" if same else "-",
                          f"{ort:.2f}x" if ort else "-"]
            mem = row.memory
            cells += [f"{row.size_mb:.1f}" if row.size_mb is not None else "-",
                      f"{mem['inference_mb']:.1f} ({mem['peak_mb']:.0f})" if mem else "-",
                      f"{row.gflops:.2f}" if row.gflops is not None else "-"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Inference memory: the peak resident memory while running inference at batch 1, above the "
                      "process's resident memory after importing the runtime and before loading the model "
                      "(weights and activations); in brackets the whole process's peak. Each variant runs in a "
                      "process of its own; a compiled variant's process also holds what the compiler leaves "
                      "resident, so compare its memory with other compiled variants only."]
        return "\n".join(lines)


def _file_mb(path: str) -> float:
    return os.path.getsize(path) / 2**20


def _state_dict_mb(model: nn.Module, folder: str, name: str) -> float:
    path = os.path.join(folder, f"{name}.state_dict.pt")
    torch.save(model.state_dict(), path)
    return _file_mb(path)


def inference_memory(model_path: str, runtime: str, shape: Sequence[int], timeout_s: float = 600) -> dict[str, float]:
    """Peak memory of inference in a fresh process (a process's peak only grows, so every variant needs
    its own). ``model_path``: a whole pickled module (``torch.save(model)``, a file this module wrote) for
    the PyTorch runtimes, an ``.onnx`` file for ``onnxruntime``. Returns MB: ``baseline_mb`` (resident after
    importing the runtime), ``peak_mb`` (the process's peak while running inference, after loading and
    compiling and one warm-up call) and ``inference_mb`` (their difference)."""
    cmd = [sys.executable, "-m", "fxrebirth.measure.speed", "memory", model_path, runtime, ",".join(map(str, shape)),
           str(torch.get_num_threads())]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"memory measurement of {runtime} failed: {tail[:300]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def _memory_child(model_path: str, runtime: str, shape: str, threads: str) -> None:
    """The process :func:`inference_memory` starts (Linux: reads VmRSS/VmHWM, resets the peak through
    /proc/self/clear_refs so that loading and compiling do not count)."""
    torch.set_num_threads(int(threads))
    x = torch.randn(*map(int, shape.split(",")))
    if runtime == "onnxruntime":
        __import__("onnxruntime")  # the runtime's own memory belongs to the baseline
    baseline = _status_kb("VmRSS")
    if runtime == "onnxruntime":
        run = ort_runner(model_path, x)
    else:
        model = torch.load(model_path, weights_only=False).eval()  # written by inference_memory's caller
        run = variant_runner(model, runtime, x)
    run()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
    except OSError:
        log.warning("cannot reset the peak (no /proc/self/clear_refs): loading counts in the peak")
    run()
    peak = _status_kb("VmHWM")
    # the child's answer to inference_memory, on stdout (the protocol between the two processes)
    sys.stdout.write(json.dumps({"baseline_mb": baseline / 1024, "peak_mb": peak / 1024,
                                 "inference_mb": (peak - baseline) / 1024}) + "\n")


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
    raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")


def speed_table(
    model: nn.Module,
    *,
    exact: nn.Module | None = None,
    reborn: nn.Module | None = None,
    image_size: int = 224,
    batches: Sequence[int] = (1, 8),
    rounds: int = 20,
    variants: Sequence[tuple[str, str]] = DEFAULT_VARIANTS,
    exporter: str = "auto",
    memory: bool = True,
    name: str = "model",
    progress: Callable[[str], None] | None = None,
) -> SpeedTable:
    """Measure ``variants`` ((model variant, runtime) pairs; model variants ``original``, ``exact tier``,
    ``reborn``) at every batch size, side by side. ``exact``/``reborn`` default to none: their rows are
    skipped. ``exporter``: ``torchscript``, ``dynamo`` or ``auto`` (the faster for the original)."""
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter={exporter!r}: use auto, torchscript or dynamo")
    models = {"original": _in_eval(model), "exact tier": _in_eval(exact), "reborn": _in_eval(reborn)}
    wanted = [(v, r) for v, r in variants if models.get(v) is not None]
    say = progress or (lambda message: log.info("speed table: %s", message))
    rows = {(v, r): Row(v, r) for v, r in wanted}
    with tempfile.TemporaryDirectory(prefix="fxrebirth-speed-") as folder:
        chosen, exporter_ms = _measure(models, rows, folder, image_size, batches, rounds, exporter, memory, say)
    return SpeedTable(model=name, image_size=image_size, batches=list(batches), rounds=rounds,
                      rows=list(rows.values()), environment=environment(), exporter=chosen, exporter_ms=exporter_ms)


def _in_eval(model: nn.Module | None) -> nn.Module | None:
    """``model`` in eval mode, copied first if it is training (the caller's module keeps its mode)."""
    return copy.deepcopy(model).eval() if model is not None and model.training else model


def _measure(models: dict[str, nn.Module | None], rows: dict[tuple[str, str], Row], folder: str, image_size: int,
             batches: Sequence[int], rounds: int, exporter: str, memory: bool,
             say: Callable[[str], None]) -> tuple[str, dict[str, float]]:
    """Fill ``rows`` (latency per batch, setup, size, FLOPs, memory); return the exporter used and, when
    ``exporter="auto"``, the original's latency under each exporter."""
    model, wanted = models["original"], list(rows)
    exporter_ms: dict[str, float] = {}
    chosen = "torchscript" if exporter == "auto" else exporter
    for batch in batches:
        x = torch.randn(batch, 3, image_size, image_size)
        runs: dict[tuple[str, str], Callable[[], object]] = {}
        if exporter == "auto" and ("original", "onnxruntime") in rows and not exporter_ms:
            say("choosing the ONNX exporter")
            chosen, exporter_ms = _faster_exporter(model, x, folder, rounds)
        for key in wanted:
            row = rows[key]
            if row.note.startswith("failed"):
                continue
            say(f"batch {batch}: preparing {row.name}")
            start = time.perf_counter()
            try:
                if key[1] == "onnxruntime":
                    path = export_onnx(models[key[0]], x, os.path.join(folder, f"{key[0]}-b{batch}.onnx"), chosen)
                    runs[key] = ort_runner(path, x)
                else:
                    runs[key] = variant_runner(models[key[0]], key[1], x)
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
    _sizes_flops(models, rows, folder, image_size, chosen, keep_modules=memory)
    if memory:
        for key, row in rows.items():
            if row.note.startswith("failed"):
                continue
            say(f"memory of {row.name} (own process)")
            path = os.path.join(folder, f"{key[0]}-b1.onnx") if key[1] == "onnxruntime" else \
                os.path.join(folder, f"{key[0]}.module.pt")
            try:
                if key[1] == "onnxruntime" and not os.path.exists(path):
                    export_onnx(models[key[0]], torch.randn(1, 3, image_size, image_size), path, chosen)
                row.memory = inference_memory(path, key[1], (1, 3, image_size, image_size))
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                log.warning("speed table: %s", exc)
    return chosen, exporter_ms


def _faster_exporter(model: nn.Module, x: torch.Tensor, folder: str, rounds: int) -> tuple[str, dict[str, float]]:
    runs = {}
    for exporter in ("torchscript", "dynamo"):
        try:
            runs[exporter] = ort_runner(export_onnx(model, x, os.path.join(folder, f"choose-{exporter}.onnx"), exporter), x)
        except Exception as exc:  # an exporter that cannot export this model is not the faster one
            log.warning("speed table: the %s exporter failed: %s", exporter, str(exc).strip()[:200])
    if not runs:
        return "torchscript", {}
    ms = interleaved_medians(runs, max(5, rounds // 2))
    return min(ms, key=ms.get), ms


def _sizes_flops(models: dict[str, nn.Module | None], rows: dict[tuple[str, str], Row], folder: str,
                 image_size: int, exporter: str, keep_modules: bool) -> None:
    """Size on disk and FLOPs of every row; ``keep_modules`` also writes each model variant whole, for the
    memory subprocesses to load."""
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
            onnx_path = os.path.join(folder, f"{variant}-b1.onnx")
            if runtime == "onnxruntime":
                if not os.path.exists(onnx_path) and not row.note.startswith("failed"):
                    export_onnx(model, x, onnx_path, exporter)
                row.size_mb = onnx_mb(onnx_path) if os.path.exists(onnx_path) else None
            else:
                row.size_mb = size


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
        _memory_child(*sys.argv[2:])
    else:
        sys.exit("usage: python -m fxrebirth.speed memory MODEL_PATH RUNTIME N,C,H,W THREADS")
