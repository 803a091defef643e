"""Plan for a device that is not this machine: export what the planner would time, time it there.

``fxrebirth.retraining.profiling.profile(model, x, folder)`` (``fxrebirth profile MODEL --out DIR``)
writes a bundle (:mod:`fxrebirth.measure.bundle`): the whole model and, for every candidate merge of the
chosen planner, the layers it replaces and the layer replacing them, as ONNX files, with a manifest and
``time_on_device.py``, which needs only numpy and ONNX Runtime or OpenVINO. The table it writes on the
device goes back to the same planner, with the same options:
``fxrebirth.plan(model, x, device_table=path)`` with the same strategies and options. The candidates come
from the same marking the planner runs, so a table fits exactly the plans it was profiled for; another
model, input size or candidate set is refused with what to do.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fxrebirth.graph.capture import as_input_tuple, capture
from fxrebirth.measure.bundle import write_bundle

__all__ = ["profile"]


def profile(model: nn.Module, example_inputs: Any, folder: str, *, strategies: Any = None, leaf_modules: tuple = (),
            **options: Any) -> str:
    """Write the profile bundle of ``model`` at ``example_inputs`` (the deployment input) to ``folder``;
    return the manifest's path. The candidates are those :func:`fxrebirth.plan` marks with the same
    ``strategies`` and ``options`` (:func:`fxrebirth.retraining.planning.mark`). The model is not changed."""
    import copy

    from fxrebirth.retraining.planning import mark, planner_name
    from fxrebirth.retraining.timing import candidate_pairs

    inputs = as_input_tuple(example_inputs)
    gm = capture(copy.deepcopy(model).eval(), inputs, leaf_modules=leaf_modules, copy_model=False)
    found = mark(gm, strategies=strategies, **options)
    pairs = candidate_pairs(gm, [r for regions in found.values() for r in regions])
    return write_bundle(folder, type(model).__name__, planner_name(found), pairs, (gm, inputs[0]))
