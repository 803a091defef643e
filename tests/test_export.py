"""torch.export programs in and out, and ONNX export of optimised models run in ONNX Runtime."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, note, settings

import fxrebirth
from fxrebirth.export import optimize_exported
from fxrebirth.testing import randomize_batchnorm, tolerance
from fxrebirth.testing.graphs import random_graphs

MODELS = ["googlenet", "resnet50", "mobilenet_v2"]


def _tv(name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"init_weights": False} if name == "googlenet" else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return randomize_batchnorm(model).eval()


def _close(actual, expected, dtype=torch.float32):
    actual, expected = torch.as_tensor(np.asarray(actual)).double(), torch.as_tensor(np.asarray(expected)).double()
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= tolerance(dtype), error


@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_exported_program_in_and_out(name, decomposed, tmp_path):
    model = _tv(name)
    x = torch.randn(2, 3, 64, 64)
    program = torch.export.export(model, (x,))
    if decomposed:
        program = program.run_decompositions()
    optimized, report = optimize_exported(program)
    assert report.stats("bn_into_preceding").rewrites > 0
    kinds = {str(n.target) for n in optimized.graph.nodes if n.op == "call_function"}
    assert not any("batch_norm" in k for k in kinds), kinds
    path = tmp_path / "model.pt2"
    torch.export.save(optimized, str(path))
    loaded = torch.export.load(str(path))
    with torch.no_grad():
        _close(loaded.module()(x), model(x))


def test_any_optimised_model_exports():
    model = _tv("resnet18")
    x = torch.randn(1, 3, 32, 32)
    gm, _ = fxrebirth.optimize(model, x)
    program = torch.export.export(gm, (x,))
    with torch.no_grad():
        _close(program.module()(x), model(x))


def test_bad_program_argument():
    with pytest.raises(fxrebirth.CaptureError, match="expected a torch.export.ExportedProgram"):
        optimize_exported(torch.nn.Linear(2, 2))


ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install fxrebirth[onnx]")


def _run_onnx(model, x, path, dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, opset_version=18 if dynamo else 17)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
@pytest.mark.parametrize("name", MODELS)
def test_optimised_model_runs_in_onnx_runtime(name, dynamo, tmp_path):
    model = _tv(name)
    x = torch.randn(1, 3, 64, 64)
    gm, _ = fxrebirth.optimize(model, x)
    with torch.no_grad():
        _close(_run_onnx(gm, x, tmp_path / "m.onnx", dynamo)[0], model(x))


@settings(max_examples=15)
@given(gm=random_graphs(dtype=torch.float32))
def test_random_graphs_export_to_onnx(gm, tmp_path_factory):
    note(gm.code)
    x = torch.randn(2, gm.meta["in_channels"], 6, 6)
    optimized, _ = fxrebirth.optimize(gm, x)
    with torch.no_grad():
        expected = gm(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    outputs = _run_onnx(optimized, x, tmp_path_factory.mktemp("g") / "g.onnx", False)
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        _close(out, ref)
