"""torch.export programs in and out, and ONNX export of optimised models run in ONNX Runtime."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, note, settings

import fxrebirth
from fxrebirth.frontends.export import optimize_exported
from fxrebirth.testing import randomize_batchnorm, tolerance
from fxrebirth.testing.graphs import random_graphs

# the ci profile: GoogLeNet (concatenated branches, 1x1 convolutions) and MobileNetV2 (depthwise
# convolutions, residual adds) through every export path; ResNet-50 (residual adds and 1x1 convolutions
# again; resnet18 goes through optimize + torch.export below) in the thorough profile
MODELS = ["googlenet", pytest.param("resnet50", marks=pytest.mark.thorough), "mobilenet_v2"]


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


@pytest.fixture(scope="module")
def built():
    """``get(key, make)``: ``make()``'s result, made once per module for each key (a model exported or
    optimised once serves every variant of a test; nothing here modifies it)."""
    cache: dict = {}

    def get(key, make):
        if key not in cache:
            cache[key] = make()
        return cache[key]

    yield get
    cache.clear()


def _exported(name):
    model = _tv(name)
    x = torch.randn(2, 3, 64, 64)
    return model, x, torch.export.export(model, (x,))


@pytest.mark.parametrize("decomposed", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_exported_program_in_and_out(name, decomposed, tmp_path, built):
    model, x, program = built(("export", name), lambda: _exported(name))
    if decomposed:
        program = program.run_decompositions()  # a new program: the shared one is left as it was
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


def _optimised(name):
    model = _tv(name)
    x = torch.randn(1, 3, 64, 64)
    return model, x, fxrebirth.optimize(model, x)[0]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_exporter", "dynamo_exporter"])
@pytest.mark.parametrize("name", MODELS)
def test_optimised_model_runs_in_onnx_runtime(name, dynamo, tmp_path, built):
    model, x, gm = built(("onnx", name), lambda: _optimised(name))
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


# -- in-place ATen overloads: exported programs keep aten.add_ / aten.relu_ / aten.hardtanh_ --------

class _InPlaceSum(torch.nn.Module):
    """GhostNetV3's and timm's residual spelling: ``out = bn(x); out += conv(x)`` and in-place activations,
    which torch.export keeps as ``aten.add_.Tensor`` / ``aten.relu_.default``."""

    def __init__(self, write_input: bool = False):
        super().__init__()
        nn = torch.nn
        self.write_input = write_input
        self.bn = nn.BatchNorm2d(6)
        self.a = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.b = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6))
        self.act = nn.ReLU6(inplace=True)
        self.head = nn.Sequential(nn.Conv2d(6, 4, 1, bias=False), nn.BatchNorm2d(4))

    def forward(self, x):
        if self.write_input:
            x.mul_(0.5)  # a write to the program's input: kept, and nothing moves across it
        out = self.bn(x)
        out += self.a(x)
        out += self.b(x)
        y = self.act(out)
        z = self.head(y)
        z.relu_()
        return z, y


@pytest.mark.parametrize("decomposed", [False, True])
def test_in_place_aten_ops_fold_when_exact(decomposed):
    model = randomize_batchnorm(_InPlaceSum()).eval()
    x = torch.randn(2, 6, 10, 10)
    dims = {0: torch.export.Dim.DYNAMIC, 2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC}
    program = torch.export.export(model, (x,), dynamic_shapes={"x": dims})
    if decomposed:
        program = program.run_decompositions()
    assert any(str(n.target).startswith(("aten.add_", "aten.relu_", "aten.hardtanh_")) for n in program.graph.nodes) \
        or decomposed  # (decompositions functionalise them already)
    optimized, report = optimize_exported(program)
    targets = [str(n.target) for n in optimized.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in targets), targets
    assert sum("conv" in t for t in targets) == 2  # the three branches are one conv, the head another
    for batch, size in ((2, 10), (3, 13), (2, 7)):  # the dynamic sizes of the input program are kept
        x = torch.randn(batch, 6, size, size)
        with torch.no_grad():
            for got, want in zip(optimized.module()(x.clone()), model(x.clone())):
                _close(got, want)


def test_a_write_to_the_programs_input_is_kept():
    model = randomize_batchnorm(_InPlaceSum(write_input=True)).eval()
    x = torch.randn(2, 6, 10, 10)
    program = torch.export.export(model, (x.clone(),))
    optimized, report = optimize_exported(program)
    mine, theirs = x.clone(), x.clone()
    with torch.no_grad():
        for got, want in zip(optimized.module()(mine), model(theirs)):
            _close(got, want)
    assert torch.equal(mine, theirs)  # the input was written the same way


class _Flatten(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).view(2, 4 * 6 * 6)  # runs at its example's shape only


def test_sizes_the_original_refuses_are_skipped_quietly(capsys):
    """A traced model with a literal view runs at one shape: the whole-model check's other sizes fail in
    the original, are skipped, and torch.fx's printout of the failing generated line stays hidden."""
    original = torch.fx.symbolic_trace(randomize_batchnorm(_Flatten()).eval())
    optimized, report = fxrebirth.optimize(original, (torch.randn(2, 3, 8, 8),))
    assert "Call using an FX-traced Module" not in capsys.readouterr().err
    assert report.rules["bn_into_preceding"].rewrites == 1
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(optimized(x), original(x), atol=1e-5)


def test_what_a_model_writes_to_stderr_on_a_run_that_works_still_shows(capsys):
    import sys

    class Chatty(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            print("chatty forward", file=sys.stderr)
            return self.bn(self.conv(x))

    fxrebirth.optimize(Chatty().eval(), (torch.randn(2, 3, 8, 8),), verify=False)
    assert "chatty forward" in capsys.readouterr().err
