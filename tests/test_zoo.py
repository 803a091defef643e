"""The CI sample of the model zoo (tests.support.zoo; the whole zoo: benchmarks/zoo_sweep.py).

Small models of the re-parameterisable timm families and of a dozen other CNN families, built with
random weights and randomised BatchNorm, through each entry point (``fxrebirth.optimize``, the
``torch.compile`` backend, ``torch.export`` + ``optimize_exported``) at a small input: float32
norm-wise relative error against the original at batch 2 within ``tolerance(torch.float32)``; for
``optimize`` (and export) no BatchNorm left that a neighbouring layer could absorb; and for the
re-parameterisable families no more convolutions than timm's own ``reparameterize_model`` leaves.
"""

from __future__ import annotations

import pytest
import torch

from fxrebirth.equivalence import tolerance

pytest.importorskip("timm")
from tests.support.zoo_sweep import ENTRY_POINTS, sweep_one  # noqa: E402 - timm first

REPARAMETERISABLE = [("timm", n, 64) for n in (
    "repvgg_a0", "mobileone_s0", "fastvit_t8", "repvit_m0_9", "repghostnet_050", "ghostnetv3_050")]
OTHERS = [
    ("torchvision", "resnet18", 64),
    ("torchvision", "mnasnet0_5", 64),
    ("torchvision", "shufflenet_v2_x0_5", 64),
    ("timm", "regnetx_002", 64),
    ("timm", "efficientnet_b0", 64),
    ("timm", "mobilenetv3_small_050", 64),
    ("timm", "ghostnet_050", 64),
    ("timm", "dla46_c", 64),
    ("timm", "ese_vovnet19b_slim_dw", 64),
    ("timm", "cs3darknet_s", 64),
    ("timm", "dpn48b", 64),
    ("timm", "rexnet_100", 64),
    ("timm", "hrnet_w18_small", 64),
    ("timm", "lcnet_050", 64),
]
# the ci profile runs 7 of the 20; these run in the thorough profile: 20-140 s each (mobileone_s0: over 6x
# repvgg_a0's time, its branches are repvgg_a0's and repvit_m0_9's kinds, both in ci), or (the two torchvision
# models) built from the torchvision code that tests/test_torchvision.py optimises and tests/test_backend.py and
# tests/test_export.py put through the backend and torch.export (resnet18, mobilenet_v2's inverted residuals)
HEAVY = {"fastvit_t8", "repghostnet_050", "ghostnetv3_050", "shufflenet_v2_x0_5", "mobilenetv3_small_050",
         "ghostnet_050", "dpn48b", "rexnet_100", "hrnet_w18_small", "lcnet_050", "resnet18", "mnasnet0_5",
         "mobileone_s0"}
MODELS = [pytest.param(*m, marks=pytest.mark.thorough, id=f"{m[0]}:{m[1]}") if m[1] in HEAVY else
          pytest.param(*m, id=f"{m[0]}:{m[1]}") for m in REPARAMETERISABLE + OTHERS]


@pytest.mark.parametrize(("source", "name", "size"), MODELS)
def test_zoo_model_is_equivalent_and_folded(source, name, size, reset_dynamo):
    """One build per model (the three entry points share it and its float64 reference)."""
    row = sweep_one(source, name, size=size)
    assert row["built"], row.get("reason")
    problems = [f"{point}: {p}" for point in ENTRY_POINTS for p in _problems(row, point)]
    assert not problems, f"{source}:{name}: " + "; ".join(problems)


def _problems(row: dict, point: str) -> list[str]:
    entry = row[point]
    problems = []
    if entry["status"] != "ok":
        problems.append(f"{entry['status']}: {entry.get('reason')}")
    if isinstance(entry.get("error"), float) and not entry["error"] <= tolerance(torch.float32):
        problems.append(f"float32 relative error {entry['error']:.3e} > {tolerance(torch.float32):.0e}")
    if point in ("optimize", "export") and entry.get("foldable_left"):
        problems.append(f"{entry['foldable_left']} foldable BatchNorm(s) left")
    if point == "optimize" and row["reparameterisable"] and entry.get("convs_after") is not None:
        timm_convs = entry.get("convs_timm_reparam")
        if not isinstance(timm_convs, int):
            problems.append(f"timm's reparameterize_model failed: {timm_convs}")
        elif entry["convs_after"] > timm_convs:
            problems.append(f"{entry['convs_after']} convolutions left, timm's reparameterize_model leaves {timm_convs}")
    return problems
