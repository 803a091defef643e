"""Side effects kept at every stage of every entry point, outputs that never alias, and the
``torch.compile`` backend's own options and recompiles (issue 37).

Every case compares against the eager model: the in-place statements torch.fx records but calls pure
(``y.clamp_(0, 6)``, ``torch.relu_(y)``, ``out[:, :4].sigmoid_()``) must still run after the backend,
the retraining tier (rebirth layers, initialisation) and the depth student's linearisation; a returned
value must not become another returned value or the caller's input; every ``torch.compile`` mode works.
"""

from __future__ import annotations

import operator
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxrebirth
from fxrebirth.testing import randomize_batchnorm

ROOT = Path(__file__).resolve().parent.parent


# -- 1. one dead-code elimination everywhere ----------------------------------------------------------

def test_only_the_mutation_aware_dead_code_elimination_is_called():
    """torch.fx's own ``Graph.eliminate_dead_code()`` deletes ``y.clamp_(0, 6)`` (it calls every method
    pure); every stage must call :func:`fxrebirth.graph.mutation.eliminate_dead_code` instead."""
    plain = re.compile(r"\.eliminate_dead_code\(")
    offenders = []
    for folder in ("fxrebirth", "passes"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "mutation.py" and path.parent.name == "graph":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if plain.search(line.split("#")[0]):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "torch.fx's plain dead-code elimination drops in-place ops:\n" + "\n".join(offenders)
    assert (ROOT / "fxrebirth" / "graph" / "mutation.py").read_text().count(".eliminate_dead_code(") == 1


class _InPlace(nn.Module):
    """conv -> BN -> one in-place statement whose result is not reassigned, as user code writes it."""

    def __init__(self, statement: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.statement = statement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        s = self.statement
        if s == "clamp_":
            y.clamp_(0, 0.5)
        elif s == "torch.relu_":
            torch.relu_(y)
        elif s == "mul_":
            y.mul_(2)
        elif s == "yolo":  # a detection head: sigmoid of the box channels, in place, through a view
            b, c, h, w = y.shape
            y = y.view(b, 2, c // 2, h, w).permute(0, 1, 3, 4, 2)
            y[..., :2].sigmoid_()
        elif s == "slice_sigmoid_":
            y[:, :4].sigmoid_()
        elif s == "setitem":
            y[:, 1:3] = 0.25
        elif s == "imul_slice":
            y[:, :2] *= 3
        elif s == "masked_fill_":
            y.masked_fill_(y > 0.3, -1.0)
        elif s == "F.relu_inplace":
            F.relu(y, inplace=True)
        elif s == "module_inplace_on_view":
            self.act(y[:, 2:])
        elif s == "copy_":
            y[:, :1].copy_(x[:, :1])
        elif s == "view_imul":  # an augmented assignment on a view: Dynamo records operator.imul, result unused
            z = y[:, :2]
            z *= 3
        elif s == "view_iadd_narrow":
            z = y.narrow(1, 2, 3)
            z += 1
        return y


STATEMENTS = ["clamp_", "torch.relu_", "mul_", "yolo", "slice_sigmoid_", "setitem", "imul_slice", "masked_fill_",
              "F.relu_inplace", "module_inplace_on_view", "copy_", "view_imul", "view_iadd_narrow"]


def _trained(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)  # the tests' later draws stay seeded
    return randomize_batchnorm(model).eval()


def _compiled(model: nn.Module, compiler: str = "eager", **kwargs) -> nn.Module:
    torch._dynamo.reset()
    return torch.compile(model, backend="fxrebirth", options={"compiler": compiler}, **kwargs)


def _folded(caplog) -> bool:
    return any("rewrites in a graph" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("statement", STATEMENTS)
def test_the_backend_keeps_in_place_statements(statement, caplog):
    caplog.set_level("INFO", logger="fxrebirth")
    model = _trained(_InPlace(statement))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x.clone())
        got = _compiled(model)(x.clone())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert _folded(caplog), "the graph was not folded: the case tests nothing"


@pytest.mark.parametrize("statement, mode", [("clamp_", None), ("yolo", "max-autotune-no-cudagraphs")])
def test_the_backend_keeps_in_place_statements_under_inductor(statement, mode, caplog):
    caplog.set_level("INFO", logger="fxrebirth")
    model = _trained(_InPlace(statement))
    x = torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(x.clone())
        got = torch.compile(model, backend="fxrebirth", mode=mode)(x.clone())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert _folded(caplog)


@pytest.mark.parametrize("statement", ["clamp_", "slice_sigmoid_", "setitem", "module_inplace_on_view"])
def test_optimize_keeps_in_place_statements(statement):
    model = _trained(_InPlace(statement))
    x = torch.randn(2, 3, 8, 8)
    gm, _ = fxrebirth.optimize(model, x)
    with torch.no_grad():
        torch.testing.assert_close(gm(x.clone()), model(x.clone()), rtol=1e-5, atol=1e-5)


# -- 2. the retraining tier -----------------------------------------------------------------------------

class _RegionBetween(nn.Module):
    """stem -> [conv -> avg-pool: a streamline region] -> head, with an in-place write through a view
    before the region (into its input) or after it (into the returned logits)."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(2, 2)
        self.head = nn.Linear(6, 4)
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.where == "before":
            x[:, :1].sigmoid_()
        elif self.where == "before_setitem":
            x[:, 1] = 0.5
        out = self.head(self.pool(self.conv(x)).mean((2, 3)))
        if self.where == "after_read":  # the region's input written after the region read it
            x[:, :1].mul_(0)
            out = out + x.mean((1, 2, 3))[:, None]
        if self.where == "after":
            out[:, :2].sigmoid_()
        elif self.where == "after_clamp":
            out[:, 2:].clamp_(-0.1, 0.1)
        return out


def _plan_all(model: nn.Module) -> fxrebirth.Plan:
    plan = fxrebirth.plan(model, torch.randn(1, 3, 12, 12), strategies=["streamline", "branch"], rounds=1)
    for r in plan.candidates:  # every region, whatever this machine's timings say
        r.selected = True
    assert plan.selected, "no region: the case tests nothing"
    return plan


@pytest.mark.parametrize("where", ["before", "before_setitem", "after", "after_clamp", "after_read"])
def test_rebirth_layers_and_initialisation_keep_in_place_statements(where):
    """conv -> avg-pool is exactly one convolution: least squares reproduces it, so the reborn model must
    equal the original, in-place statements outside the region included."""
    from fxrebirth.retraining.engine import rebirth
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = _RegionBetween(where).eval()
    plan = _plan_all(model)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 12, 12, generator=g), torch.randint(0, 4, (64,), generator=g))
    data.labels, data.classes = data.tensors[1], ["0", "1", "2", "3"]
    reborn, _ = rebirth(model, plan, data, init="lstsq", epochs=0, layerwise_epochs=0, calibration_images=64,
                        ridge=1e-9, batch_size=16)
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(reborn(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("where", ["after", "after_clamp"])
def test_rebuild_keeps_in_place_statements(where):
    from fxrebirth.retraining.planning import rebuild

    model = _RegionBetween(where).eval()
    plan = _plan_all(model)
    gm = fxrebirth.capture(model, torch.randn(1, 3, 12, 12))
    reborn = rebuild(gm, plan)
    written = [n for n in reborn.graph.nodes if isinstance(n.target, str) and n.target.endswith("_")
               and n.op == "call_method"]
    assert written, reborn.code


@pytest.mark.parametrize("where", ["before", "after_read", "after"])
def test_a_probe_sees_a_value_as_the_region_reads_it(where):
    """Calibration probes the region's input: with a write before the region, after it; with a write after
    the region read it, before that write."""
    from fxrebirth.retraining.initialise import probe_nodes

    model = _RegionBetween(where).eval()
    plan = _plan_all(model)
    gm = fxrebirth.capture(model, torch.randn(1, 3, 12, 12))
    region = plan.selected[0].region
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model.stem(x)
        if where == "before":
            expected[:, :1].sigmoid_()
        got = probe_nodes(gm, [region.input])(x)[0]
        torch.testing.assert_close(got, expected)


class _DepthThenHead(nn.Module):
    """conv -> ReLU -> conv (a depth segment) -> ReLU -> conv head, and an in-place statement on a view
    of the head's output (outside the segment) or of the segment's input."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 4, 1)
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2
        if self.where == "input":
            x[:, :1].tanh_()
        out = self.head(torch.relu(self.b(torch.relu(self.a(x)))))
        if self.where == "output":
            out[:, :2].sigmoid_()
        elif self.where == "setitem":
            out[:, 3] = 0
        return out


@pytest.mark.parametrize("where", ["input", "output", "setitem"])
def test_linearise_and_merge_keep_in_place_statements(where):
    from fxrebirth.passes.depth import find_segments
    from fxrebirth.passes.linearise import linearise, merge

    torch.manual_seed(0)
    model = _DepthThenHead(where).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxrebirth.capture(model, x)
    segment = next(s for s in find_segments(gm) if s.replaces == ("a", "relu", "b"))
    student = linearise(gm, [segment])
    merged = merge(student)
    with torch.no_grad():
        # the student drops the segment's ReLU and moves its padding to the input: away from the border it
        # is the model without that ReLU, in-place statement kept
        reference = model.head(torch.relu(model.b(model.a(_prefix(model, x.clone())))))
        _suffix(model, reference)
        got = student(x.clone())
        torch.testing.assert_close(got[..., 2:-2, 2:-2], reference[..., 2:-2, 2:-2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(x.clone()), got, rtol=1e-5, atol=1e-5)


def _prefix(model: _DepthThenHead, x: torch.Tensor) -> torch.Tensor:
    x = x * 2
    if model.where == "input":
        x[:, :1].tanh_()
    return x


def _suffix(model: _DepthThenHead, out: torch.Tensor) -> None:
    if model.where == "output":
        out[:, :2].sigmoid_()
    elif model.where == "setitem":
        out[:, 3] = 0


class _WriteInsideResidual(nn.Module):
    """``x + b(relu(a(x)))`` with ``x`` written in place between ``a`` and the addition: the student pads
    ``x`` once, so it cannot read it both before and after the write."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2
        h = self.a(x)
        x[:, :1].tanh_()
        return x + self.b(torch.relu(h))


def test_linearise_refuses_a_segment_an_in_place_write_interrupts():
    from fxrebirth.passes.depth import find_segments
    from fxrebirth.passes.linearise import linearise

    model = _WriteInsideResidual().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = fxrebirth.capture(model, x)
    segments = [s for s in find_segments(gm) if "add" in s.nodes]
    assert segments, gm.code
    for segment in segments:
        with pytest.raises(ValueError, match="writes in place between its layers"):
            linearise(gm, [segment])


# -- 3. outputs never alias where the original's did not --------------------------------------------------

class _Returns(nn.Module):
    """Returns values that a no-op removal could make another output, a view of one, the input or a buffer."""

    def __init__(self, case: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.id = nn.Identity()
        self.register_buffer("scale", torch.full((4,), 0.5))
        self.case = case

    def forward(self, x: torch.Tensor):
        y = self.conv(x)
        c = self.case
        cases = {
            "y_mul1": lambda: (y, y * 1.0), "y_add0": lambda: (y, y + 0), "y_div1_view": lambda: (y, (y / 1).view(2, -1)),
            "y_sub0_slice": lambda: (y, (y - 0)[:, :2]), "chain": lambda: (y, y * 1, (y * 1) + 0),
            "dict": lambda: {"boxes": y, "scores": y * 1.0}, "x_mul1": lambda: (x * 1.0, y), "x_add0": lambda: x + 0,
            "x_sub0_flatten": lambda: ((x - 0).flatten(1), y), "buffer_mul1": lambda: (y, self.scale * 1.0),
            # the original shares memory here: kept as it is
            "y_view": lambda: (y, y.view(y.shape)), "y_identity": lambda: (y, self.id(y)),
            "y_dropout": lambda: (y, self.drop(y)), "x_identity": lambda: (self.id(x), y),
            "x_dropout_mul1": lambda: (self.drop(x) * 1.0, y),
        }
        return cases[c]()


ALIAS_CASES = ["y_mul1", "y_add0", "y_div1_view", "y_sub0_slice", "chain", "dict", "x_mul1", "x_add0", "x_sub0_flatten",
               "buffer_mul1", "y_view", "y_identity", "y_dropout", "x_identity", "x_dropout_mul1"]


def _leaves(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out.values()) if isinstance(out, dict) else list(out)


def _sharing(outs: list[torch.Tensor], x: torch.Tensor, module: nn.Module) -> tuple:
    """Which outputs are the same object / share storage with another output, the input, a weight."""
    ptr = [o.untyped_storage().data_ptr() for o in outs]
    weights = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    n = len(outs)
    return ({(i, j) for i in range(n) for j in range(i + 1, n) if outs[i] is outs[j]},
            {(i, j) for i in range(n) for j in range(i + 1, n) if ptr[i] == ptr[j]},
            {i for i in range(n) if outs[i] is x}, {i for i in range(n) if ptr[i] == x.untyped_storage().data_ptr()},
            {i for i in range(n) if ptr[i] in weights})


def _check_sharing(model: nn.Module, optimized, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = _sharing(_leaves(model(x)), x, model)
        outs = _leaves(optimized(x))
        assert _sharing(outs, x, optimized if isinstance(optimized, nn.Module) else model) == expected
        # what a user does next: writes into one output in place; the input and the model do not change
        kept, again = x.clone(), _leaves(optimized(x))
        before = [o.clone() for o in again]
        again[0].clamp_(-0.01, 0.01)
        if 0 not in expected[3]:
            assert torch.equal(x, kept), "writing into an output changed the caller's input"
        for j, (o, b) in enumerate(zip(again[1:], before[1:]), 1):
            if (0, j) not in expected[1]:
                assert torch.equal(o, b), f"writing into output 0 changed output {j}"


@pytest.mark.parametrize("case", ALIAS_CASES)
def test_optimize_keeps_outputs_apart(case):
    torch.manual_seed(0)
    model = _Returns(case).eval()
    x = torch.randn(2, 3, 8, 8)
    gm, report = fxrebirth.optimize(model, x)
    _check_sharing(model, gm, x)


@pytest.mark.parametrize("case", ["y_mul1", "x_add0", "chain", "y_dropout", "x_identity", "buffer_mul1"])
def test_the_backend_keeps_outputs_apart(case):
    torch.manual_seed(0)
    model = _Returns(case).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        compiled = _compiled(model)
        compiled(x)
    _check_sharing(model, compiled, x)


@pytest.mark.parametrize("case", ["y_mul1", "x_mul1"])
def test_optimize_exported_keeps_outputs_apart(case):
    from fxrebirth.frontends.export import optimize_exported

    torch.manual_seed(0)
    model = _Returns(case).eval()
    x = torch.randn(2, 3, 8, 8)
    program, _ = optimize_exported(torch.export.export(model, (x,)))
    _check_sharing(model, program.module(), x)


def test_a_removed_no_op_is_what_made_outputs_share():
    """The cases above test something: the cleanup does remove the no-op (the output got a copy back)."""
    gm, report = fxrebirth.optimize(_Returns("y_mul1").eval(), torch.randn(2, 3, 8, 8))
    assert report.rewrites >= 1
    assert any(n.target is torch.clone for n in gm.graph.nodes), gm.code


# -- 4. every torch.compile mode ---------------------------------------------------------------------------

def _conv_bn() -> nn.Module:
    return _trained(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))


@pytest.mark.parametrize("mode", [None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"])
def test_every_torch_compile_mode_reaches_inductor_with_its_settings(mode, monkeypatch, caplog):
    """Dynamo passes a mode other than "default" to a custom backend as ``mode=``; the backend folds, then
    gives Inductor that mode's settings (recorded here instead of compiling) and freezing."""
    import torch._inductor.compile_fx as inductor
    from torch._inductor import list_mode_options

    seen = []

    def fake_compile(gm, inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", fake_compile)
    caplog.set_level("INFO", logger="fxrebirth")
    model, x = _conv_bn(), torch.randn(2, 3, 8, 8)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="fxrebirth", mode=mode)(x)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert seen == [{**list_mode_options(mode or "default"), "freezing": True}]
    assert _folded(caplog)


def test_an_unknown_mode_is_a_clear_error():
    from fxrebirth.errors import PipelineError
    from fxrebirth.frontends.backend import BackendOptions

    with pytest.raises(PipelineError, match="mode='fastest' is not a mode torch knows; use one of .*max-autotune"):
        BackendOptions.from_dict(None, "fastest")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="mode='fastest'"), torch.no_grad():
        torch.compile(_conv_bn(), backend="fxrebirth", mode="fastest")(torch.randn(1, 3, 8, 8))


def test_a_mode_applies_to_the_graph_compiled_unchanged(monkeypatch):
    """With gradients on nothing is folded; the unchanged graph still gets the mode's settings."""
    import torch._inductor.compile_fx as inductor

    seen = []

    def fake_compile(gm, inputs, config_patches=None, **kwargs):
        seen.append(dict(config_patches or {}))
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", fake_compile)
    torch._dynamo.reset()
    torch.compile(_conv_bn(), backend="fxrebirth", mode="max-autotune-no-cudagraphs")(torch.randn(1, 3, 8, 8))
    assert seen and all(s.get("max_autotune") is True and "freezing" not in s for s in seen)


# -- 5. a compiled model runs wherever the original runs ------------------------------------------------------

class _CeilPool(nn.Module):
    """conv -> ceil-mode average pooling -> conv: merged into one convolution exactly where the pooling's
    last window is whole (a size guard), which a dynamic-shape recompile must not turn into an error."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(kernel, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.pool(self.conv(x)))


@pytest.mark.parametrize("kernel, sizes", [(2, [8, 10, 9, 11, 12]), (3, [9, 11, 10, 12, 13]),
                                           (2, [(8, 10), (10, 12), (8, 9), (7, 12)])])
@pytest.mark.parametrize("path", ["fold without the rule", "fall back at that size"])
def test_a_dynamic_recompile_runs_at_every_size_eager_runs(kernel, sizes, path, caplog, monkeypatch):
    """Dynamo recompiles with symbolic sizes at the second size: the backend folds that graph without the
    rules whose rewrites need a size guard; should a guard remain (a guard of capture; here the rule's,
    with that step turned off), a call where it fails runs the graph unfolded."""
    from fxrebirth.frontends import backend

    if path == "fall back at that size":
        monkeypatch.setattr(backend, "_guarded_rules", lambda gm: set())
    torch.manual_seed(0)
    model = _CeilPool(kernel).eval()
    compiled = _compiled(model)
    caplog.set_level("INFO", logger="fxrebirth")
    with torch.no_grad():
        for size in sizes:
            h, w = size if isinstance(size, tuple) else (size, size)
            x = torch.randn(2, 3, h, w)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    messages = [r.getMessage() for r in caplog.records]
    assert any("rewrites in a graph" in m for m in messages)
    expected = "folded without them" if path == "fold without the rule" else "calls at such sizes run the graph unfolded"
    assert any(expected in m for m in messages), messages


def test_a_dynamic_recompile_runs_at_every_size_under_inductor():
    torch.manual_seed(0)
    model = _CeilPool(2).eval()
    compiled = _compiled(model, "inductor")
    with torch.no_grad():
        for size in (8, 10, 9):
            x = torch.randn(1, 3, size, size)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_size_the_original_refuses_is_refused_as_eager_refuses():
    """The fallback is the original graph: where eager raises, the compiled model raises the same."""
    model = _CeilPool(2).eval()
    compiled = _compiled(model)
    with torch.no_grad():
        compiled(torch.randn(1, 3, 8, 8))
        compiled(torch.randn(1, 3, 10, 10))
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 4, 9, 9))
        with pytest.raises(RuntimeError):
            compiled(torch.randn(1, 4, 9, 9))
