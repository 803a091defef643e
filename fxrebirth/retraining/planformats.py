"""Plan files of earlier versions, read as today's :class:`~fxrebirth.retraining.plandata.Plan` data.

fxrebirth 0.2 wrote two kinds of plan: the rebirth planner's (``regions`` of streamline and branch
regions with ``cost_now_s``/``cost_rebirth_s``) and the depth planner's (``candidates`` with
``latency_merged_s``, ``macs_*`` and a ``front``). Both convert without loss of what a plan decides: the
regions, their measured costs, importance and choice. Anything else is refused with what to do.
"""

from __future__ import annotations

from typing import Any

from fxrebirth.graph.regions import RegionError

__all__ = ["upgrade", "PLAN_FORMAT"]

PLAN_FORMAT = "fxrebirth-plan/3"
"""The ``format`` a plan file of today's :class:`~fxrebirth.retraining.plandata.Plan` carries."""


def _from_rebirth_plan(data: dict[str, Any]) -> dict[str, Any]:
    candidates = []
    for i, r in enumerate(data["regions"]):
        candidates.append({"region": r["region"], "latency_now_s": r["cost_now_s"],
                           "latency_new_s": r["cost_rebirth_s"], "importance": None, "span": [2 * i, 2 * i + 1],
                           "flops_now": r.get("flops_now", 0), "flops_new": r.get("flops_rebirth", 0),
                           "depth_now": r.get("depth_now", 0), "depth_new": r.get("depth_rebirth", 0),
                           "selected": r.get("selected", False)})
    kinds = list(dict.fromkeys(c["region"]["kind"] for c in candidates))
    return {"model": data["model"], "input_shape": data["input_shape"], "latency_s": data["latency_s"],
            "source": data["source"], "candidates": candidates, "strategies": kinds}


def _from_depth_plan(data: dict[str, Any]) -> dict[str, Any]:
    candidates = [{"region": c["region"], "latency_now_s": c["latency_now_s"], "latency_new_s": c["latency_merged_s"],
                   "importance": c["importance"], "span": c["span"], "flops_now": 2 * c.get("macs_now", 0),
                   "flops_new": 2 * c.get("macs_merged", 0), "selected": c.get("selected", False)}
                  for c in data["candidates"]]
    return {"model": data["model"], "input_shape": data["input_shape"], "latency_s": data["latency_s"],
            "source": data["source"], "candidates": candidates, "strategies": ["depth"],
            "calibration_shape": data.get("calibration_shape"), "front": data.get("front", [])}


def upgrade(data: Any) -> dict[str, Any]:
    """``data`` (a plan file's JSON) as today's plan fields."""
    if not isinstance(data, dict):
        raise RegionError("not a plan file: write one with `fxrebirth plan MODEL --save PLAN.json`")
    if data.get("format") == PLAN_FORMAT:
        return {k: v for k, v in data.items() if k != "format"}
    if "regions" in data and "candidates" not in data:
        return _from_rebirth_plan(data)
    if "candidates" in data and "calibration_shape" in data and "format" not in data:
        return _from_depth_plan(data)
    raise RegionError(f"a plan file of format {data.get('format', 'unknown')!r}, which this fxrebirth cannot read; "
                      "plan again with `fxrebirth plan MODEL --save PLAN.json`")
