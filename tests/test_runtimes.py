"""The runtime registry (fxrebirth.measure.runtimes): a runtime is one record, and a record registered here,
in a test, gets a row in the speed table, its memory, its report and an ``export`` target with no other
edit; unknown and missing runtimes are refused in one line; no runtime's name is written anywhere else in
the package."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from fxrebirth.errors import FxRebirthError
from fxrebirth.measure import devicetimer, runtimes, speed
from fxrebirth.measure.runtimes import (Runtime, available, get_runtime, register_runtime, runtime_names,
                                        target_names)

ROOT = Path(__file__).resolve().parents[1]
TOY = "toy eager"

# Files whose owners are still moving their runtime names to the registry (issue 38: fxrebirth/paper's
# report and runner still write "eager"); the lead empties this set once they read DEFAULT_RUNTIME /
# runtime_names(...) / get_runtime(...) too.
ALLOWED_FOR_NOW: set = set()
# The registry itself, and the device-side timing script (it runs with numpy and the runtime only, so it
# holds its own table, checked against the registry below).
EXEMPT = {"fxrebirth/measure/runtimes.py", "fxrebirth/measure/devicetimer.py"}


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


@pytest.fixture
def registry(monkeypatch):
    """The registry as it is, restored after the test."""
    monkeypatch.setattr(runtimes, "_REGISTRY", dict(runtimes._REGISTRY))
    return runtimes._REGISTRY


@pytest.fixture
def toy(registry):
    """A runtime written here: PyTorch eager under another name, in the fast table, plannable, an export
    target writing ONNX (checked by ONNX Runtime)."""
    return register_runtime(Runtime(
        TOY, "fxrebirth.measure.runners:eager_runner", tags=frozenset({"plannable", "fast", "export"}),
        target="toy-onnx", save="fxrebirth.measure.deploy:save_onnx", load="fxrebirth.measure.deploy:load_onnx"))


def test_a_runtime_registered_in_a_test_gets_a_row_with_its_memory_and_report(toy):
    assert TOY in runtime_names("fast") and TOY in runtime_names("plannable") and TOY not in runtime_names("device")
    table = speed.benchmark(tiny(), exact=None, reborn=tiny(), image_size=16, batches=(1,), rounds=1,
                            runtimes=[TOY], layers=False)
    rows = {(r.variant, r.runtime): r for r in table.rows}
    assert set(rows) == {("original", runtimes.DEFAULT_RUNTIME), ("original", TOY), ("reborn", TOY)}
    for row in rows.values():
        assert row.note == "" and row.ms[1] > 0 and row.size_mb > 0
        assert row.memory["peak_mb"] >= row.memory["baseline_mb"] > 0  # its own process knew the record
    assert table.ratio(rows["reborn", TOY], 1) == rows["original", TOY].ms[1] / rows["reborn", TOY].ms[1]
    assert f"| reborn | {TOY} |" in table.markdown()
    data = json.loads(json.dumps(table.to_dict()))
    assert {r["precision"] for r in data["rows"]} == {"fp32"}


def test_a_registered_export_target_is_written_and_checked(toy, tmp_path):
    pytest.importorskip("onnxruntime")
    from fxrebirth.frontends.deploy import export_model, lower_for

    assert "toy-onnx" in target_names()
    model, x = tiny(), torch.randn(1, 3, 16, 16)
    written = export_model(model, x, "toy-onnx", str(tmp_path / "m.onnx"))
    assert written.error <= 1e-5 and (tmp_path / "m.onnx").exists()
    assert lower_for(model, TOY, x) == (model, "")
    with pytest.raises(FxRebirthError, match="unknown export target 'nope'; use one of onnx, .*toy-onnx"):
        export_model(model, x, "nope", str(tmp_path / "n.onnx"))


def test_a_registered_runtime_is_a_choice_of_the_command_line(toy, tmp_path, capsys):
    """``bench --rows``, ``plan --runtime`` and ``export --to`` offer it with no other edit."""
    from fxrebirth.cli import main

    model = ["tests.test_runtimes:tiny", "--input-size", "16"]
    assert main(["bench", *model, "--batch", "1", "--rounds", "1", "--rows", TOY, "--no-memory", "--no-reborn",
                 "--json"]) == 0
    rows = {(r["variant"], r["runtime"]) for r in json.loads(capsys.readouterr().out)["rows"]}
    assert ("original", TOY) in rows and ("exact tier", TOY) not in rows
    assert main(["plan", *model, "--runtime", TOY, "--rounds", "1", "--json"]) == 0
    capsys.readouterr()
    pytest.importorskip("onnxruntime")
    assert main(["export", *model, "--to", "toy-onnx", "--save", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").exists()


def test_a_lowering_named_by_the_record_is_applied(registry):
    from fxrebirth.frontends.deploy import lower_for, needs_lowering

    halved = nn.Identity()
    register_runtime(Runtime("toy lowered", "fxrebirth.measure.runners:eager_runner",
                             lowering=lambda model, x: (halved, "replaced")))
    assert lower_for(tiny(), "toy lowered", torch.randn(1, 3, 8, 8)) == (halved, "replaced")
    assert needs_lowering(tiny(), "toy lowered")


def test_unknown_runtimes_are_refused_naming_the_known_ones(registry):
    with pytest.raises(FxRebirthError) as caught:
        get_runtime("nope")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("unknown runtime 'nope'; known: ")
    assert all(name in message for name in runtime_names())
    with pytest.raises(FxRebirthError, match="unknown runtime 'nope'"):
        speed.variants_for(["nope"])
    with pytest.raises(FxRebirthError, match="already registered"):
        register_runtime(get_runtime(runtimes.DEFAULT_RUNTIME))
    register_runtime(get_runtime(runtimes.DEFAULT_RUNTIME), replace=True)


def test_a_runtime_whose_module_is_missing_says_why_in_one_line(registry):
    register_runtime(Runtime("ghost", "fxrebirth.measure.runners:eager_runner", module="fxrebirth_no_such_pkg.sub",
                             install="fxrebirth-no-such-pkg"))
    reason = available("ghost")
    assert reason == "fxrebirth_no_such_pkg is not installed (pip install 'fxrebirth-no-such-pkg')"
    assert available(runtimes.DEFAULT_RUNTIME) is None
    table = speed.speed_table(tiny(), image_size=8, batches=(1,), rounds=1, memory=False,
                              variants=[("original", runtimes.DEFAULT_RUNTIME), ("original", "ghost")])
    assert table.row("original", "ghost").note == f"unavailable: {reason}"


def test_the_default_table_is_todays():
    """The registry reproduces the table that was written out by hand before it (and the report's names)."""
    assert runtime_names() == ("eager", "fx fuse", "inductor+freezing", "compile(fxrebirth)", "onnxruntime",
                               "openvino", "openvino bf16", "compile(openvino)", "executorch")
    assert runtimes.variants_of()[-7:] == [("reborn", r) for r in ("eager", "compile(fxrebirth)", "onnxruntime",
                                                                   "openvino", "openvino bf16", "compile(openvino)",
                                                                   "executorch")]
    assert [r for v, r in runtimes.variants_of() if v == "exact tier"] == ["eager", "executorch"]
    assert target_names() == ("onnx", "openvino", "executorch")
    assert runtime_names("fast") == ("eager", "onnxruntime") and runtime_names("cost") == ("eager", "onnxruntime")
    assert [get_runtime(n).precision for n in runtime_names()].count("bf16") == 1


def test_the_device_script_runs_the_runtimes_tagged_device():
    assert set(devicetimer.RUNTIMES) == set(runtime_names("device"))
    for name in devicetimer.RUNTIMES:
        assert get_runtime(name).suffix == ".onnx"  # a bundle holds ONNX files


def _literals(path: Path, names: set[str]) -> list[str]:
    """``line: text`` of every string constant in ``path`` equal to one of ``names``, or an argument of
    ``startswith``/``endswith`` that is a word of one (``bf16``, ``openvino``); a value of a ``"compiler"`` key is torch.compile's
    inner compiler (torch._dynamo's name), not a runtime."""
    tree = ast.parse(path.read_text())
    skip = {id(v) for d in ast.walk(tree) if isinstance(d, ast.Dict)
            for k, v in zip(d.keys, d.values) if isinstance(k, ast.Constant) and k.value == "compiler"}
    words = {w for n in names for w in re.split(r"[ ()+]", n) if len(w) >= 4}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in names and id(node) not in skip:
            found.append(f"{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "endswith"):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and arg.value in words:
                    found.append(f"{node.lineno}: {node.func.attr}({arg.value!r})")
    return found


def test_no_runtime_name_is_written_outside_the_registry():
    names = set(runtime_names()) | set(target_names())
    found = {}
    for path in sorted((ROOT / "fxrebirth").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in EXEMPT or any(rel == a or rel.startswith(a + "/") for a in ALLOWED_FOR_NOW):
            continue
        hits = _literals(path, names)
        if hits:
            found[rel] = hits
    assert not found, f"runtime names written outside fxrebirth/measure/runtimes.py: {found}"


def test_the_literal_finder_finds_them(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('a = "openvino bf16"\nb = runtime.endswith("bf16")\nc = {"compiler": "eager"}\nd = "eager"\n')
    assert _literals(bad, set(runtime_names())) == ["1: 'openvino bf16'", "2: endswith('bf16')", "4: 'eager'"]


def test_the_backends_inner_compilers_are_torch_dynamos():
    """``torch.compile(backend="fxrebirth", options={"compiler": ...})`` takes the names torch._dynamo registered
    (its registry, not ours), itself excepted, and refuses others in one line naming them."""
    from fxrebirth.errors import PipelineError
    from fxrebirth.frontends.backend import BackendOptions

    assert BackendOptions.from_dict({"compiler": "aot_eager"}).compiler == "aot_eager"
    for wrong in ("nope", "fxrebirth"):
        with pytest.raises(PipelineError) as caught:
            BackendOptions.from_dict({"compiler": wrong})
        message = str(caught.value)
        assert "\n" not in message and message.startswith(f"compiler={wrong!r}: use a torch.compile backend")
        assert "inductor" in message and ", fxrebirth," not in message
