"""The command line: optimize a model, JSON output, errors, saving, weights."""

from __future__ import annotations

import json

import torch
from torch import nn

from fxrebirth.cli import main


def small_net() -> nn.Module:
    """A factory for the package.module:factory form (this test module is importable by name)."""
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(), nn.Linear(4, 2))


def test_optimize_torchvision_model_prints_the_report(capsys):
    assert main(["optimize", "resnet18", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "bn_into_preceding" in out and "FLOPs" in out and "whole-model relative error" in out


def test_json_output(capsys):
    assert main(["optimize", "mobilenet_v3_small", "--input-size", "64", "--json", "--runtime", "onnxruntime"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["rules"]["bn_into_preceding"]["rewrites"] > 0
    assert data["output_error"] < 1e-5


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["optimize", "resnet5O"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxrebirth: error: unknown model 'resnet5O'") and "Traceback" not in err


def test_factory_weights_and_save(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    weights = tmp_path / "w.pt"
    reference = small_net().eval()
    torch.save(reference.state_dict(), weights)
    target = tmp_path / "model.pt2"
    argv = ["optimize", "test_cli:small_net", "--weights", str(weights), "--input-size", "16", "--save", str(target)]
    assert main(argv) == 0
    assert "saved:" in capsys.readouterr().out
    program = torch.export.load(str(target))
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), reference(x), rtol=1e-5, atol=1e-6)


def test_bad_factory_is_a_clear_error(capsys):
    assert main(["optimize", "no_such_package:factory"]) == 2
    assert "cannot load factory 'no_such_package:factory'" in capsys.readouterr().err


def test_plan_prints_and_saves_the_plan(tmp_path, capsys):
    target = tmp_path / "plan.json"
    assert main(["plan", "alexnet_lrn", "--input-size", "96", "--repeats", "1", "--save", str(target)]) == 0
    out = capsys.readouterr().out
    assert "streamline:conv1.conv" in out and "conv1.conv, conv1.relu, norm1, pool1" in out
    import fxrebirth

    plan = fxrebirth.Plan.from_json(target.read_text())
    assert [r.region.id for r in plan.regions][:2] == ["streamline:conv1.conv", "streamline:conv2.conv"]
