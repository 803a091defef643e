"""Profile bundles: the planners' A/B timings taken on another device, and read back.

A planner times, for every merge it may choose, the layers the merge replaces (``now``) against the layer
that replaces them (``new``), and the whole model, under the runtime that will run it
(:func:`fxrebirth.retraining.planning.runtime_ab`). When that runtime runs on another device (a phone, an
edge board), :func:`write_bundle` exports the same micro-models as ONNX files with a manifest and a
timing script that needs only numpy and the runtime (:mod:`fxrebirth.measure.devicetimer`); the table
that script writes is read back by :func:`read_table`, which checks it was measured for the model, the
input size and the candidates being planned, and returns what ``runtime_ab`` would have.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import torch
from torch import nn

from fxrebirth.errors import FxRebirthError, first_line
from fxrebirth.measure import devicetimer, timing
from fxrebirth.measure.runners import export_onnx

__all__ = ["write_bundle", "read_table", "TableMismatch"]

log = logging.getLogger(__name__)

Pairs = dict[str, tuple[nn.Module, nn.Module, torch.Tensor]]


class TableMismatch(FxRebirthError, ValueError):
    """A latency table that was not measured for what is being planned."""


def write_bundle(folder: str, model_name: str, planner: str, pairs: Pairs, whole: tuple[nn.Module, torch.Tensor],
                 exporter: str = "torchscript") -> str:
    """Export ``whole`` and every pair of ``pairs`` (key -> ``(now, new, x)``) to ONNX in ``folder``, with
    ``manifest.json``, ``time_on_device.py`` and ``fxrebirth_timing.py``; return the manifest's path."""
    os.makedirs(folder, exist_ok=True)
    model, x = whole
    with torch.no_grad():
        export_onnx(model, x, os.path.join(folder, "model.onnx"), exporter)
        entries = []
        for i, (key, (now, new, xi)) in enumerate(pairs.items()):
            names = {"now": f"{i:03d}-now.onnx", "new": f"{i:03d}-new.onnx"}
            export_onnx(now, xi, os.path.join(folder, names["now"]), exporter)
            export_onnx(new, xi, os.path.join(folder, names["new"]), exporter)
            entries.append({"key": key, **names, "input_shape": list(xi.shape)})
    manifest = {"format": devicetimer.MANIFEST_FORMAT, "model": model_name, "planner": planner,
                "whole": {"file": "model.onnx", "input_shape": list(x.shape)}, "pairs": entries}
    path = os.path.join(folder, "manifest.json")
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.copyfile(devicetimer.__file__, os.path.join(folder, "time_on_device.py"))
    shutil.copyfile(timing.__file__, os.path.join(folder, "fxrebirth_timing.py"))
    log.info("profile bundle of %s: %d pairs and the whole model in %s", model_name, len(entries), folder)
    return path


def _load(table: str | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(table, dict):
        return table, "latency table"
    try:
        with open(table, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not text at all (UnicodeDecodeError)
        raise TableMismatch(f"latency table {table}: cannot be read as JSON ({first_line(exc, 120)}); give the "
                            "latency-*.json that time_on_device.py wrote") from None
    if not isinstance(data, dict):
        raise TableMismatch(f"latency table {table}: a JSON object is expected, got a {type(data).__name__}; give the "
                            "latency-*.json that time_on_device.py wrote")
    folder = os.path.dirname(table)
    manifest = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest) and data.get("manifest_sha256") != devicetimer.manifest_digest(folder):
        raise TableMismatch(f"latency table {table} was measured from another bundle than the manifest beside it "
                            f"({manifest}): time this bundle again")
    return data, str(table)


def read_table(table: str | dict[str, Any], planner: str, pairs: dict[str, tuple[int, ...]],
               whole_shape: tuple[int, ...]) -> tuple[float, dict[str, tuple[float, float]], str]:
    """From a device table (a path or its loaded JSON): the whole model's seconds and, per key of ``pairs``
    (key -> the input shape the planner would time it at), ``(now, new)`` seconds, and a line saying
    where they were measured. Raise :class:`TableMismatch`, saying what to do, when the table is for
    another planner, model size or set of candidates."""
    data, name = _load(table)
    if data.get("format") != devicetimer.TABLE_FORMAT:
        raise TableMismatch(f"{name}: not a {devicetimer.TABLE_FORMAT} table (format {data.get('format')!r}); "
                            "it is written by time_on_device.py from a bundle of `fxrebirth profile`")
    if data.get("planner") != planner:
        raise TableMismatch(f"{name} was profiled for the {data.get('planner')!r} planner, this is the {planner!r} "
                            "one: run `fxrebirth profile` with the --strategy options of this plan")
    try:
        return _timings(data, name, pairs, whole_shape)
    except TableMismatch:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise TableMismatch(f"{name}: a {devicetimer.TABLE_FORMAT} table with a missing or malformed entry "
                            f"({type(exc).__name__}: {first_line(exc, 80)}); time the bundle again") from None


def _timings(data: dict[str, Any], name: str, pairs: dict[str, tuple[int, ...]],
             whole_shape: tuple[int, ...]) -> tuple[float, dict[str, tuple[float, float]], str]:
    """:func:`read_table`'s timings from a table of the right format and planner."""
    again = "run `fxrebirth profile` again with this model and these options, and time the new bundle"
    if tuple(data["whole"]["input_shape"]) != tuple(whole_shape):
        raise TableMismatch(f"{name} was measured at input {data['whole']['input_shape']}, this plan is at "
                            f"{list(whole_shape)}: {again}")
    measured = data["pairs"]
    missing = [k for k in pairs if k not in measured]
    wrong = [k for k in pairs if k in measured and tuple(measured[k]["input_shape"]) != tuple(pairs[k])]
    if missing or wrong:
        which = (f"lacks {len(missing)} of the {len(pairs)} candidates (e.g. {missing[0]!r})" if missing
                 else f"has candidate {wrong[0]!r} at another input shape")
        raise TableMismatch(f"{name} ({data.get('model')}) {which}: {again}")
    out = {k: (measured[k]["now_ms"] / 1e3, measured[k]["new_ms"] / 1e3) for k in pairs}
    source = (f"device table {os.path.basename(name)}: {data.get('runtime_version')} {data.get('precision')}, "
              f"{data.get('threads')} threads, median of {data.get('rounds')} interleaved A/B rounds, "
              f"on {data.get('machine')}")
    return data["whole"]["ms"] / 1e3, out, source
