"""The command line: optimize a model, JSON output, errors, saving, weights."""

from __future__ import annotations

import json

import pytest
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


def test_optimize_torchvision_model_saves_a_program_that_matches(tmp_path, capsys):
    """A torchvision model with trained-looking BatchNorm statistics (so folding changes the weights),
    optimised and saved by the CLI, loads as a torch.export program and matches the original."""
    import torchvision

    from fxrebirth.testing import assert_equivalent, randomize_batchnorm

    reference = randomize_batchnorm(torchvision.models.resnet18(weights=None)).eval()
    weights, target = tmp_path / "resnet18.pt", tmp_path / "resnet18.pt2"
    torch.save(reference.state_dict(), weights)
    argv = ["optimize", "resnet18", "--weights", str(weights), "--input-size", "64", "--save", str(target)]
    assert main(argv) == 0
    assert "bn_into_preceding" in capsys.readouterr().out
    program = torch.export.load(str(target))
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes)
    # norm-wise relative error, the project's float32 bound: folding reorders float32 sums, so single
    # logits near zero can differ relatively more (measured once: 1.4e-5 absolute on one of 1000)
    assert_equivalent(reference, program.module(), torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))


def test_bad_factory_is_a_clear_error(capsys):
    assert main(["optimize", "no_such_package:factory"]) == 2
    assert "cannot load factory 'no_such_package:factory'" in capsys.readouterr().err


def test_plan_prints_and_saves_the_plan(tmp_path, capsys):
    target = tmp_path / "plan.json"
    assert main(["plan", "alexnet_lrn", "--input-size", "96", "--rounds", "1", "--save", str(target)]) == 0
    out = capsys.readouterr().out
    assert "streamline:conv1.conv" in out and "conv1.conv, conv1.relu, norm1, pool1" in out
    import fxrebirth

    plan = fxrebirth.Plan.from_json(target.read_text())
    streamline = [c.region.id for c in plan.candidates if c.strategy == "streamline"]
    assert streamline[:2] == ["streamline:conv1.conv", "streamline:conv2.conv"]



def test_plan_and_bench_take_the_streamline_kernel_policy(tmp_path, capsys):
    """--streamline-kernel conv reaches the planner from plan and bench. GoogLeNet's conv1 (7x7 stride 2,
    padded, then a 3x3 stride-2 pooling) becomes a 7x7 stride-4 rebirth layer instead of the 11x11 of its
    field. AlexNet's unpadded conv1 (11x11 stride 4, pooled) keeps its 19x19 field under either policy: an
    unpadded chain's output size floor((n - 19) / 8) + 1 is reproduced at every size only by a kernel of
    19 + 2 * padding, so nothing smaller is offered. --streamline-kernel pool keeps each first convolution as it
    is (its stride too: the pooling stays after it)."""
    import fxrebirth

    kernels = {}
    for model, size in (("googlenet_lrn", "64"), ("alexnet_lrn", "96")):
        for policy in ("field", "conv", "pool"):
            target = tmp_path / f"{model}-{policy}.json"
            assert main(["-q", "plan", model, "--input-size", size, "--rounds", "1", "--streamline-kernel",
                         policy, "--strategy", "streamline", "--save", str(target)]) == 0
            first = fxrebirth.Plan.from_json(target.read_text()).candidates[0].region.proposal
            kernels[model, policy] = (tuple(first.kernel_size), tuple(first.stride))
    assert kernels == {("googlenet_lrn", "field"): ((11, 11), (4, 4)), ("googlenet_lrn", "conv"): ((7, 7), (4, 4)),
                       ("alexnet_lrn", "field"): ((19, 19), (8, 8)), ("alexnet_lrn", "conv"): ((19, 19), (8, 8)),
                       ("googlenet_lrn", "pool"): ((7, 7), (2, 2)), ("alexnet_lrn", "pool"): ((11, 11), (4, 4))}
    gflops = {}
    for policy in ("field", "conv"):  # the reborn rows' work follows the policy
        capsys.readouterr()
        assert main(["bench", "googlenet_lrn", "--input-size", "64", "--batch", "2", "--rounds", "1", "--rows",
                     "eager", "--no-memory", "--all-regions", "--streamline-kernel", policy, "--json",
                     "--strategy", "streamline", "--strategy", "branch"]) == 0
        rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
        gflops[policy] = rows["reborn"]["gflops"]
        assert rows["original"]["gflops"] > gflops[policy]
    assert gflops["conv"] < gflops["field"]


def test_plan_keep_leaves_regions_unmerged_and_a_typo_is_an_error(tmp_path, capsys):
    import fxrebirth

    target = tmp_path / "plan.json"
    assert main(["-q", "plan", "googlenet_lrn", "--input-size", "64", "--rounds", "1", "--keep", "streamline:",
                 "--keep", "branch:blocks.inception5b", "--strategy", "streamline", "--strategy", "branch", "--save",
                 str(target)]) == 0
    plan = fxrebirth.Plan.from_json(target.read_text())
    assert len(plan.candidates) == 11
    kept = {c.region.id for c in plan.candidates if not c.selected}
    assert {"streamline:conv1.conv", "streamline:conv2.conv", "branch:blocks.inception5b"} <= kept
    capsys.readouterr()
    assert main(["-q", "plan", "googlenet_lrn", "--input-size", "64", "--rounds", "1", "--keep", "conv1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "keep 'conv1': no candidate has that id or prefix" in err
    assert "streamline:conv1.conv" in err


TINY_RUN = ["--image-size", "32", "--plan-size", "32", "--train-images", "64", "--test-images", "40",
            "--teacher-epochs", "1", "--width", "0.125", "--epochs", "0.25", "--latency-rounds", "2",
            "--bench", "fast", "--bench-batch", "1", "2", "--strategy", "streamline", "--strategy", "branch"]
"""The paper's experiment (its two strategies) on the default teacher, at a tiny size."""


def test_run_end_to_end_on_a_tiny_configuration(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FXREBIRTH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    assert main(["-q", "run", "--out", str(out), *TINY_RUN]) == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "report.json", "plan.json", "curves.png", "steps.png", "layers.png", "tradeoff.png",
                 "reborn.pt2"):
        assert (out / name).exists(), name
    data = json.loads((out / "report.json").read_text())
    rebirth, latency = data["rebirth"], data["latency"]
    steps = rebirth["steps"]
    init = rebirth["config"]["init"]
    assert [s["name"] for s in steps] == [f"init {init}", "layer-wise distillation", "end-to-end distillation"]
    assert sum(s["trained_images"] for s in steps) == rebirth["trained_images"]
    # the accuracy budget's search (the default): validation split held out of the 64 training images, every
    # point tried recorded, all of them within a quarter of the teacher's images, the test split evaluated once
    splits, search = data["data"], data["search"]
    assert splits["train"] + splits["val"] == 64 and splits["val"] >= 1 and splits["test"] == 40
    assert rebirth["retraining_epochs"] == rebirth["trained_images"] / splits["train"]
    assert search["trials"] and search["trained_images"] == sum(t["trained_images"] for t in search["trials"])
    assert search["trained_images"] <= search["budget_images"] == 64 // 4
    chosen = [t for t in search["trials"] if t["index"] == search["chosen"]]
    assert chosen and chosen[0]["drop"] <= 0.5 and chosen[0]["trained_images"] == rebirth["trained_images"]
    assert sorted(c["region"]["id"] for c in data["plan"]["candidates"] if c["selected"]) == chosen[0]["chosen"]
    assert (out / "search.json").exists() and (out / "front.png").exists()
    assert "## Accuracy budget" in printed
    assert rebirth["student"]["images"] == 40 and 0 <= rebirth["student"]["top1"] <= 1
    assert latency["speedup"] == latency["original_ms"] / latency["reborn_ms"]
    assert data["teacher"]["cached"] is False and list((tmp_path / "cache").glob("teacher-*.pt"))
    # the economics: the teacher's cost from its training record, and the scratch control on the same budget
    assert rebirth["teacher_cost"]["images"] == 1 * 64 and rebirth["teacher_share"] == rebirth["trained_images"] / 64
    assert rebirth["control"]["trained_images"] == rebirth["trained_images"] and 0 <= rebirth["control"]["top1"] <= 1
    report_md = (out / "report.md").read_text()
    assert "## Speed" in printed and f"{latency['speedup']:.2f}x" in report_md
    # the speed table: eager and ONNX Runtime rows at both batch sizes, memory measured, ratios consistent
    rows = {(r["variant"], r["runtime"]): r for r in data["speed"]["rows"]}
    assert set(rows) == {("original", "eager"), ("original", "onnxruntime"), ("exact tier", "eager"),
                         ("reborn", "eager"), ("reborn", "onnxruntime")}
    for row in rows.values():
        assert set(row["ms"]) == {"1", "2"} and row["memory"]["peak_mb"] >= row["memory"]["baseline_mb"]
        base = rows[("original", row["runtime"])]["ms"]["2"]
        assert row["speedup_same_runtime"]["2"] == pytest.approx(base / row["ms"]["2"])
        assert f"| {row['variant']} | {row['runtime']} | {row['ms']['1']:.2f} |" in report_md
    # the exact tier is evaluated and equals the teacher; each layer kind timed before and after
    assert data["accuracy"]["exact tier"] == data["accuracy"]["original"] == rebirth["teacher"]["top1"]
    assert "lrn" in data["layers_ms"]["original"] and "conv" in data["layers_ms"]["reborn"]
    assert "max_pool" in data["layers_ms"]["original"]
    program = torch.export.load(out / "reborn.pt2")
    x = torch.randn(2, 3, 32, 32)
    assert program.module()(x).shape == (2, 10)
    # a second run finds the cached teacher and the finished retraining checkpoint
    assert main(["-q", "run", "--out", str(out), *TINY_RUN]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["teacher"]["cached"] is True and again["rebirth"]["resumed_from"]
    assert again["rebirth"]["student"] == rebirth["student"]
    # resuming under other planning settings would train the old plan's layers: refused, named
    capsys.readouterr()
    assert main(["-q", "run", "--out", str(out), *TINY_RUN, "--streamline-kernel", "conv"]) == 2
    err = capsys.readouterr().err
    assert "{'streamline_kernel': 'conv'} now" in err and "give a fresh --out" in err and err.count("\n") == 1
    # a point's checkpoints are named by its set of merges: a search with another --keep reads back the sets it
    # already trained and trains only the new ones
    assert main(["-q", "run", "--out", str(out), *TINY_RUN, "--keep", "streamline:conv1.conv"]) == 0
    kept = json.loads((out / "report.json").read_text())
    assert all("streamline:conv1.conv" not in t["chosen"] for t in kept["search"]["trials"])


def test_run_bad_inputs_are_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "images"
    (empty / "cat").mkdir(parents=True)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    cases = [
        (["run", "resnet18", "--weights", str(tmp_path / "missing.pt")], "no such file"),
        (["run", "resnet18", "--weights", str(corrupt)], "not a readable state_dict"),
        (["run", "--reduce-ratio", "0"], "--reduce-ratio 0.0: give a fraction in (0, 1]"),
        (["plan", "googlenet_lrn", "--reduce-ratio", "1.5"], "--reduce-ratio 1.5: give a fraction"),
        (["run", "vgg11"], "give --weights"),
        (["run", "mobilenet_v2", "--target", "0.9"], "--target 0.9: a target speed-up is above 1"),
        (["run", "resnet18", "--device", "gpu0", "--out", str(tmp_path / "r")], "device='gpu0'"),
        # refused before the teacher trains
        (["run", "--device", "gpu0", "--out", str(tmp_path / "r")], "device='gpu0'"),
        (["run", "--augment", "flip+rotate", "--out", str(tmp_path / "r")], "augment='flip+rotate'"),
    ]
    if not torch.cuda.is_available():
        cases += [(["run", "--precision", "fp16", "--out", str(tmp_path / "r")], "fp16' needs a CUDA device"),
                  (["run", "--device", "cuda", "--out", str(tmp_path / "r")], "sees no CUDA device")]
    import torchvision

    wrong, weights = tmp_path / "r18-2.pt", tmp_path / "r18.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)  # (another class count fits: the classifier is sized by it)
    cases.append((["run", "resnet18", "--weights", str(wrong), "--data", str(empty)], "does not fit resnet18"))
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cases.append((["run", "resnet5O", "--weights", str(weights)], "unknown model 'resnet5O'"))
    cases.append((["run", "resnet18", "--weights", str(weights), "--data", str(empty)], "image folder"))
    cases.append((["run", "resnet18", "--weights", str(weights), "--data", str(tmp_path / "nowhere")],
                  "does not exist"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fxrebirth: error:") and message in err and "Traceback" not in err, (argv, err)
        assert err.count("\n") == 1, err


def raising_factory() -> nn.Module:
    """A factory that fails (for the one-line error test)."""
    raise ValueError("no weights here")


def test_bad_inputs_are_one_line_errors_with_exit_code_2(tmp_path, capsys, monkeypatch):
    """Never a traceback: each bad input is one 'fxrebirth: error:' line and exit code 2, found before
    any model is optimised."""
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    weights = tmp_path / "w.pt"
    torch.save(small_net().state_dict(), weights)
    cases = [
        (["optimize", "resnet18", "--weights", str(tmp_path)], "is a directory"),
        (["optimize", "test_cli:raising_factory"], "factory 'test_cli:raising_factory' raised ValueError: no weights"),
        (["optimize", "test_cli:TINY_RUN"], "not a function"),
        (["optimize", "test_cli:small_net", "--weights", str(weights), "--save", str(tmp_path / "no" / "m.pt2")],
         "does not exist"),
        (["optimize", "test_cli:small_net", "--save", str(tmp_path)], "is a directory"),
        (["optimize", "resnet18", "--batch", "0"], "--batch 0: give a whole number of at least 1"),
        (["optimize", "resnet18", "--batch", "-3"], "--batch -3"),
        (["optimize", "resnet18", "--input-size", "-5"], "--input-size -5"),
        (["optimize", "resnet18", "--input-size", "0"], "--input-size 0"),
        (["bench", "resnet18", "--batch", "1", "0"], "--batch 0"),
        (["bench", "resnet18", "--rounds", "0"], "--rounds 0"),
        (["bench", "resnet18", "--threads", "0"], "--threads 0: give a whole number of at least 1"),
        (["export", "resnet18", "--to", "onnx", "--save", str(tmp_path / "no" / "m.onnx"), "--batch", "0"],
         "--batch 0"),
        (["plan", "alexnet_lrn", "--rounds", "0"], "--rounds 0"),
        (["plan", "alexnet_lrn", "--target", "-1"], "--target -1.0: a target speed-up is above 1"),
        (["plan", "alexnet_lrn", "--budget-ms", "nan"], "--budget-ms nan"),
        (["plan", "alexnet_lrn", "--save", str(tmp_path / "no" / "plan.json")], "does not exist"),
        (["bench", "resnet18", "--save", str(tmp_path / "no" / "t.md")], "does not exist"),
        (["run", "--out", str(weights)], "is a file"),
        (["run", "--epochs", "-1"], "--epochs -1.0: give a number >= 0"),
        (["run", "--train-images", "0"], "--train-images 0"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fxrebirth: error:") and message in err and "Traceback" not in err, (argv, err)
        assert err.count("\n") == 1, err


def test_unreadable_weights_file_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    monkeypatch.setattr("os.access", lambda path, mode: False)  # as for a file without read permission
    assert main(["optimize", "test_cli:small_net", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "not readable" in err and err.count("\n") == 1


def test_unexpected_failure_is_one_line_without_traceback(capsys, monkeypatch):
    import fxrebirth.cli

    def broken(args):
        raise TypeError("something inside broke")

    monkeypatch.setattr(fxrebirth.cli, "_optimize", broken)
    assert main(["optimize", "resnet18"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fxrebirth: error: TypeError: something inside broke") and "Traceback" not in err
    assert err.count("\n") == 1


def test_multi_line_library_error_is_printed_on_one_line(capsys):
    assert main(["optimize", "alexnet_lrn", "--input-size", "32"]) == 2  # too small: its pooling fails (two-line CaptureError)
    err = capsys.readouterr().err
    assert err.startswith("fxrebirth: error:") and err.count("\n") == 1 and "Traceback" not in err


TINY_DEPTH = ["mobilenet_v2", "--train-images", "64", "--test-images", "32", "--image-size", "32",
              "--plan-size", "64", "--teacher-epochs", "1", "--epochs", "0.5", "--target", "1.05", "--bench", "none",
              "--no-control", "--latency-rounds", "3", "--strategy", "depth", "--max-convs", "2", "--prune", "none"]
"""Depth merges of at most two convolutions, no pruned additions: 36 candidates to time instead of 137."""


def test_the_depth_job_end_to_end_on_a_tiny_configuration(tmp_path, capsys, monkeypatch):
    """A torchvision teacher through the same job: mobilenet_v2 has depth candidates only, so the plan holds
    those, retrained for one target and merged exactly."""
    monkeypatch.setenv("FXREBIRTH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "report"
    assert main(["-q", "run", "--out", str(out), *TINY_DEPTH]) == 0
    text = capsys.readouterr().out
    assert "# fxrebirth report" in text and "## Plan" in text
    result = json.loads((out / "report.json").read_text())
    chosen = [c for c in result["plan"]["candidates"] if c["selected"]]
    assert chosen and {c["region"]["kind"] for c in chosen} == {"depth"} and result["target"] == 1.05
    # half an epoch of the training split (the validation split held out of the 64 images), against 64 taught
    trained = round(0.5 * result["data"]["train"])
    assert result["rebirth"]["trained_images"] == trained and result["rebirth"]["teacher_share"] == trained / 64
    assert result["latency"]["speedup"] > 0 and (out / "plan.json").exists() and (out / "reborn.pt2").exists()
    # a second run reads the cached teacher, the saved plan and the finished checkpoint
    assert main(["-q", "run", "--out", str(out), *TINY_DEPTH]) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["teacher"]["cached"] and again["rebirth"]["student"] == result["rebirth"]["student"]


# one vocabulary: the flags' names, the strategy groups, options the chosen strategies do not read


def _parse(argv):
    from fxrebirth.cli_args import build_parser

    return build_parser().parse_args(argv)


@pytest.mark.parametrize("argv, dest, value", [
    (["plan", "m", "--target", "1.5"], "target", 1.5),
    (["plan", "m", "--rounds", "2"], "rounds", 2),
    (["bench", "m", "--target", "1.5"], "target", 1.5),
    (["bench", "m", "--rows", "eager", "--rows", "onnxruntime"], "rows", ["eager", "onnxruntime"]),
    (["run", "--target", "1.2", "--target", "1.5"], "target", [1.2, 1.5]),
    (["run", "--runtime", "onnxruntime"], "runtime", "onnxruntime"),
    (["bench", "m", "--runtime", "onnxruntime"], "runtime", "onnxruntime"),
    (["export", "m", "--to", "onnx", "--save", "m.onnx"], "save", "m.onnx"),
    (["profile", "m", "--out", "b", "--strategy", "depth"], "strategy", ["depth"]),
    (["run", "--strategy", "depth", "--strategy", "branch"], "strategy", ["depth", "branch"]),
    (["profile", "m", "--out", "b", "--max-convs", "3", "--prune", "none"], "prune", "none"),
])
def test_each_flag_has_its_one_name(argv, dest, value):
    assert getattr(_parse(argv), dest) == value


@pytest.mark.parametrize("argv", [
    ["run", "--plan-for", "onnxruntime"], ["bench", "m", "--plan-for", "onnxruntime"],
    ["plan", "m", "--target-speedup", "1.5"], ["plan", "m", "--repeats", "2"],
    ["export", "m", "--to", "onnx", "--save", "m.onnx", "--output", "m.onnx"], ["profile", "m", "--out", "b", "--depth"],
])
def test_the_old_names_are_gone(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(argv)
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_every_strategy_option_defaults_to_none_so_that_given_is_knowable():
    from fxrebirth.cli_args import PLANNING_FLAGS, TRAINING_FLAGS, explicit_options

    args = _parse(["run"])
    assert all(getattr(args, o) is None for o in {**PLANNING_FLAGS, **TRAINING_FLAGS}.values())
    assert explicit_options(args) == ()
    given = _parse(["run", "--init", "lstsq", "--prune", "all", "--schedule", "paper"])
    assert set(explicit_options(given)) == {"init", "prune", "schedule"}


@pytest.mark.parametrize("command, tag", [("optimize", "cost"), ("plan", "plannable"), ("profile", "device"),
                                          ("bench", "plannable"), ("run", "plannable")])
def test_runtime_takes_the_registrys_names(command, tag):
    """``--runtime`` means the runtime the model will run on in every command; its choices are the registry's."""
    from fxrebirth.measure.runtimes import runtime_names

    names = runtime_names(tag)
    assert names
    head = {"optimize": ["optimize", "m"], "plan": ["plan", "m"], "profile": ["profile", "m", "--out", "b"],
            "bench": ["bench", "m"], "run": ["run"]}[command]
    for name in names:
        assert _parse([*head, "--runtime", name]).runtime == name
    assert _parse(head).runtime is None  # None: eager, named by the registry


def test_run_help_groups_flags_by_strategy(capsys):
    with pytest.raises(SystemExit) as exit_:
        _parse(["run", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for title, flags in (("streamline strategy:", ["--streamline-kernel"]), ("branch strategy:", ["--reduce-ratio"]),
                         ("depth strategy:", ["--max-convs", "--prune"]),
                         ("retraining of streamline/branch layers:", ["--init", "--schedule", "--layerwise-epochs"])):
        section = text.split(title, 1)[1].split("\n\n", 1)[0]
        assert all(flag in section for flag in flags), (title, section)


@pytest.fixture
def no_work(monkeypatch):
    """Every loader, planner and job fails the test if called: what is refused is refused before any work."""
    import fxrebirth.cli
    import fxrebirth.paper.runner
    import fxrebirth.retraining.planning

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(fxrebirth.cli, "_load", forbidden)
    monkeypatch.setattr(fxrebirth.paper.runner, "run", forbidden)
    monkeypatch.setattr(fxrebirth.retraining.planning, "plan", forbidden)


@pytest.mark.parametrize("argv, message", [
    (["run", "resnet18", "--strategy", "depth", "--init", "lstsq"],
     "--init is read by the streamline and branch strategies; the chosen strategy is depth: drop --init or add "
     "--strategy streamline"),
    (["run", "--strategy", "streamline", "--reduce-ratio", "0.5"],
     "--reduce-ratio is read by the branch strategy; the chosen strategy is streamline: drop --reduce-ratio or add "
     "--strategy branch"),
    (["plan", "resnet18", "--strategy", "streamline", "--strategy", "branch", "--max-convs", "3"],
     "--max-convs is read by the depth strategy; the chosen strategies are streamline and branch"),
    (["bench", "resnet18", "--strategy", "depth", "--streamline-kernel", "conv"], "--streamline-kernel is read by"),
    (["profile", "resnet18", "--out", "b", "--strategy", "branch", "--prune", "all"], "--prune is read by the depth"),
    (["run", "--weights", __file__, "--width", "0.5"], "--width is the default googlenet_lrn teacher's"),
    (["run", "resnet18", "--width", "0.5"], "resnet18 takes no width: drop --width"),
    (["run", "--max-drop", "0"], "--max-drop 0.0: a drop of 0 or negative"),
    (["run", "--max-drop", "-1"], "--max-drop -1.0: a drop of 0 or negative"),
    (["run", "--max-drop", "1", "--target", "1.5"], "give --max-drop or --target, not both"),
    (["run", "--val-share", "1"], "--val-share 1.0: give a fraction between 0 and 1"),
    (["run", "--budget", "0"], "--budget 0.0: give a positive number"),
    (["run", "--mean", "0.5", "--std", "0.2"], "normalise the images of --data; without --data"),
    (["run", "resnet18", "--weights", __file__, "--data", "d", "--mean", "0.5"], "--mean and --std (both)"),
    (["run", "resnet18", "--weights", __file__, "--data", "d", "--mean", "1", "2", "--std", "1"],
     "--mean 1 2: give 1 value (all channels) or 3"),
    (["run", "resnet18", "--weights", __file__, "--data", "d", "--mean", "0.5", "--std", "0"], "each positive"),
    (["run", "resnet18", "--num-classes", "10"], "--num-classes sizes your model (with --weights)"),
    (["plan", "resnet18", "--num-classes", "0"], "--num-classes 0: give a whole number of at least 1"),
    (["run", "--teacher-hours", "2"], "drop --teacher-hours"),
    (["run", "resnet18", "--data", "somewhere"], "give --weights too"),
    (["run", "--table", __file__, "--runtime", "onnxruntime"], "give --table or --runtime onnxruntime, not both"),
    (["plan", "resnet18", "--target", "1.5", "--budget-ms", "3"], "give --target or --budget-ms, not both"),
])
def test_an_option_the_choice_does_not_read_is_refused_before_any_work(argv, message, no_work, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fxrebirth: error: ") and message in err and err.count("\n") == 1, err


def test_run_builds_one_config_for_any_model(tmp_path, monkeypatch, capsys):
    """``fxrebirth run`` sends every model to the one job: what the user set, and nothing else, reaches it."""
    import fxrebirth.paper.runner

    seen = []
    monkeypatch.setattr(fxrebirth.paper.runner, "run", lambda config, progress=None: seen.append(config) or {})
    argv = ["-q", "run", "resnet18", "--strategy", "depth", "--max-convs", "3", "--prune", "none", "--target", "1.2",
            "--target", "1.5", "--runtime", "onnxruntime", "--epochs", "0.5", "--json", "--out", str(tmp_path)]
    assert main(argv) == 0
    (config,) = seen
    assert (config.model, config.model_name, config.strategies, config.targets, config.runtime) == \
           (None, "resnet18", ("depth",), (1.2, 1.5), "onnxruntime")
    assert config.strategy_options == {"max_convs": 3, "prune": "none"}
    assert set(config.explicit) == {"max_convs", "prune", "epochs"} and config.rebirth.epochs == 0.5
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    weights = tmp_path / "w.pt"
    torch.save(small_net().state_dict(), weights)
    assert main(["-q", "run", "test_cli:small_net", "--weights", str(weights), "--data", str(tmp_path), "--init",
                 "lstsq", "--json", "--out", str(tmp_path)]) == 0
    mine = seen[-1]
    assert isinstance(mine.model, nn.Module) and mine.strategies is None and mine.targets == ()
    assert mine.explicit == ("init",) and mine.rebirth.init == "lstsq" and mine.strategy_options == {}


def test_without_strategy_the_library_refuses_what_no_applicable_strategy_reads(monkeypatch, capsys):
    """No ``--strategy``: every strategy that applies; an option none of them reads is refused by the plan or the
    job after marking the candidates, before any timing or training (mobilenet_v2 has depth candidates only)."""
    import fxrebirth.paper.runner
    import fxrebirth.retraining.planning

    def forbidden(*args, **kwargs):
        raise AssertionError("timing or training started before the options were checked")

    monkeypatch.setattr(fxrebirth.paper.runner, "_teacher_and_data", forbidden)
    monkeypatch.setattr(fxrebirth.retraining.planning, "time_candidates", forbidden)
    for argv, message in ((["run", "mobilenet_v2", "--init", "lstsq"], "init is read by the streamline and branch"),
                          (["run", "mobilenet_v2", "--reduce-ratio", "0.5"], "reduce_ratio: read by the branch"),
                          (["plan", "mobilenet_v2", "--input-size", "64", "--streamline-kernel", "conv"],
                           "streamline_kernel: read by the streamline")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("fxrebirth: error: ") and message in err and err.count("\n") == 1, err


def test_commands_give_a_grey_model_grey_examples():
    """A model whose first convolution takes one channel gets one-channel example inputs (and a stem that takes
    three, three): every command builds its example from the model, never a fixed three."""
    from fxrebirth.cli import _example

    grey = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten())
    assert _example(grey, 2, 16).shape == (2, 1, 16, 16)
    assert _example(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), 1, 8).shape == (1, 3, 8, 8)
