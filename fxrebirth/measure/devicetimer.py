"""Time a profile bundle on the device that will run the model, with nothing but its runtime.

``fxrebirth profile`` writes a folder of ONNX micro-models (the whole model, and for every merge the
planner may choose, the layers it replaces and the layer that replaces them) with ``manifest.json``, and
a copy of this script with ``fxrebirth_timing.py`` beside it. On the device (Python 3.9+, numpy and
ONNX Runtime or OpenVINO; no PyTorch, no fxrebirth)::

    python time_on_device.py BUNDLE --runtime onnxruntime|openvino [--precision f32|bf16]
                             [--threads N] [--rounds 20]

writes ``BUNDLE/latency-<runtime>[-<precision>].json``. Copy it back and plan with it:
``fxrebirth plan MODEL --table BUNDLE/latency-openvino.json`` (or ``fxrebirth.plan(..., device_table=path)``
with the strategies the bundle was profiled for).

Each pair is timed as the planners time it here: after 3 warm-up calls, ``--rounds`` rounds, each running
the two micro-models once in a shuffled order; the medians are kept. Every session gets the same thread
count with spinning off (ONNX Runtime) or the latency hint with one stream (OpenVINO), the settings of
the speed table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from typing import Any, Callable

try:  # inside the package (tests, ``python -m fxrebirth.measure.devicetimer``)
    from fxrebirth.measure.timing import interleaved_medians
except ImportError:  # on the device: the copy ``fxrebirth profile`` wrote beside this script
    from fxrebirth_timing import interleaved_medians  # type: ignore[no-redef]

MANIFEST_FORMAT = "fxrebirth-profile/1"
TABLE_FORMAT = "fxrebirth-latency/1"


def manifest_digest(folder: str) -> str:
    """The SHA-256 of ``manifest.json``: a table names the bundle it was measured from."""
    with open(os.path.join(folder, "manifest.json"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _onnxruntime(path: str, threads: int, precision: str) -> tuple[Callable[[Any], object], str]:
    import onnxruntime as ort

    if precision != "f32":
        raise SystemExit("ONNX Runtime's CPU provider computes f32 here: use --precision f32")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})), f"onnxruntime {ort.__version__}"


def _openvino(path: str, threads: int, precision: str) -> tuple[Callable[[Any], object], str]:
    os.environ.setdefault("OPENVINO_TELEMETRY_OPTOUT", "1")
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": precision,
              "INFERENCE_NUM_THREADS": threads}
    request = core.compile_model(core.read_model(path), "CPU", config).create_infer_request()
    return (lambda x: request.infer({0: x})), f"openvino {ov.__version__}"


_MAKERS = {"onnxruntime": _onnxruntime, "openvino": _openvino}
RUNTIMES = tuple(_MAKERS)
"""What this script runs: the runtimes of :mod:`fxrebirth.measure.runtimes` tagged ``device`` (it runs with
numpy and the runtime only, so the table is written here; tests/test_runtimes.py checks it against the
registry)."""


def _runner(runtime: str, path: str, shape: list[int], threads: int, precision: str
            ) -> tuple[Callable[[], object], str]:
    import numpy as np

    run, version = _MAKERS[runtime](path, threads, precision)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return (lambda: run(x)), version


def time_bundle(folder: str, runtime: str, precision: str = "f32", threads: int | None = None,
                rounds: int = 20) -> dict[str, Any]:
    """The latency table of the bundle in ``folder`` under ``runtime`` (see the module docstring)."""
    if runtime not in RUNTIMES:
        raise SystemExit(f"unknown runtime {runtime!r}; this script runs: {', '.join(RUNTIMES)}")
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise SystemExit(f"{folder}: not a bundle of {MANIFEST_FORMAT} (format {manifest.get('format')!r})")
    threads = threads or os.cpu_count() or 1
    start = time.perf_counter()

    def runner(entry: dict[str, Any], file: str) -> tuple[Callable[[], object], str]:
        return _runner(runtime, os.path.join(folder, entry[file]), entry["input_shape"], threads, precision)

    whole = manifest["whole"]
    run_whole, version = runner(whole, "file")
    whole_ms = interleaved_medians({"model": run_whole}, rounds)["model"]
    pairs = {}
    for entry in manifest["pairs"]:
        ms = interleaved_medians({"now": runner(entry, "now")[0], "new": runner(entry, "new")[0]}, rounds)
        pairs[entry["key"]] = {"now_ms": ms["now"], "new_ms": ms["new"], "input_shape": entry["input_shape"]}
    return {"format": TABLE_FORMAT, "manifest_sha256": manifest_digest(folder), "model": manifest["model"],
            "planner": manifest["planner"], "runtime": runtime, "runtime_version": version,
            "precision": precision, "threads": threads, "rounds": rounds,
            "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
            "python": platform.python_version(), "wall_s": round(time.perf_counter() - start, 1),
            "whole": {"ms": whole_ms, "input_shape": whole["input_shape"]}, "pairs": pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="the folder fxrebirth profile wrote")
    parser.add_argument("--runtime", required=True, choices=RUNTIMES)
    parser.add_argument("--precision", choices=("f32", "bf16"), default="f32",
                        help="OpenVINO's INFERENCE_PRECISION_HINT (default f32)")
    parser.add_argument("--threads", type=int, default=None, help="threads per session (default: every core)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds per pair (default 20)")
    parser.add_argument("--output", help="the table (default BUNDLE/latency-<runtime>[-bf16].json)")
    args = parser.parse_args(argv)
    table = time_bundle(args.bundle, args.runtime, args.precision, args.threads, args.rounds)
    suffix = "" if args.precision == "f32" else f"-{args.precision}"
    output = args.output or os.path.join(args.bundle, f"latency-{args.runtime}{suffix}.json")
    with open(output, "w") as f:
        json.dump(table, f, indent=1)
    print(f"{len(table['pairs'])} pairs and the whole model timed under {table['runtime_version']} "
          f"({args.precision}, {table['threads']} threads) in {table['wall_s']} s: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
