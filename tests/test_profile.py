"""Planning for another device: the bundle of what the planners time, timed where torch is not, read back.

The "device" is a subprocess in which ``import torch`` and ``import fxrebirth`` fail, so the timing script
is proven to need only numpy and the runtime. The planners must then take every latency from the table
(and obey it where it contradicts this machine), and refuse a table measured for anything else.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxrebirth
from fxrebirth.cli import main
from fxrebirth.equivalence import relative_error, tolerance
from fxrebirth.measure.bundle import TableMismatch
from fxrebirth.measure.devicetimer import time_bundle
from fxrebirth.paper.models import googlenet_lrn
from fxrebirth.retraining.profiling import profile

pytest.importorskip("onnxruntime")

PAPER = ("streamline", "branch")  # the paper's strategies: the "regions" planner's 11 candidates here
_NO_TORCH = "raise ImportError('{0} is not on the device')\n"


def _time_on_device(folder, tmp_path, runtime: str) -> dict:
    """Run the bundle's own script in a fresh Python where torch and fxrebirth cannot be imported."""
    blocker = tmp_path / "device-site"
    for name in ("torch", "fxrebirth"):
        (blocker / name).mkdir(parents=True, exist_ok=True)
        (blocker / name / "__init__.py").write_text(_NO_TORCH.format(name))
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    done = subprocess.run([sys.executable, "time_on_device.py", ".", "--runtime", runtime, "--rounds", "3",
                           "--threads", "2"], cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pairs and the whole model timed" in done.stdout
    with open(folder / f"latency-{runtime}.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model = googlenet_lrn(width=0.25).eval()
    x = torch.randn(1, 3, 64, 64)
    folder = tmp_path_factory.mktemp("bundle")
    profile(model, x, str(folder), strategies=PAPER)
    return model, x, folder


def test_a_bundle_holds_what_the_planner_times_and_its_files_compute_it(bundle):
    import onnxruntime as ort

    model, x, folder = bundle
    with open(folder / "manifest.json") as f:
        manifest = json.load(f)
    planned = fxrebirth.plan(model, x, strategies=PAPER, rounds=1)
    assert [e["key"] for e in manifest["pairs"]] == [c.region.id for c in planned.candidates]
    assert manifest["whole"]["input_shape"] == [1, 3, 64, 64] and manifest["planner"] == "regions"
    assert {"time_on_device.py", "fxrebirth_timing.py", "model.onnx"} <= set(os.listdir(folder))
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    assert relative_error(got, expected) <= 10 * tolerance(torch.float32)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_timed_without_torch_the_table_gives_every_latency_of_the_plan(bundle, tmp_path, runtime):
    pytest.importorskip(runtime)
    model, x, folder = bundle
    table = _time_on_device(folder, tmp_path, runtime)
    assert table["runtime"] == runtime and table["threads"] == 2 and table["rounds"] == 3
    planned = fxrebirth.plan(model, x, strategies=PAPER, device_table=str(folder / f"latency-{runtime}.json"))
    assert planned.source.startswith(f"device table latency-{runtime}.json: {runtime} ")
    assert planned.latency_s == pytest.approx(table["whole"]["ms"] / 1e3)
    for c in planned.candidates:
        assert c.latency_now_s == pytest.approx(table["pairs"][c.region.id]["now_ms"] / 1e3)
        assert c.latency_new_s == pytest.approx(table["pairs"][c.region.id]["new_ms"] / 1e3)
    assert all(c.gain_s > 0 for c in planned.selected)


def test_the_plan_obeys_the_device_where_this_machine_would_disagree(bundle):
    """Every other rebirth layer made twice as slow as its region in the table: exactly those are dropped."""
    model, x, folder = bundle
    table = time_bundle(str(folder), "onnxruntime", rounds=2, threads=2)
    keys = sorted(table["pairs"])
    for key in keys[::2]:
        table["pairs"][key]["new_ms"] = 2 * table["pairs"][key]["now_ms"]
    for key in keys[1::2]:
        table["pairs"][key]["new_ms"] = table["pairs"][key]["now_ms"] / 2
    planned = fxrebirth.plan(model, x, strategies=PAPER, device_table=table)
    assert sorted(c.region.id for c in planned.selected) == keys[1::2]


def _edited(table: dict, edit: str) -> dict:
    table = json.loads(json.dumps(table))
    if edit == "format":
        table["format"] = "something-else/1"
    elif edit == "planner":
        table["planner"] = "depth"
    elif edit == "missing":
        table["pairs"].pop(sorted(table["pairs"])[0])
    elif edit == "shape":
        key = sorted(table["pairs"])[0]
        table["pairs"][key]["input_shape"][2] += 1
    return table


@pytest.mark.parametrize("edit, message", [
    ("format", "not a fxrebirth-latency/1 table"),
    ("planner", "profiled for the 'depth' planner, this is the 'regions' one: run `fxrebirth profile` with the "
                "--strategy options of this plan"),
    ("missing", "lacks 1 of the 11 candidates"),
    ("shape", "at another input shape"),
])
def test_a_table_measured_for_something_else_is_refused(bundle, edit, message):
    model, x, folder = bundle
    table = _edited(time_bundle(str(folder), "onnxruntime", rounds=1, threads=2), edit)
    with pytest.raises(TableMismatch, match=re.escape(message)):
        fxrebirth.plan(model, x, strategies=PAPER, device_table=table)


def test_a_table_at_another_input_size_or_from_another_bundle_is_refused(bundle, tmp_path):
    model, x, folder = bundle
    table = time_bundle(str(folder), "onnxruntime", rounds=1, threads=2)
    with pytest.raises(TableMismatch, match=r"measured at input \[1, 3, 64, 64\], this plan is at \[1, 3, 72, 72\]"):
        fxrebirth.plan(model, torch.randn(1, 3, 72, 72), strategies=PAPER, device_table=table)
    other = tmp_path / "other"
    profile(model, x, str(other), strategies=PAPER)
    (other / "latency-onnxruntime.json").write_text(json.dumps(table))  # the first bundle's table
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"] = "edited"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TableMismatch, match="measured from another bundle than the manifest beside it"):
        fxrebirth.plan(model, x, strategies=PAPER, device_table=str(other / "latency-onnxruntime.json"))
    with pytest.raises(ValueError, match="give one of latency_table=, device_table= or runtime="):
        fxrebirth.plan(model, x, strategies=PAPER, device_table=table, runtime="onnxruntime")


class _Inverted(nn.Module):
    """Stem and two inverted residuals: the depth planner's candidates."""

    def __init__(self, c=8, e=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), nn.ReLU6())
        self.blocks = nn.ModuleList(nn.Sequential(
            nn.Conv2d(c, c * e, 1), nn.BatchNorm2d(c * e), nn.ReLU6(),
            nn.Conv2d(c * e, c * e, 3, 1, 1, groups=c * e), nn.BatchNorm2d(c * e), nn.ReLU6(),
            nn.Conv2d(c * e, c, 1), nn.BatchNorm2d(c)) for _ in range(2))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def test_a_depth_plan_takes_its_latencies_from_a_depth_bundle(tmp_path, bundle):
    torch.manual_seed(0)
    model = _Inverted().eval()
    x, calibration = torch.randn(1, 3, 64, 64), torch.randn(16, 3, 16, 16)
    folder = tmp_path / "depth"
    profile(model, x, str(folder), strategies=["depth"])
    table = _time_on_device(folder, tmp_path, "onnxruntime")
    assert table["planner"] == "depth" and table["pairs"]
    planned = fxrebirth.plan(model, x, strategies=["depth"], calibration=calibration,
                             device_table=str(folder / "latency-onnxruntime.json"))
    assert planned.source.startswith("device table latency-onnxruntime.json")
    assert {c.region.id for c in planned.candidates} == set(table["pairs"])
    for c in planned.candidates:
        assert c.latency_now_s == pytest.approx(table["pairs"][c.region.id]["now_ms"] / 1e3)
        assert c.latency_new_s == pytest.approx(table["pairs"][c.region.id]["new_ms"] / 1e3)
    regions_table = str(bundle[2] / "latency-onnxruntime.json")
    if not os.path.exists(regions_table):
        (bundle[2] / "latency-onnxruntime.json").write_text(
            json.dumps(time_bundle(str(bundle[2]), "onnxruntime", rounds=1, threads=2)))
    with pytest.raises(TableMismatch, match="profiled for the 'regions' planner, this is the 'depth' one"):
        fxrebirth.plan(model, x, strategies=["depth"], calibration=calibration, device_table=regions_table)


def test_the_command_line_profiles_plans_from_the_table_and_refuses_bad_use(tmp_path, capsys):
    folder = tmp_path / "cli"
    paper = ["--strategy", "streamline", "--strategy", "branch"]
    assert main(["profile", "googlenet_lrn", "--input-size", "64", "--out", str(folder), *paper]) == 0
    out = capsys.readouterr().out
    assert "11 candidate pairs" in out and "python time_on_device.py . --runtime onnxruntime" in out
    table = folder / "latency-onnxruntime.json"
    table.write_text(json.dumps(time_bundle(str(folder), "onnxruntime", rounds=1, threads=2)))
    plan = ["plan", "googlenet_lrn", *paper, "--table"]
    assert main([*plan, str(table), "--input-size", "64"]) == 0
    assert "device table latency-onnxruntime.json" in capsys.readouterr().out
    assert main([*plan, str(table), "--input-size", "64", "--runtime", "onnxruntime"]) == 2
    assert "give --table or --runtime onnxruntime, not both" in capsys.readouterr().err
    assert main([*plan, str(tmp_path / "none.json"), "--input-size", "64"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main([*plan, str(table), "--input-size", "72"]) == 2
    assert "this plan is at [1, 3, 72, 72]" in capsys.readouterr().err


def test_a_depth_plan_takes_a_device_table_or_a_runtime_not_both(tmp_path):
    torch.manual_seed(0)
    model, x = _Inverted().eval(), torch.randn(1, 3, 32, 32)
    folder = tmp_path / "depth"
    profile(model, x, str(folder), strategies=["depth"])
    table = time_bundle(str(folder), "onnxruntime", rounds=1, threads=2)
    with pytest.raises(ValueError, match="give one of latency_table=, device_table= or runtime="):
        fxrebirth.plan(model, x, strategies=["depth"], calibration=torch.randn(8, 3, 16, 16), runtime="openvino",
                       device_table=table)


def test_a_bundle_refuses_a_reduce_ratio_the_planner_refuses(bundle, tmp_path):
    model, x, _ = bundle
    with pytest.raises(ValueError, match=r"reduce_ratio=1.5 is out of range; give a number in \(0, 1\]"):
        profile(model, x, str(tmp_path / "b"), strategies=PAPER, reduce_ratio=1.5)
    assert not (tmp_path / "b").exists()
