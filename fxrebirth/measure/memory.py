"""Peak memory of inference, each variant measured in a process of its own: :func:`inference_memory` starts
``python -m fxrebirth.measure.speed memory ...`` and reads its answer, :func:`memory_child` is what that
process runs (the ``__main__`` block of :mod:`fxrebirth.measure.speed` calls it).
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import pickle
import subprocess
import sys
from typing import Sequence

import torch

from fxrebirth.measure.runtimes import get_runtime, register_runtime

__all__ = ["inference_memory", "memory_child"]

log = logging.getLogger(__name__)

_RECORD = "FXREBIRTH_MEMORY_RUNTIME"
"""The environment variable through which the child receives the runtime's record (pickled, base64)."""


def inference_memory(model_path: str, runtime: str, shape: Sequence[int], timeout_s: float = 600) -> dict[str, float]:
    """Peak memory of inference in a fresh process (a process's peak only grows, so every variant needs
    its own). ``model_path``: a whole pickled module (``torch.save(model)``, a file this module wrote) for
    the PyTorch runtimes, the file a file runtime runs (``.onnx``, ``.pte``) for the others. Returns MB: ``baseline_mb`` (resident after
    importing the runtime), ``peak_mb`` (the process's peak while running inference, after loading and
    compiling and one warm-up call) and ``inference_mb`` (their difference)."""
    cmd = [sys.executable, "-m", "fxrebirth.measure.speed", "memory", model_path, runtime, ",".join(map(str, shape)),
           str(torch.get_num_threads())]
    env = dict(os.environ)
    try:  # the child learns the record too: a runtime registered in this process only (a plug-in, a test)
        env[_RECORD] = base64.b64encode(pickle.dumps(get_runtime(runtime))).decode()
    except (pickle.PicklingError, AttributeError, TypeError) as exc:  # a lambda in the record: the child's registry
        log.debug("runtime %s not handed to the memory process: %s", runtime, exc)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
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


def memory_child(model_path: str, runtime: str, shape: str, threads: str) -> None:
    """The process :func:`inference_memory` starts (Linux: reads VmRSS/VmHWM, resets the peak through
    /proc/self/clear_refs so that loading and compiling do not count)."""
    torch.set_num_threads(int(threads))
    x = torch.randn(*map(int, shape.split(",")))
    if os.environ.get(_RECORD):  # written by inference_memory, the parent of this process
        register_runtime(pickle.loads(base64.b64decode(os.environ[_RECORD])), replace=True)  # noqa: S301
    record = get_runtime(runtime)
    if record.module is not None:
        importlib.import_module(record.module)  # the runtime's own memory belongs to the baseline
    baseline = _status_kb("VmRSS")
    if record.runs_file:
        run = record.run(model_path, x)
    else:
        model = torch.load(model_path, weights_only=False).eval()  # written by inference_memory's caller
        run = record.run(model, x)
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
