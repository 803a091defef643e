"""The speed table's rows and its rendering: :class:`Row` (one model variant under one runtime: latency per
batch size, setup time, size, memory, FLOPs) and :class:`SpeedTable` (the rows with their environment,
the speed-ups between them, as a dict for JSON reports and as Markdown). Measuring them is
:func:`fxrebirth.measure.speed.speed_table`'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fxrebirth.measure.runtimes import get_runtime, runtime_names

__all__ = ["Row", "SpeedTable", "layers_markdown"]

_REPORTED = {"f32": "fp32"}
"""A record's precision as the report has always written it."""


def precision(runtime: str) -> str:
    """The arithmetic a runtime's rows compute in, as reported (``fp32``, ``bf16``): its record's."""
    value = get_runtime(runtime).precision
    return _REPORTED.get(value, value)


def _baseline(runtime: str) -> str:
    """The runtime of the original row a runtime's rows are compared with ("vs original, same runtime")."""
    return get_runtime(runtime).baseline or runtime


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
    """:func:`~fxrebirth.measure.memory.inference_memory` at batch 1 (MB)."""
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
    layers_ms: dict[str, dict[str, float]] | None = None
    """Eager milliseconds per layer kind, of the ``original`` and the ``reborn`` model (batch 1)."""

    def row(self, variant: str, runtime: str) -> Row | None:
        return next((r for r in self.rows if r.variant == variant and r.runtime == runtime), None)

    def ratio(self, row: Row, batch: int, runtime: str | None = None) -> float | None:
        """Speed-up of ``row`` over the original under ``runtime`` (default: the row's own runtime's
        baseline, its record's ``baseline``)."""
        base = self.row("original", runtime or _baseline(row.runtime))
        if base is None or batch not in base.ms or batch not in row.ms:
            return None
        return base.ms[batch] / row.ms[batch]

    def best_original(self, batch: int, arithmetic: str = "fp32") -> Row | None:
        """The fastest original row at ``batch`` among the runtimes computing in ``arithmetic``."""
        timed = [r for r in self.rows if r.variant == "original" and batch in r.ms and precision(r.runtime) == arithmetic]
        return min(timed, key=lambda r: r.ms[batch]) if timed else None

    def vs_best(self, row: Row, batch: int) -> float | None:
        """Speed-up of ``row`` over the fastest original at its precision (:meth:`best_original`)."""
        best = self.best_original(batch, precision(row.runtime))
        return best.ms[batch] / row.ms[batch] if best is not None and batch in row.ms else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row, out in zip(self.rows, data["rows"]):
            out["speedup_same_runtime"] = {b: self.ratio(row, b) for b in row.ms}
            for reference in runtime_names("reference"):
                out[f"speedup_vs_original_{reference}"] = {b: self.ratio(row, b, reference) for b in row.ms}
            out["precision"] = precision(row.runtime)
            out["speedup_vs_best_original"] = {b: self.vs_best(row, b) for b in row.ms}
        data["best_original"] = {b: {p: getattr(self.best_original(b, p), "runtime", None) for p in ("fp32", "bf16")}
                                 for b in self.batches}
        return data

    def markdown(self) -> str:
        env = self.environment
        lines = [
            f"{self.model}, {self.image_size}x{self.image_size}, median of {self.rounds} shuffled interleaved "
            f"rounds in one process. {env['cpu']} ({env['cpu_count']} CPUs), torch {env['torch']} with "
            f"{env['torch_threads']} threads ({env['torch_interop_threads']} inter-op), "
            + "".join(f"{package} {env.get(package)}, " for package in self._packages())
            + f"every runtime with {env.get('onnxruntime_intra_op_threads')} threads (ONNX Runtime: spinning off, "
            f"all graph optimisations), ONNX files from the {self.exporter} exporter"
            + (" (the faster for the original: " + ", ".join(f"{k} {v:.2f} ms" for k, v in self.exporter_ms.items())
               + ")" if self.exporter_ms else "") + f", Python {env['python']}. Rows are fp32 unless their runtime says bf16; \"vs best original\" divides "
            "by the fastest original at the same precision"
            + "".join(f" (batch {b}: {r.runtime})" for b in self.batches if (r := self.best_original(b))) + ".", "",
        ]
        head = ["variant", "runtime"]
        for b in self.batches:
            head += [f"batch {b} ms", "vs original, same runtime", "vs best original"]
        head += ["size on disk MB", "inference memory MB (process peak)", "GFLOPs/image"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            cells = [row.variant, row.runtime + (f" ({row.note})" if row.note else "")]
            for b in self.batches:
                ms = row.ms.get(b)
                same, ort = self.ratio(row, b), self.vs_best(row, b)
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

    def _packages(self) -> list[str]:
        """The runtimes' packages whose versions the environment holds, in the registry's order."""
        found = dict.fromkeys(get_runtime(r).package for r in runtime_names())
        return [p for p in found if p is not None and p in self.environment]

    def layers_markdown(self) -> str:
        """The time per layer kind, before and after, as a Markdown table ("" when not measured)."""
        return layers_markdown(self.layers_ms) if self.layers_ms else ""


def layers_markdown(layers_ms: dict[str, dict[str, float]]) -> str:
    """``{"original": {kind: ms}, "reborn": {kind: ms}}`` as a Markdown table, with the totals."""
    before, after = layers_ms["original"], layers_ms["reborn"]
    rows = [f"| {k} | {before.get(k, 0.0):.2f} | {after.get(k, 0.0):.2f} |" for k in {**before, **after}]
    total = f"| total | {sum(before.values()):.2f} | {sum(after.values()):.2f} |"
    return "\n".join(["| layer kind | original ms | reborn ms |", "|---|---|---|", *rows, total])
