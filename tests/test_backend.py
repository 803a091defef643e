"""torch.compile(backend="fxrebirth"): registration, equivalence, weights guard, training, options."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from hypothesis import given, note, settings
from torch import nn

import fxrebirth
from fxrebirth.testing import assert_equivalent, randomize_batchnorm
from fxrebirth.testing.graphs import random_graphs

EAGER = {"compiler": "eager"}


pytestmark = pytest.mark.usefixtures("reset_dynamo")


def _tv(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = {"init_weights": False} if name == "googlenet" else {}
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return randomize_batchnorm(model).eval()


def test_backend_is_found_through_the_entry_point_without_importing_fxrebirth():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()\n"
        "assert 'fxrebirth' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    y = torch.compile(m, backend='fxrebirth', options={'compiler': 'eager'})(torch.randn(1, 3, 8, 8))\n"
        "assert 'fxrebirth' in sys.modules and y.shape == (1, 4, 6, 6)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


# ResNet-50 in the thorough profile: resnet18 goes through the backend below (at four batch sizes)
@pytest.mark.parametrize("name", ["googlenet", pytest.param("resnet50", marks=pytest.mark.thorough), "mobilenet_v2"])
def test_torchvision_models_through_the_backend(name, caplog):
    model = _tv(name)
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    x = torch.randn(2, 3, 64, 64)
    with caplog.at_level("INFO", logger="fxrebirth"), torch.no_grad():
        assert_equivalent(model, compiled, x)
    assert "rewrites in a graph" in caplog.text


def test_changed_weights_are_noticed_never_stale():
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_equivalent(model, compiled, x)
        model[0].weight.mul_(2.0)  # an in-place update: same object, new version
        model[1].running_mean.add_(0.5)
        assert_equivalent(model, compiled, x)


def test_dynamic_batch_sizes_and_recompilation():
    model = _tv("resnet18")
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    with torch.no_grad():
        for batch in (2, 5, 3, 1):
            assert_equivalent(model, compiled, torch.randn(batch, 3, 32, 32))


class _WithBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.b = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.a(x)
        torch._dynamo.graph_break()
        return self.b(torch.relu(y))


def test_graph_breaks_give_several_optimised_subgraphs(caplog):
    model = randomize_batchnorm(_WithBreak()).eval()
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    with caplog.at_level("INFO", logger="fxrebirth.frontends.backend"), torch.no_grad():
        assert_equivalent(model, compiled, torch.randn(2, 3, 8, 8))
    assert caplog.text.count("rewrites in a graph") >= 2


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_training_step_gradients_are_correct(compiler):
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                              nn.Flatten(), nn.LazyLinear(2)))
    model(torch.randn(2, 3, 8, 8))
    reference = __import__("copy").deepcopy(model)
    compiled = torch.compile(model, backend="fxrebirth", options={"compiler": compiler})
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 2)
    for net in (reference, compiled):
        torch.nn.functional.mse_loss(net(x), target).backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("freezing", [True, False])
def test_inductor_with_and_without_freezing_matches_and_follows_weight_updates(freezing):
    """Inductor inside the backend, frozen or not: same output as eager, and an in-place weight update
    after compilation is seen (the baked weights are re-folded, not reused)."""
    torch._dynamo.reset()
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    compiled = torch.compile(model, backend="fxrebirth", options={"freezing": freezing})
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        model[0].weight.mul_(2.0)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_unknown_option_is_a_clear_error():
    model = nn.Conv2d(3, 4, 3).eval()
    compiled = torch.compile(model, backend="fxrebirth", options={"compiller": "eager"})
    with pytest.raises(Exception, match=r"unknown fxrebirth backend option\(s\) \['compiller'\]"):
        with torch.no_grad():
            compiled(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("check_output", [True, False])
def test_check_output_option_turns_the_whole_model_check_on_and_off(check_output, monkeypatch, reset_dynamo):
    import fxrebirth.frontends.library as library

    calls = []
    compare = library.compare
    monkeypatch.setattr(library, "compare", lambda *a, **k: calls.append(1) or compare(*a, **k))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="fxrebirth", options={"compiler": "eager", "check_output": check_output})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert bool(calls) == check_output


def test_check_output_option_must_be_a_bool(reset_dynamo):
    compiled = torch.compile(nn.Conv2d(3, 4, 3).eval(), backend="fxrebirth", options={"check_output": "no"})
    with pytest.raises(Exception, match="check_output"):
        with torch.no_grad():
            compiled(torch.randn(1, 3, 8, 8))


@settings(max_examples=25)
@given(gm=random_graphs())
def test_random_graphs_through_the_backend(gm):
    note(gm.code)
    torch._dynamo.reset()
    x = torch.randn(2, gm.meta["in_channels"], 6, 6, dtype=torch.float64)
    compiled = torch.compile(gm, backend="fxrebirth", options=EAGER)
    with torch.no_grad():
        assert_equivalent(gm, compiled, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_through_the_backend():
    model = _tv("resnet18").cuda()
    compiled = torch.compile(model, backend="fxrebirth", options=EAGER)
    with torch.no_grad():
        assert_equivalent(model, compiled, torch.randn(2, 3, 32, 32, device="cuda"))


def test_public_backend_function_is_the_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "fxrebirth"]
    assert ep.load() is fxrebirth.frontends.backend.fxrebirth_backend


def test_rules_option_replaces_the_rule_list(caplog):
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())).eval()
    x = torch.randn(1, 3, 8, 8)
    from fxrebirth.passes import cleanup

    with caplog.at_level("INFO", logger="fxrebirth.frontends.backend"), torch.no_grad():
        compiled = torch.compile(model, backend="fxrebirth", options={"compiler": "eager", "rules": cleanup.rules()})
        assert_equivalent(model, compiled, x)
    assert "1 rewrites in a graph" in caplog.text  # only the dropout: no BatchNorm rule was given


@pytest.mark.parametrize("options, message", [
    ({"compiler": "eager", "disable": "remove_dropout"}, r"disable='remove_dropout' is a string; pass a list"),
    ({"compiler": "eager", "disable": ["no_such_rule"]}, r"unknown rule name\(s\) \['no_such_rule'\] in the backend option disable"),
    ({"compiler": "eager", "freezing": "yes"}, r"freezing='yes' must be True or False"),
    ({"compiler": "eager", "guard": "version"}, r"guard='version': use one of 'weights', 'identity', 'none'"),
    ({"compiler": "eager", "rules": [nn.ReLU]}, r"rules\[0\] is the class ReLU, not a fxrebirth Rule"),
])
def test_bad_option_values_are_clear_errors(options, message):
    compiled = torch.compile(nn.Conv2d(3, 4, 3).eval(), backend="fxrebirth", options=options)
    with pytest.raises(Exception, match=message), torch.no_grad():
        compiled(torch.randn(1, 3, 8, 8))
