"""torch.compile(backend="fxrebirth") tried as an adversarial user would (issue 13): the user's own
Inductor freezing setting, dynamic=True, channels_last, inference-mode tensors, graphs that mutate their
inputs (buffers, BatchNorm statistics, user inputs), and the weight-update contract of the module
docstring of fxrebirth/frontends/backend.py (what the per-call guard sees, and what it documents it cannot).

Every case compares the compiled model with the eager original under the project's norm-wise bound
(fxrebirth.equivalence), under torch.no_grad() unless stated.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from fxrebirth.equivalence import relative_error, tolerance

from fxrebirth.testing import randomize_batchnorm

EAGER = {"compiler": "eager"}


pytestmark = pytest.mark.usefixtures("reset_dynamo")


def assert_close(reference, candidate, dtype=torch.float32):
    error = relative_error(reference, candidate)
    assert error <= tolerance(dtype), f"relative error {error:.3g} > {tolerance(dtype):.0e}"


def net(classes: int = 0) -> nn.Module:
    """conv -> BN -> ReLU -> conv (-> pooled linear head): something to fold."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)]
    if classes:
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)]
    return randomize_batchnorm(nn.Sequential(*layers)).eval()


def folded(caplog) -> bool:
    return "rewrites in a graph" in caplog.text and " 0 rewrites in a graph" not in caplog.text


# -- a. the user's own Inductor freezing setting ------------------------------------------------------

@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_inductor_freezing_set_in_code(compiler, caplog):
    model = net(4)
    x = torch.randn(2, 3, 12, 12)
    with torch._inductor.config.patch(freezing=True), torch.no_grad(), caplog.at_level("INFO", logger="fxrebirth"):
        compiled = torch.compile(model, backend="fxrebirth", options={"compiler": compiler})
        assert_close(model(x), compiled(x))
        assert_close(model(x[:1]), compiled(x[:1]))
    assert folded(caplog)


@pytest.mark.parametrize("freezing", [True, False])
def test_inductor_inside_with_and_without_the_freezing_setting(freezing, caplog, monkeypatch):
    """Both match eager; without the setting the log says once how to get Dynamo's identity guards."""
    import fxrebirth.frontends.backend as backend

    monkeypatch.setattr(backend, "_said", set())
    model = net()
    x = torch.randn(2, 3, 8, 8)
    with torch._inductor.config.patch(freezing=freezing), torch.no_grad(), \
            caplog.at_level("INFO", logger="fxrebirth"):
        compiled = torch.compile(model, backend="fxrebirth")
        assert_close(model(x), compiled(x))
    assert folded(caplog)
    assert ("torch._inductor.config.freezing = True" in caplog.text) is not freezing


def test_inductor_freezing_set_by_environment():
    code = (
        "import torch\n"
        "from torch import nn\n"
        "assert torch._inductor.config.freezing\n"
        "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()\n"
        "m[1].running_mean.uniform_(-1, 1); m[1].running_var.uniform_(0.5, 2)\n"
        "x = torch.randn(2, 3, 8, 8)\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(m, backend='fxrebirth', options={'compiler': 'eager'})(x)\n"
        "    err = ((y - m(x)).abs().max() / m(x).abs().max()).item()\n"
        "assert err < 1e-5, err\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TORCHINDUCTOR_FREEZING="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_inductor_freezing_weights_updated_in_place_are_seen():
    model = net()
    x = torch.randn(2, 3, 8, 8)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
        assert_close(model(x), compiled(x))
        model[0].weight.mul_(2.0)
        model[1].running_var.mul_(3.0)
        assert_close(model(x), compiled(x))
        model[3].weight.data = torch.randn_like(model[3].weight)
        assert_close(model(x), compiled(x))


# -- b. dynamic=True ----------------------------------------------------------------------------------

def test_dynamic_true_is_correct_at_every_size(caplog):
    model = net(4)
    compiled = torch.compile(model, backend="fxrebirth", dynamic=True, options=EAGER)
    with torch.no_grad(), caplog.at_level("INFO", logger="fxrebirth"):
        for batch, size in ((2, 8), (3, 8), (5, 11), (1, 6)):
            x = torch.randn(batch, 3, size, size)
            assert_close(model(x), compiled(x))


def test_dynamic_true_with_specialised_floats_folds(caplog):
    model = net(4)
    with torch._dynamo.config.patch(specialize_float=True), torch.no_grad(), \
            caplog.at_level("INFO", logger="fxrebirth"):
        compiled = torch.compile(model, backend="fxrebirth", dynamic=True, options=EAGER)
        for batch, size in ((2, 8), (3, 8), (5, 11)):
            x = torch.randn(batch, 3, size, size)
            assert_close(model(x), compiled(x))
    assert folded(caplog)


class _ViewHead(nn.Module):
    """Flattens with x.view(x.size(0), -1): a size read inside the graph."""

    def __init__(self):
        super().__init__()
        self.body = net()
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x):
        y = self.body(x)
        return self.fc(y.view(y.size(0), -1))


@pytest.mark.parametrize("dynamic", [None, True])
def test_size_read_in_the_graph_with_changing_batch(dynamic):
    model = _ViewHead().eval()
    compiled = torch.compile(model, backend="fxrebirth", dynamic=dynamic, options=EAGER)
    with torch.no_grad():
        for batch in (2, 5, 3):
            x = torch.randn(batch, 3, 6, 6)
            assert_close(model(x), compiled(x))


# -- c. channels_last ---------------------------------------------------------------------------------

def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_channels_last_resnet18_folds_and_matches(caplog):
    import torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = randomize_batchnorm(torchvision.models.resnet18(weights=None)).eval()
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    with torch.no_grad(), caplog.at_level("INFO", logger="fxrebirth"):
        assert_close(model(x), compiled(x))
    assert folded(caplog), caplog.text[-2000:]


@pytest.mark.parametrize("input_format", [torch.channels_last, torch.contiguous_format])
def test_channels_last_output_keeps_the_memory_format(input_format, caplog):
    model = net().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=input_format)
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    with torch.no_grad(), caplog.at_level("INFO", logger="fxrebirth"):
        reference, result = model(x), compiled(x)
    assert_close(reference, result)
    assert _channels_last(result) == _channels_last(reference)
    assert folded(caplog), caplog.text[-2000:]


def test_channels_last_input_to_a_contiguous_model():
    model = net()
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    with torch.no_grad():
        reference, result = model(x), compiled(x)
    assert_close(reference, result)
    assert _channels_last(result) == _channels_last(reference)


# -- d. inference mode --------------------------------------------------------------------------------

def test_model_built_under_inference_mode_called_under_inference_mode():
    with torch.inference_mode():
        model = net(4)
        x = torch.randn(2, 3, 8, 8)
        compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
        assert_close(model(x), compiled(x))
        assert_close(model(x[:1]), compiled(x[:1]))


def test_model_built_under_inference_mode_called_under_no_grad():
    with torch.inference_mode():
        model = net(4)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
        assert_close(model(x), compiled(x))


def test_ordinary_model_called_under_inference_mode():
    model = net(4)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    with torch.inference_mode():
        assert_close(model(x), compiled(x))
    with torch.no_grad():
        model[0].weight.mul_(-1.0)
    with torch.inference_mode():
        assert_close(model(x), compiled(x))


def test_inference_tensor_weights_under_inductor_freezing():
    with torch.inference_mode():
        model = net()
        x = torch.randn(2, 3, 8, 8)
        with torch._inductor.config.patch(freezing=True):
            compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
            assert_close(model(x), compiled(x))


# -- e. graphs that mutate their inputs ---------------------------------------------------------------

class _Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = net()
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count += 1
        return self.body(x) * self.count


@pytest.mark.parametrize("freezing", [False, True])
def test_buffer_incremented_by_the_forward_counts_calls(freezing):
    model, reference = _Counter().eval(), _Counter().eval()
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    x = torch.randn(2, 3, 8, 8)
    with torch._inductor.config.patch(freezing=freezing), torch.no_grad():
        for _ in range(3):
            assert_close(reference(x), compiled(x))
    assert model.count.item() == 3 == reference.count.item()


def test_batchnorm_recalibration_updates_the_users_statistics():
    model = net(4)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    xs = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(reference(x), compiled(x))  # folded, in eval mode
        model.train(), reference.train()
        for batch in xs:
            assert_close(reference(batch), compiled(batch))
        for (name, a), b in zip(reference.named_buffers(), model.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
        model.eval(), reference.eval()
        assert_close(reference(x), compiled(x))  # the new statistics, not the folded old ones


def test_batchnorm_recalibration_with_inductor_freezing():
    model = net()
    reference = copy.deepcopy(model)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
        x = torch.randn(2, 3, 8, 8)
        assert_close(reference(x), compiled(x))
        model.train(), reference.train()
        for _ in range(2):
            batch = torch.randn(4, 3, 8, 8)
            assert_close(reference(batch), compiled(batch))
        model.eval(), reference.eval()
        torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
        assert_close(reference(x), compiled(x))


class _MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, x):
        x.mul_(2.0)
        return self.body(x)


def test_forward_that_mutates_its_input():
    model = _MutatesInput().eval()
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    x = torch.randn(2, 3, 8, 8)
    a, b = x.clone(), x.clone()
    with torch.no_grad():
        assert_close(model(a), compiled(b))
    torch.testing.assert_close(a, b)


class _WritesBuffer(nn.Module):
    """setitem and copy_ into buffers, and an in-place op through a view of a buffer."""

    def __init__(self):
        super().__init__()
        self.body = net()
        self.register_buffer("stats", torch.zeros(4))
        self.register_buffer("last", torch.zeros(2, 8))
        self.register_buffer("grid", torch.zeros(2, 3))

    def forward(self, x):
        y = self.body(x)
        self.stats[0] = y.mean()
        self.last.copy_(y.mean((2, 3)))
        self.grid.view(-1)[1:3].add_(1.0)
        return y + self.stats[0] + self.grid.sum()


def test_setitem_copy_and_view_writes_into_buffers():
    model = _WritesBuffer().eval()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 3, 8, 8)
            assert_close(reference(x), compiled(x))
    for (name, a), b in zip(reference.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, a, msg=name)


class _InplaceIntermediate(nn.Module):
    """ResNet-style in-place ops on intermediates only: the inputs are not written, so it still folds."""

    def __init__(self):
        super().__init__()
        self.a, self.b = net(), net()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.a(x)
        y = self.relu(y)
        out = self.b[:2](x)
        out += y
        return self.relu(out)


def test_inplace_ops_on_intermediates_still_fold(caplog):
    model = _InplaceIntermediate().eval()
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), caplog.at_level("INFO", logger="fxrebirth"):
        assert_close(model(x), compiled(x))
    assert folded(caplog)


def test_training_step_updates_statistics_like_eager():
    """Gradients enabled, BatchNorm in training mode: the same statistics and gradients as eager."""
    model = net(2).train()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrebirth", options={"compiler": "aot_eager"})
    x = torch.randn(4, 3, 8, 8)
    for m in (reference, compiled):
        m(x).square().sum().backward()
    for (name, a), b in zip(reference.named_buffers(), model.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)


# -- f. the weight-update contract --------------------------------------------------------------------

def _compiled_net():
    model = net(4)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    with torch.no_grad():
        assert_close(model(x), compiled(x))
    return model, compiled, x


def test_contract_in_place_update_is_seen():
    model, compiled, x = _compiled_net()
    with torch.no_grad():
        model[0].weight.mul_(2.0)
        assert_close(model(x), compiled(x))
        model[0].weight.copy_(torch.randn_like(model[0].weight))
        assert_close(model(x), compiled(x))


def test_contract_data_assignment_is_seen():
    model, compiled, x = _compiled_net()
    with torch.no_grad():
        model[0].weight.data = torch.randn_like(model[0].weight)
        model[1].running_mean.data = torch.randn(8)
        assert_close(model(x), compiled(x))


def test_contract_new_parameter_object_is_seen():
    model, compiled, x = _compiled_net()
    with torch.no_grad():
        model[3].weight = nn.Parameter(torch.randn_like(model[3].weight))
        assert_close(model(x), compiled(x))


def test_contract_optimizer_step_is_seen():
    model, compiled, x = _compiled_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()
    optimizer.step()
    with torch.no_grad():
        assert_close(model(x), compiled(x))


def test_contract_data_copy_is_not_seen_until_reset():
    """Documented: ``p.data.copy_(t)`` bumps no version counter and keeps the storage, so the folded
    weights stay in use; torch._dynamo.reset() (or compiling again) picks up the new weights."""
    model, compiled, x = _compiled_net()
    with torch.no_grad():
        before = model(x)
        model[0].weight.data.copy_(torch.randn_like(model[0].weight))
        assert relative_error(model(x), before) > 1e-2  # the weights did change
        assert_close(before, compiled(x))  # ... but the compiled model still computes with the old ones
        torch._dynamo.reset()
        assert_close(model(x), torch.compile(model, backend="fxrebirth", options=EAGER)(x))


def test_contract_eager_batchnorm_training_is_not_seen_until_reset():
    """Documented: an eager (uncompiled) training-mode call updates BatchNorm's statistics without a
    version bump (PyTorch's batch_norm does not bump it); the remedy is torch._dynamo.reset()."""
    model, compiled, x = _compiled_net()
    with torch.no_grad():
        before = model(x)
        model.train()
        model(torch.randn(8, 3, 8, 8) * 3 + 1)  # eager, not through the compiled model
        model.eval()
        assert relative_error(model(x), before) > 1e-2
        assert_close(before, compiled(x))
        torch._dynamo.reset()
        assert_close(model(x), torch.compile(model, backend="fxrebirth", options=EAGER)(x))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_contract_training_through_the_compiled_model_is_seen(compiler):
    """Statistics a training step through the compiled model updates (gradients on, no optimizer step)
    reach the folded inference graph."""
    model = net(4)
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrebirth", options={"compiler": compiler})
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(reference(x), compiled(x))
    model.train(), reference.train()
    batch = torch.randn(8, 3, 8, 8) * 2 + 1
    for m in (reference, compiled):
        m(batch).sum().backward()
    model.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model[1].running_var, reference[1].running_var)
        assert_close(reference(x), compiled(x))


def _compiled_with_guard(guard):
    model = net(4)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="fxrebirth", options={**EAGER, "guard": guard})
    with torch.no_grad():
        before = model(x)
        assert_close(before, compiled(x))
    return model, compiled, x, before


@pytest.mark.parametrize("guard", ["identity", "none"])
def test_weaker_guards_do_not_see_in_place_updates_until_reset(guard):
    """Documented: under guard='identity' or 'none' an in-place update keeps the folded weights (Inductor's
    freezing contract); torch._dynamo.reset() picks up the new ones."""
    model, compiled, x, before = _compiled_with_guard(guard)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
        assert relative_error(model(x), before) > 1e-2
        assert_close(before, compiled(x))
        torch._dynamo.reset()
        assert_close(model(x), torch.compile(model, backend="fxrebirth", options={**EAGER, "guard": guard})(x))


def test_identity_guard_sees_a_new_parameter_object_and_none_does_not():
    for guard, seen in (("identity", True), ("none", False)):
        torch._dynamo.reset()
        model, compiled, x, before = _compiled_with_guard(guard)
        with torch.no_grad():
            model[3].weight = nn.Parameter(torch.randn_like(model[3].weight))
            model.load_state_dict({k: v * 1.5 for k, v in model.state_dict().items()}, assign=True)
            assert relative_error(model(x), before) > 1e-2
            assert_close(model(x) if seen else before, compiled(x))


@pytest.mark.parametrize("guard", ["weights", "identity", "none"])
def test_under_inductor_freezing_dynamo_guards_identity_for_every_guard(guard):
    """With Inductor's freezing setting on, Dynamo hands the weights over as attributes of the graph and
    guards each by identity, so a new Parameter object recompiles and the new weights are folded under
    every guard, "none" included. In-place updates stay the default guard's alone."""
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        model, compiled, x, before = _compiled_with_guard(guard)
        model[3].weight = nn.Parameter(torch.randn_like(model[3].weight))
        replaced = model(x)
        assert relative_error(replaced, before) > 1e-2
        assert_close(replaced, compiled(x))
        model[0].weight.mul_(2.0)
        assert relative_error(model(x), replaced) > 1e-2
        assert_close(model(x) if guard == "weights" else replaced, compiled(x))


def test_identity_guard_falls_back_unoptimised_when_the_new_weights_do_not_optimise(monkeypatch):
    """A rebuild that fails (the pipeline raising on the new weights) leaves the graph running unoptimised
    from the user's current weights, never the old folded ones."""
    model, compiled, x, _ = _compiled_with_guard("identity")
    import fxrebirth.frontends.backend as backend

    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(backend, "optimize", broken)
    with torch.no_grad():
        model[3].weight = nn.Parameter(torch.randn_like(model[3].weight))
        assert_close(model(x), compiled(x))
        model[3].weight = nn.Parameter(torch.randn_like(model[3].weight))
        assert_close(model(x), compiled(x))


def test_contract_inference_tensor_update_is_not_seen_until_reset():
    """Documented: inference tensors have no version counter, so an in-place update of one (allowed
    under inference_mode) is not seen; torch._dynamo.reset() picks it up."""
    with torch.inference_mode():
        model = net(4)
        x = torch.randn(2, 3, 8, 8)
        compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
        before = compiled(x)
        assert_close(model(x), before)
        model[0].weight.mul_(-1.0)
        assert relative_error(model(x), before) > 1e-2
        assert_close(before, compiled(x))
        torch._dynamo.reset()
        assert_close(model(x), torch.compile(model, backend="fxrebirth", options=EAGER)(x))


# -- more: shapes of models an adversary would try ----------------------------------------------------

class _Tied(nn.Module):
    """One convolution used twice, a dict output, and an integer input indexing an embedding."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.embed = nn.Embedding(10, 4)

    def forward(self, x, ids):
        y = self.bn(self.conv(x))
        y = self.conv(torch.relu(y))
        return {"features": y, "bias": self.embed(ids).sum(1), "pooled": [y.mean((2, 3))]}


def test_tied_weights_dict_output_and_integer_input():
    torch.manual_seed(0)
    model = randomize_batchnorm(_Tied()).eval()
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    x, ids = torch.randn(2, 4, 8, 8), torch.randint(0, 10, (2, 3))
    with torch.no_grad():
        assert_close(model(x, ids), compiled(x, ids))
        model.conv.weight.mul_(0.5)  # the tied weight changes for both uses
        assert_close(model(x, ids), compiled(x, ids))


def test_graph_break_between_a_mutating_and_a_pure_part():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = net(), net()
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.calls.add_(1)
            y = self.a(x)
            torch._dynamo.graph_break()
            return self.b[3:](y)

    model = M().eval()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(2, 3, 8, 8)
            assert_close(reference(x), compiled(x))
    assert model.calls.item() == 2


def test_forward_hook_through_the_backend():
    model = net()
    model[1].register_forward_hook(lambda module, args, out: out * 2.0)
    model[2].register_forward_pre_hook(lambda module, args: (args[0] - 0.1,))
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close(model(x), compiled(x))


def test_float64_model_through_the_backend():
    model = net(3).double()
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), compiled(x), torch.float64)
