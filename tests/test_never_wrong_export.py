"""Never silently wrong through an export (issue 37): a size guard is never dropped by an exporter, a
program with dynamic dims keeps them through ``optimize_exported``, and batch-1 programs after
``run_decompositions()`` optimise.

A module whose rewrite is exact only at some sizes (:mod:`fxrebirth.graph.guards`) is exported with
a dynamic height or width by the user's own call (``torch.onnx.export`` with either exporter,
``torch.export.export``): the export must refuse, naming the rule, or the file must match the model at
a second size in ONNX Runtime. Sizes the guard does not read (the batch) stay dynamic.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import torchvision
from torch import nn

import fxrebirth
from fxrebirth.frontends.deploy import export_model
from fxrebirth.frontends.export import optimize_exported
from fxrebirth.graph.guards import DynamicSizeGuardError, SizeGuard, Geometry
from fxrebirth.testing import randomize_batchnorm

ort = pytest.importorskip("onnxruntime")
DYNAMIC = torch.export.Dim.DYNAMIC


# ------------------------------------------------------------------------------------------ models


def _ceil_avg_merge() -> nn.Module:
    """A conv, a ceil-mode average pooling and a 1x1 conv: merged into one strided conv, exact where the
    pooling has no partial window (even sizes here)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2, ceil_mode=True), nn.Conv2d(4, 4, 1))


def _resnet_d_shortcut() -> nn.Module:
    """timm's ResNet-D ``avg_down`` shortcut: a ceil-mode 2x2 average pooling (padding not counted), a 1x1
    conv and a BatchNorm, after a conv stem."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False),
                         nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16))


class _LiteralView(nn.Module):
    """LeNet's ``x.view(-1, 16 * 5 * 5)`` after a flatten: a no-op at the example's size (removed, with a
    guard on its literal), a different shape at another size where the original still runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 2, 3, padding=1), nn.BatchNorm2d(2)

    def forward(self, x):
        return torch.flatten(self.bn(self.conv(x)), 1).view(-1, 2 * 8 * 8)


GUARDED = {"ceil_avg_merge": (_ceil_avg_merge, "merge_conv_chain"),
           "resnet_d_shortcut": (_resnet_d_shortcut, "merge_conv_chain"),
           "literal_view": (_LiteralView, "remove_noop_reshape")}
SIZE = 8  # the example's height and width; 9 gives a partial ceil window, 16 a different view


def _optimised(name: str, batch: int = 2):
    factory, rule = GUARDED[name]
    model = randomize_batchnorm(factory()).eval()
    x = torch.randn(batch, 3, SIZE, SIZE)
    gm, report = fxrebirth.optimize(model, x, cost_model=None)
    assert any(rule in g for g in report.guards), report.guards  # the case really has a guard
    return model, gm, x, rule


@contextlib.contextmanager
def _quiet():
    """The exporters' progress lines and warnings kept out of the test's output."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _ort(path: str, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _matches(model: nn.Module, got: torch.Tensor, x: torch.Tensor) -> None:
    with torch.no_grad():
        want = model(x)
    assert got.shape == want.shape and fxrebirth.relative_error(want, got) <= 1e-5


# -------------------------------------------------- item 1: ONNX exports with dynamic sizes refuse


@pytest.mark.parametrize("axes", [{2: "h", 3: "w"}, [2, 3], {3: "w"}])
@pytest.mark.parametrize("name", sorted(GUARDED))
def test_torchscript_onnx_export_with_dynamic_spatial_axes_refuses_naming_the_rule(name, axes, tmp_path):
    model, gm, x, rule = _optimised(name)
    with _quiet(), pytest.raises(DynamicSizeGuardError, match=rf"disable=\['{rule}'\]") as info:
        torch.onnx.export(gm, (x,), str(tmp_path / "m.onnx"), dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": axes})
    assert info.value.rule == rule and "export with those sizes fixed" in str(info.value)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_torchscript_onnx_export_with_a_dynamic_batch_runs_at_other_batches_and_refuses_other_sizes(name, tmp_path):
    model, gm, x, _ = _optimised(name)
    path = str(tmp_path / "m.onnx")
    with _quiet():
        torch.onnx.export(gm, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    for batch in (2, 5):
        probe = torch.randn(batch, 3, SIZE, SIZE)
        _matches(model, _ort(path, probe), probe)
    for size in (SIZE + 1, 2 * SIZE):  # the file's height is fixed: ONNX Runtime refuses, never wrong
        with pytest.raises(Exception, match="(?i)dimension|shape"):
            _ort(path, torch.randn(2, 3, size, size))


@pytest.mark.parametrize("name, spec", [("ceil_avg_merge", {2: DYNAMIC, 3: DYNAMIC}),
                                        ("resnet_d_shortcut", {3: torch.export.Dim("w", min=2, max=64)}),
                                        ("literal_view", {2: DYNAMIC})])
def test_dynamo_onnx_export_with_dynamic_spatial_dims_refuses_naming_the_rule(name, spec, tmp_path):
    model, gm, x, rule = _optimised(name)
    with _quiet(), pytest.raises(Exception) as info:  # the exporter wraps torch.export's error in its own
        torch.onnx.export(gm, (x,), str(tmp_path / "m.onnx"), dynamo=True, dynamic_shapes=(spec,))
    assert "DynamicSizeGuardError" in str(info.value) and rule in str(info.value)
    assert not (tmp_path / "m.onnx").exists()


def test_dynamo_onnx_export_given_old_style_dynamic_axes_refuses_too(tmp_path):
    model, gm, x, rule = _optimised("ceil_avg_merge")
    with _quiet(), pytest.raises(Exception) as info:
        torch.onnx.export(gm, (x,), str(tmp_path / "m.onnx"), dynamo=True, input_names=["x"],
                          dynamic_axes={"x": {2: "h", 3: "w"}})
    assert rule in str(info.value)


@pytest.mark.parametrize("name", ["ceil_avg_merge", "literal_view"])
def test_dynamo_onnx_export_with_a_dynamic_batch_runs_at_other_batches(name, tmp_path):
    model, gm, x, _ = _optimised(name)
    path = str(tmp_path / "m.onnx")
    with _quiet():
        torch.onnx.export(gm, (x,), path, dynamo=True, dynamic_shapes=({0: DYNAMIC},))
    for batch in (2, 3):
        probe = torch.randn(batch, 3, SIZE, SIZE)
        _matches(model, _ort(path, probe), probe)
    with pytest.raises(Exception):
        _ort(path, torch.randn(2, 3, SIZE + 1, SIZE + 1))


@pytest.mark.parametrize("dynamo", [False, True])
def test_an_unguarded_optimised_module_still_exports_with_dynamic_spatial_sizes(dynamo, tmp_path):
    """The refusal is the guard's alone: conv + BN + ReLU folds at every size, and stays dynamic."""
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                              nn.Conv2d(4, 4, 1))).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    gm, report = fxrebirth.optimize(model, x, cost_model=None)
    assert report.rewrites and not report.guards
    path = str(tmp_path / "m.onnx")
    with _quiet():
        if dynamo:
            torch.onnx.export(gm, (x,), path, dynamo=True, dynamic_shapes=({2: DYNAMIC, 3: DYNAMIC},))
        else:
            torch.onnx.export(gm, (x,), path, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {2: "h", 3: "w"}})
    for size in (SIZE, 13):
        probe = torch.randn(2, 3, size, size + 2)
        _matches(model, _ort(path, probe), probe)


# ------------------------------------------------------- item 4: torch.export and fxrebirth export


@pytest.mark.parametrize("spec", [{2: DYNAMIC}, {2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO},
                                  {3: torch.export.Dim("w", min=2, max=64)}], ids=["DYNAMIC", "AUTO", "named"])
@pytest.mark.parametrize("name", sorted(GUARDED))
def test_torch_export_with_dynamic_spatial_dims_refuses_naming_the_rule(name, spec):
    _, gm, x, rule = _optimised(name)
    with _quiet(), pytest.raises(DynamicSizeGuardError, match=rule):
        torch.export.export(gm, (x,), dynamic_shapes=(spec,))


def test_strict_torch_export_refuses_too():
    """Dynamo traces the guard itself; its own error carries ours."""
    _, gm, x, rule = _optimised("ceil_avg_merge")
    with _quiet(), pytest.raises(Exception) as info:
        torch.export.export(gm, (x,), dynamic_shapes=({2: DYNAMIC},), strict=True)
    assert "DynamicSizeGuardError" in str(info.value) and rule in str(info.value)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", sorted(GUARDED))
def test_torch_export_at_fixed_sizes_or_a_dynamic_batch_keeps_working(name, strict):
    model, gm, x, _ = _optimised(name)
    with _quiet():
        program = torch.export.export(gm, (x,), dynamic_shapes=({0: DYNAMIC},), strict=strict)
    probe = torch.randn(3, 3, SIZE, SIZE)
    _matches(model, program.module()(probe), probe)


def test_a_static_export_at_a_size_the_guard_refuses_raises_the_guards_error():
    model, gm, _, rule = _optimised("ceil_avg_merge")
    with _quiet(), pytest.raises(fxrebirth.ShapeGuardError, match=rule) as info:
        torch.export.export(gm, (torch.randn(2, 3, SIZE + 1, SIZE + 1),))
    assert not isinstance(info.value, DynamicSizeGuardError)


@pytest.mark.parametrize("name", sorted(GUARDED))
def test_fxrebirth_export_to_onnx_of_a_guarded_module_is_checked_and_refuses_other_sizes(name, tmp_path):
    model, gm, x, _ = _optimised(name, batch=1)
    written = export_model(gm, x, "onnx", str(tmp_path / "m.onnx"))
    probe = torch.randn(3, 3, SIZE, SIZE)  # any batch
    _matches(model, _ort(written.path, probe), probe)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        _ort(written.path, torch.randn(1, 3, SIZE + 1, SIZE + 1))


def test_the_ceil_window_condition_is_pytorchs_at_every_small_geometry():
    """The branch-free condition (it must also take symbolic sizes) against PyTorch's own output sizes:
    whole windows exactly where ceil and floor mode give the same number of windows."""
    cases = 0
    for k in range(1, 5):
        for s in range(1, 4):
            for p in range(k // 2 + 1):
                guard = SizeGuard("t", ceil_pool=Geometry((k, 1), (s, 1), (p, 0), (1, 1)))
                for n in range(max(1, k - 2 * p), 20):
                    x = torch.empty(1, 1, n, 1, device="meta")
                    same = nn.functional.avg_pool2d(x, (k, 1), (s, 1), (p, 0), ceil_mode=True).shape == \
                        nn.functional.avg_pool2d(x, (k, 1), (s, 1), (p, 0), ceil_mode=False).shape
                    assert guard.holds((1, 1, n, 1)) == same, (k, s, p, n)
                    cases += 1
    assert cases > 300


# -------------------------------------------- item 2: optimize_exported keeps the dynamic dims


def _program(model: nn.Module, x: torch.Tensor, dims: dict | None, decomposed: bool):
    with _quiet():
        program = torch.export.export(model, (x,), dynamic_shapes=(dims,) if dims else None)
        return program.run_decompositions() if decomposed else program


@pytest.mark.parametrize("name, decomposed", [("ceil_avg_merge", False), ("ceil_avg_merge", True),
                                              ("resnet_d_shortcut", True)])
def test_optimize_exported_skips_a_size_specific_rewrite_on_dynamic_dims(name, decomposed):
    model = randomize_batchnorm(GUARDED[name][0]()).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    program = _program(model, x, {0: DYNAMIC, 2: DYNAMIC, 3: DYNAMIC}, decomposed)
    with _quiet():
        optimized, report = optimize_exported(program, cost_model=None)
    assert not report.guards
    assert any("'merge_conv_chain' disabled" in c and "ceil-mode pooling" in c for c in report.checks), report.checks
    targets = [str(n.target) for n in optimized.graph.nodes if n.op == "call_function"]
    assert not any("batch_norm" in t for t in targets), targets  # the other rules still ran
    for batch, h, w in ((2, SIZE, SIZE), (3, SIZE + 1, SIZE + 3), (1, 5, 12)):  # odd sizes: partial windows
        probe = torch.randn(batch, 3, h, w)
        _matches(model, optimized.module()(probe), probe)


def test_optimize_exported_keeps_the_size_specific_rewrite_where_the_sizes_are_static_or_only_the_batch_is_dynamic():
    model = randomize_batchnorm(_ceil_avg_merge()).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    for dims in (None, {0: DYNAMIC}):
        with _quiet():
            optimized, report = optimize_exported(_program(model, x, dims, False), cost_model=None)
        assert report.stats("merge_conv_chain").rewrites >= 1 and any("merge_conv_chain" in g for g in report.guards)
        assert not any("disabled" in c for c in report.checks)
        probe = torch.randn(3 if dims else 2, 3, SIZE, SIZE)
        _matches(model, optimized.module()(probe), probe)


def test_optimize_exported_keeps_the_users_own_disable():
    """The user's disable= is kept beside the rules disabled for the dynamic dims."""
    model = randomize_batchnorm(_resnet_d_shortcut()).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with _quiet():
        optimized, report = optimize_exported(_program(model, x, {2: DYNAMIC, 3: DYNAMIC}, False), cost_model=None,
                                              disable=["bn_into_following"])
    assert "bn_into_following" not in report.rules and "merge_conv_chain" not in report.rules
    assert report.stats("bn_into_preceding").rewrites >= 1
    probe = torch.randn(2, 3, 11, 7)
    _matches(model, optimized.module()(probe), probe)


# --------------------------------------------- item 3: batch-1 programs after run_decompositions


class _FlattenLinear(nn.Module):
    """A conv, BN, ReLU, then flatten and a Linear sized for the example: a decomposed batch-1 program
    reshapes to the literal ``[1, 4 * 14 * 14]``, so it runs at batch 1 only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 14 * 14, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def _tiny_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock

    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, 2, 1), BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def _tiny_mobilenet() -> nn.Module:
    from torchvision.models.mobilenetv2 import InvertedResidual

    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                         InvertedResidual(8, 16, 2, 6), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 10))


class _ViewOne(nn.Module):
    """``x.view(1, -1)``: the model runs at batch 1 only, in any entry point."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).view(1, -1))


@pytest.mark.parametrize("factory, decomposed", [(_FlattenLinear, True), (_FlattenLinear, False), (_ViewOne, True),
                                                 (_tiny_resnet, True), (_tiny_mobilenet, True)],
                         ids=["flatten_linear", "flatten_linear-as-exported", "view_one", "resnet", "mobilenet_v2"])
def test_a_batch_one_program_optimises(factory, decomposed):
    model = randomize_batchnorm(factory()).eval()
    x = torch.randn(1, 3, 16, 16)
    with _quiet():
        optimized, report = optimize_exported(_program(model, x, None, decomposed))
    assert report.rewrites >= 1
    probe = torch.randn(1, 3, 16, 16)
    _matches(model, optimized.module()(probe), probe)


def test_optimize_on_a_model_that_runs_only_at_batch_one_checks_at_the_example():
    model = randomize_batchnorm(_ViewOne()).eval()
    x = torch.randn(1, 3, 16, 16)
    gm, report = fxrebirth.optimize(model, x)
    assert report.rewrites >= 1 and any("example" in c for c in report.checks), report.checks
    _matches(model, gm(x), x)


@pytest.mark.thorough
@pytest.mark.parametrize("name, size", [("resnet18", 32), ("mobilenet_v2", 32)])
def test_a_batch_one_torchvision_program_after_run_decompositions_optimises(name, size):
    with _quiet():
        model = randomize_batchnorm(torchvision.models.get_model(name, weights=None, num_classes=10)).eval()
    x = torch.randn(1, 3, size, size)
    with _quiet():
        optimized, report = optimize_exported(_program(model, x, None, True))
    assert report.rewrites >= 10
    _matches(model, optimized.module()(x), x)
