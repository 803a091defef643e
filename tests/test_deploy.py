"""Deployment runtimes: ``fxrebirth export`` (checked against the model before anything is written), the
speed table's OpenVINO and ExecuTorch rows (a one-line reason where a runtime cannot run), and "vs best
original" taken at the row's own precision."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

from fxrebirth.cli import main
from fxrebirth.errors import EquivalenceError
from fxrebirth.equivalence import relative_error
from fxrebirth.frontends import deploy as frontend
from fxrebirth.frontends.deploy import export_model, lower_for
from fxrebirth.measure import deploy, speed
from fxrebirth.measure.runtimes import available
from fxrebirth.measure.table import Row, SpeedTable

SIZE = 16


def tiny_lrn() -> nn.Module:
    """A Caffe-style stem small enough for every runtime in a second: conv, BN, ReLU, LRN, pool, head."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.LocalResponseNorm(5),
                         nn.MaxPool2d(2), nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


_NEEDS = {"onnx": "onnxruntime", "openvino": "openvino", "executorch": "executorch"}


def _output_of(to: str, files: list[str], x: torch.Tensor) -> torch.Tensor:
    """The written file run by its runtime, independently of the code under test's own check."""
    if to == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(files[0], providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    if to == "openvino":
        import openvino as ov

        # f32 asked for: OpenVINO computes in bf16 by default on a CPU that has it (AMX, AVX512-BF16)
        compiled = ov.Core().compile_model(files[0], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return torch.from_numpy(compiled(x.numpy())[0].copy())
    from executorch.runtime import Runtime

    with open(files[0], "rb") as f:
        program = f.read()
    loaded = Runtime.get().load_program(program)
    return loaded.load_method("forward").execute([x])[0]


@pytest.mark.parametrize("to,suffix", [("onnx", ".onnx"), ("openvino", ".xml"), ("executorch", ".pte")])
def test_export_writes_a_file_its_runtime_runs_like_the_model(to, suffix, tmp_path, capsys):
    pytest.importorskip(_NEEDS[to])
    out = tmp_path / f"tiny{suffix}"
    code = main(["export", "tests.test_deploy:tiny_lrn", "--to", to, "--save", str(out), "--input-size", str(SIZE),
                 "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["files"][0] == str(out) and all(os.path.exists(f) for f in summary["files"])
    assert summary["exact_tier_rewrites"] >= 1  # the BatchNorm folds
    assert summary["error"] <= 1e-5
    if to == "executorch":
        assert summary["note"] == "1 LRN rewritten exactly as avg_pool2d" and summary["checked_batch"] == 1
        x = torch.randn(1, 3, SIZE, SIZE)
    else:
        assert summary["checked_batch"] >= 2
        x = torch.randn(3, 3, SIZE, SIZE)  # another batch than the export's and the check's
    with torch.no_grad():
        assert relative_error(tiny_lrn()(x), _output_of(to, summary["files"], x)) <= 1e-5


def test_an_export_that_differs_from_the_model_is_refused_and_nothing_is_written(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    real = deploy.load_onnx  # what the onnx target's record runs the written file with
    monkeypatch.setattr(deploy, "load_onnx", lambda files, x: real(files, x) * 1.001)
    out = tmp_path / "tiny.onnx"
    with pytest.raises(EquivalenceError, match=r"the onnx export of the model differs from it by 1\.00e-03"):
        export_model(tiny_lrn(), torch.randn(1, 3, SIZE, SIZE), "onnx", str(out))
    assert not out.exists()


def test_export_leaves_a_training_model_in_training_mode(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny_lrn().train()
    export_model(model, torch.randn(1, 3, SIZE, SIZE), "onnx", str(tmp_path / "m.onnx"))
    assert model.training and all(m.training for m in model.modules())


def test_export_errors_are_one_line(tmp_path, capsys):
    code = main(["export", "tests.test_deploy:tiny_lrn", "--to", "onnx", "--save", str(tmp_path / "no" / "m.onnx"),
                 "--input-size", str(SIZE)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err, err


def test_a_runtime_that_is_not_installed_keeps_its_row_with_the_reason(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert available("openvino") == "openvino is not installed (pip install 'fxrebirth[openvino]')"
    assert available("openvino bf16") == available("compile(openvino)") == available("openvino")
    assert available("eager") is None
    table = speed.speed_table(tiny_lrn(), image_size=SIZE, batches=(1,), rounds=1, memory=False,
                              variants=[("original", "eager"), ("original", "openvino")])
    row = table.row("original", "openvino")
    assert row.note == "unavailable: openvino is not installed (pip install 'fxrebirth[openvino]')" and not row.ms
    assert "unavailable: openvino is not installed" in table.markdown()


def test_bf16_rows_are_offered_only_where_the_cpu_computes_bf16():
    pytest.importorskip("openvino")
    import openvino as ov

    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert (available("openvino bf16") is None) == has_bf16


def test_executorch_rows_fail_with_the_missing_kernel_unless_lrn_is_lowered():
    pytest.importorskip("executorch")
    rows = [("original", "eager"), ("original", "executorch")]
    plain = speed.speed_table(tiny_lrn(), image_size=SIZE, batches=(1,), rounds=1, memory=False, variants=rows)
    assert plain.row("original", "executorch").note == \
        "failed: RuntimeError: ExecuTorch has no kernel for aten::avg_pool3d.out"
    lowered = speed.speed_table(tiny_lrn(), image_size=SIZE, batches=(1,), rounds=1, memory=True, variants=rows,
                                lowering=lower_for)
    row = lowered.row("original", "executorch")
    assert row.note == "1 LRN rewritten exactly as avg_pool2d" and row.ms[1] > 0
    assert row.size_mb is not None and row.memory is not None


def test_openvino_rows_time_the_onnx_file_and_report_its_size():
    pytest.importorskip("openvino")
    rows = [("original", "eager"), ("original", "onnxruntime"), ("original", "openvino")]
    table = speed.speed_table(tiny_lrn(), image_size=SIZE, batches=(1, 2), rounds=1, memory=False, variants=rows,
                              exporter="torchscript")
    ov_row, ort_row = table.row("original", "openvino"), table.row("original", "onnxruntime")
    assert not ov_row.note and set(ov_row.ms) == {1, 2}
    assert ov_row.size_mb == ort_row.size_mb  # the same file
    assert table.environment["openvino"]


def test_vs_best_original_divides_by_the_fastest_original_at_the_rows_precision():
    rows = [Row("original", "eager", ms={1: 30.0}), Row("original", "openvino", ms={1: 10.0}),
            Row("original", "openvino bf16", ms={1: 6.0}), Row("reborn", "openvino", ms={1: 4.0}),
            Row("reborn", "openvino bf16", ms={1: 2.0}), Row("reborn", "eager", ms={1: 12.0})]
    table = SpeedTable(model="m", image_size=8, batches=[1], rounds=1, rows=rows, environment={})
    assert table.best_original(1).runtime == "openvino"  # bf16's 6 ms is not an fp32 baseline
    assert table.vs_best(rows[3], 1) == pytest.approx(2.5)
    assert table.vs_best(rows[4], 1) == pytest.approx(3.0)  # against the bf16 original
    assert table.vs_best(rows[5], 1) == pytest.approx(10 / 12)
    data = table.to_dict()
    assert data["best_original"][1] == {"fp32": "openvino", "bf16": "openvino bf16"}
    assert data["rows"][4]["precision"] == "bf16"


def test_openvino_runs_the_caffe_googlenet_at_32x32_once_its_wide_ceil_windows_are_padded(tmp_path):
    """At 32x32 the GoogLeNet's pool4 sees a 2x2 map with a 3x3 ceil-mode window, which OpenVINO's ONNX
    reader refuses; the lowering pads it with -inf (exact at this size) and OpenVINO then computes the
    model, in f32 within the whole-model tolerance, at any batch."""
    pytest.importorskip("openvino")
    from fxrebirth.measure.runners import export_onnx
    from fxrebirth.paper.models import googlenet_lrn

    model, x = googlenet_lrn(width=0.25).eval(), torch.randn(2, 3, 32, 32)
    assert frontend.needs_lowering(model, "openvino") and not frontend.needs_lowering(model, "onnxruntime")
    plain = export_onnx(model, x, str(tmp_path / "plain.onnx"), dynamic_batch=True)
    with pytest.raises(RuntimeError, match="larger than the data shape after padding"):
        deploy.OpenVINOModule(plain)
    lowered, note = lower_for(model, "openvino", x)
    assert note.startswith("1 ceil-mode max pooling(s) wider than their input")
    path = export_onnx(lowered, x, str(tmp_path / "lowered.onnx"), dynamic_batch=True)
    module = deploy.OpenVINOModule(path, "f32")
    for batch in (2, 5):
        xb = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            assert relative_error(module(xb), model(xb)) <= 1e-5
    at_224 = torch.randn(1, 3, 224, 224)
    assert lower_for(model, "openvino", at_224) == (model, "")  # every window fits there: nothing changes


def test_a_runtime_accuracy_is_what_that_runtime_computes_or_nothing_where_it_cannot_run(monkeypatch):
    pytest.importorskip("openvino")
    from fxrebirth.paper.data import Shapes
    from fxrebirth.paper.models import googlenet_lrn
    from fxrebirth.paper.runner import runtime_accuracies
    from fxrebirth.retraining.train import evaluate

    torch.manual_seed(0)
    model, test = googlenet_lrn(width=0.25).eval(), Shapes("test", 120, 32, seed=0)
    got = runtime_accuracies({"original": model}, test, 32, runtime="openvino")
    assert set(got) == {"original (openvino)"}
    assert abs(got["original (openvino)"] - evaluate(model, test).top1) <= 1 / 120  # f32: the same predictions
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert runtime_accuracies({"original": model}, test, 32) == {}
