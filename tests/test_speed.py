"""The speed table (fxrebirth.measure.speed) and ``fxrebirth bench``: every number consistent with the others,
memory measured in a process of its own, one failing runtime costing only its own row."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxrebirth
from fxrebirth.measure import runners, speed
from fxrebirth.graph.capture import capture
from fxrebirth.cli import main
from fxrebirth.retraining.planning import rebuild


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()


@pytest.fixture(scope="module")
def variants():
    model = tiny_cnn()
    x = torch.randn(1, 3, 32, 32)
    exact, _ = fxrebirth.optimize(model, x)
    plan = fxrebirth.plan(model, x, strategies=["streamline"], rounds=1)
    assert plan.candidates, "the conv -> ReLU -> max-pool chain is a candidate"
    for candidate in plan.candidates:  # whatever this noisy machine measured for a model this small
        candidate.selected = True
    reborn = rebuild(capture(model, (x,)), plan).eval()
    return model, exact, reborn


def test_table_numbers_are_consistent(variants):
    model, exact, reborn = variants
    rows = [("original", "eager"), ("original", "onnxruntime"), ("exact tier", "eager"), ("reborn", "eager"),
            ("reborn", "onnxruntime")]
    table = speed.speed_table(model, exact=exact, reborn=reborn, image_size=32, batches=(1, 2), rounds=2,
                              variants=rows, exporter="torchscript", memory=True, name="tiny")
    assert [(r.variant, r.runtime) for r in table.rows] == rows
    base, base_ort = table.row("original", "eager"), table.row("original", "onnxruntime")
    for row in table.rows:
        assert row.note == "" and set(row.ms) == {1, 2} and all(ms > 0 for ms in row.ms.values())
        assert table.ratio(row, 2) == (base if row.runtime == "eager" else base_ort).ms[2] / row.ms[2]
        assert table.ratio(row, 1, "onnxruntime") == base_ort.ms[1] / row.ms[1]
        mem = row.memory
        assert mem["peak_mb"] >= mem["baseline_mb"] > 0
        assert mem["inference_mb"] == pytest.approx(mem["peak_mb"] - mem["baseline_mb"])
    assert table.ratio(base, 1) == 1.0
    # size on disk: a state_dict holds the parameters and buffers (plus a little pickling)
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    assert stored <= base.size_mb < stored + 0.05
    assert base_ort.size_mb > 0
    # FLOPs per image: the reborn model replaces conv -> ReLU -> pool by one strided conv (fewer FLOPs)
    assert table.row("reborn", "eager").gflops < base.gflops == table.row("original", "onnxruntime").gflops
    text = table.markdown()
    for row in table.rows:
        assert f"| {row.variant} | {row.runtime} | {row.ms[1]:.2f} |" in text
    env = table.environment
    assert env["torch"] == torch.__version__ and env["torch_threads"] == torch.get_num_threads()
    assert f"{env['torch_threads']} threads" in text and env["onnxruntime"] in text
    json.dumps(table.to_dict())  # the report stores it


def test_a_failing_runtime_loses_only_its_row(variants, monkeypatch):
    model, exact, reborn = variants

    def no_export(*args, **kwargs):
        raise RuntimeError("exporter exploded\nsecond line")

    monkeypatch.setattr(runners, "export_onnx", no_export)  # the exporter the onnxruntime record names
    rows = [("original", "eager"), ("reborn", "onnxruntime"), ("reborn", "eager")]
    table = speed.speed_table(model, reborn=reborn, image_size=32, batches=(1,), rounds=1, variants=rows,
                              exporter="torchscript", memory=False)
    failed = table.row("reborn", "onnxruntime")
    assert failed.note == "failed: RuntimeError: exporter exploded" and failed.ms == {}
    assert table.row("reborn", "eager").ms[1] > 0 and table.row("original", "eager").ms[1] > 0
    assert "onnxruntime (failed: RuntimeError: exporter exploded) | - |" in table.markdown()


def test_memory_child_errors_are_one_line(tmp_path):
    with pytest.raises(RuntimeError, match="memory measurement of eager failed: .*No such file"):
        speed.inference_memory(str(tmp_path / "missing.pt"), "eager", (1, 3, 8, 8))


def test_layer_breakdown_names_kinds(variants):
    model, _, reborn = variants
    x = torch.randn(1, 3, 32, 32)
    before, after = speed.layer_breakdown(model, x, repeats=1), speed.layer_breakdown(reborn, x, repeats=1)
    assert {"conv", "max_pool"} <= set(before) and "max_pool" not in after and "conv" in after
    assert all(ms >= 0 for ms in [*before.values(), *after.values()])


def test_bench_cli_json(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    args = ["bench", "test_speed:tiny_cnn", "--input-size", "32", "--batch", "1", "--rounds", "2",
            "--rows", "eager", "--no-memory", "--json", "--layers", "--all-regions"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    runs = {(r["variant"], r["runtime"]): r for r in data["rows"]}
    assert set(runs) == {("original", "eager"), ("exact tier", "eager"), ("reborn", "eager")}
    assert runs[("original", "eager")]["speedup_same_runtime"]["1"] == 1.0
    assert "max_pool" in data["layers_ms"]["original"] and "max_pool" not in data["layers_ms"]["reborn"]


def test_bench_cli_bad_input(capsys):
    assert main(["bench", "resnet5O"]) == 2
    assert capsys.readouterr().err.startswith("fxrebirth: error: unknown model 'resnet5O'")
    assert main(["bench", "resnet18", "--batch", "0"]) == 2
    assert "--batch 0: give a whole number of at least 1" in capsys.readouterr().err
