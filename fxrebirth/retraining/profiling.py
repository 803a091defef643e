"""Plan for a device that is not this machine: export what the planner would time, time it there.

``fxrebirth.retraining.profiling.profile(model, x, folder)`` (``fxrebirth profile MODEL --out DIR``)
writes a bundle (:mod:`fxrebirth.measure.bundle`): the whole model and, for every candidate merge of the
chosen planner, the layers it replaces and the layer replacing them, as ONNX files, with a manifest and
``time_on_device.py``, which needs only numpy and ONNX Runtime or OpenVINO. The table it writes on the
device goes back to the same planner, with the same options:
``plan(model, x, device_table=path)`` (the retraining tier's regions: LRN and pooling chains, inception
modules) or ``plan_depth(model, x, calibration, device_table=path)`` (depth merges). The candidates come
from the same marking the planner runs, so a table fits exactly the plans it was profiled for; another
model, input size or candidate set is refused with what to do.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fxrebirth.graph.capture import as_input_tuple, capture
from fxrebirth.measure.bundle import write_bundle

__all__ = ["profile"]


def profile(model: nn.Module, example_inputs: Any, folder: str, *, depth: bool = False, max_convs: int = 4,
            prune: str = "grown", reduce_ratio: float | None = None, collapse_reduce: bool = False,
            streamline_kernel: str = "field", leaf_modules: tuple = ()) -> str:
    """Write the profile bundle of ``model`` at ``example_inputs`` (the deployment input) to ``folder``;
    return the manifest's path. ``depth``: the candidates of
    :func:`~fxrebirth.retraining.depthplan.plan_depth` (with ``max_convs``, ``prune``), otherwise the regions
    of :func:`~fxrebirth.retraining.planning.plan` (with ``reduce_ratio``, ``collapse_reduce``,
    ``streamline_kernel``, ``leaf_modules``). The model is not changed."""
    inputs = as_input_tuple(example_inputs)
    if depth:
        import copy

        from fxrebirth.retraining.depthplan import candidates, segment_pairs

        gm = capture(copy.deepcopy(model).eval(), inputs, copy_model=False)
        pairs = segment_pairs(gm, candidates(gm, max_convs, prune))
    else:
        from fxrebirth.retraining.planning import mark_regions, region_pairs

        gm = capture(model, inputs, leaf_modules=leaf_modules)
        pairs = region_pairs(gm, mark_regions(gm, reduce_ratio=reduce_ratio, collapse_reduce=collapse_reduce,
                                              streamline_kernel=streamline_kernel))
    return write_bundle(folder, type(model).__name__, "depth" if depth else "regions", pairs, (gm, inputs[0]))
