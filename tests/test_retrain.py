"""The retraining engine on small models (seconds each): initialisation, resume, DDP, bad input."""

from __future__ import annotations

import copy

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import fxrebirth
from fxrebirth.paper.data import DataError, Shapes, accuracy_interval, check_dataset
from fxrebirth.paper.models import googlenet_lrn
from fxrebirth.graph.regions import RegionError
from fxrebirth.retraining.engine import RebirthConfig, rebirth
from fxrebirth.retraining.initialise import extract_region
from fxrebirth.graph.capture import capture

FAST = {"epochs": 0.25, "layerwise_epochs": 0.25, "calibration_images": 128, "batch_size": 32, "eval_images": 64}


class Labelled(TensorDataset):
    """A TensorDataset that exposes its labels and class names like the library's datasets."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, classes: int) -> None:
        super().__init__(x, y)
        self.labels = y
        self.classes = [str(i) for i in range(classes)]


class ConvPool(nn.Module):
    """conv -> average pooling: a streamline region that ONE convolution reproduces exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(2, 2)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.conv(x)).mean((2, 3)))


class LRNNet(nn.Module):
    """conv -> ReLU -> LRN -> max-pool -> conv -> head: one non-linear streamline region."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.norm = nn.LocalResponseNorm(3)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.norm(self.relu(self.conv1(x))))
        return self.head(torch.relu(self.conv2(x)).mean((2, 3)))


def labelled_data(n: int, size: int = 12, classes: int = 4, seed: int = 0) -> Labelled:
    g = torch.Generator().manual_seed(seed)
    return Labelled(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g), classes)


def plan_all(model: nn.Module, size: int = 12) -> fxrebirth.Plan:
    plan = fxrebirth.plan(model, torch.randn(1, 3, size, size), strategies=("streamline", "branch"), rounds=1)
    for r in plan.candidates:  # select every region, whatever this machine's timings say
        r.selected = True
    return plan


def test_least_squares_reproduces_an_exactly_representable_region() -> None:
    torch.manual_seed(0)
    model = ConvPool().eval()
    plan = plan_all(model)
    assert [r.region.kind for r in plan.selected] == ["streamline"]
    gm, report = rebirth(model, plan, labelled_data(64), init="lstsq", epochs=0, layerwise_epochs=0, calibration_images=64,
                         ridge=1e-9, batch_size=16)
    x = torch.randn(8, 3, 12, 12)
    assert report.retraining_epochs == 0 and report.calibration_images == 64
    torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, nn.AvgPool2d) for m in gm.modules())


def test_least_squares_init_is_closer_than_xavier_and_original() -> None:
    torch.manual_seed(0)
    model = LRNNet().eval()
    plan = plan_all(model)
    data, x = labelled_data(128), torch.randn(32, 3, 12, 12)
    errors = {}
    for init in ("lstsq", "original", "xavier"):
        gm, _ = rebirth(model, plan, data, init=init, epochs=0, layerwise_epochs=0, calibration_images=128)
        errors[init] = fxrebirth.relative_error(gm(x), model(x))
    assert errors["lstsq"] < errors["original"] and errors["lstsq"] < errors["xavier"], errors


def test_rebirth_does_not_touch_the_model_and_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = LRNNet().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_all(model)
    gm, report = rebirth(model, plan, labelled_data(256), test_data=labelled_data(64, seed=1), init="lstsq", **{**FAST, "epochs": 1.0})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = [s.name for s in report.steps]
    assert names == ["init lstsq", "layer-wise distillation", "end-to-end distillation"]
    kd = report.steps[-1].curve
    assert kd[-1][1] < kd[0][1]
    assert report.retraining_epochs == pytest.approx(1.25)
    assert report.student["images"] == 64 and 0 <= report.student["agreement"] <= 1


def test_the_pool_policy_starts_from_the_model_without_its_lrn_at_two_sizes() -> None:
    """streamline_kernel="pool": the stem's rebirth layers keep the convolution and the max-pooling and drop
    only the LRN, so with the original weights and no training the reborn model (stem regions only) is the
    original with its LRN layers removed, at the planning size and another; it survives plan.json."""
    torch.manual_seed(0)
    model = googlenet_lrn(10, width=0.125).eval()
    plan = fxrebirth.plan(model, torch.randn(1, 3, 32, 32), strategies=("streamline", "branch"), rounds=1, streamline_kernel="pool", keep=["branch:"])
    plan = fxrebirth.Plan.from_json(plan.to_json())
    for r in plan.candidates:
        r.selected = r.region.kind == "streamline"
    assert [r.region.id for r in plan.selected] == ["streamline:conv1.conv", "streamline:conv2.conv"]
    gm, report = rebirth(model, plan, Shapes("train", 64, 32), init="original", epochs=0, train_batch_norm=False)
    without_lrn = copy.deepcopy(model)
    without_lrn.norm1, without_lrn.norm2 = nn.Identity(), nn.Identity()
    assert not any(isinstance(m, nn.LocalResponseNorm) for m in gm.modules()) and "local_response_norm" not in gm.code
    kept_pools = [m for name, m in gm.named_modules() if name.startswith("rebirth_") and isinstance(m, nn.MaxPool2d)]
    assert [m.kernel_size for m in kept_pools] == [(3, 3), (3, 3)]
    for size in (32, 48):
        x = torch.randn(2, 3, size, size)
        assert fxrebirth.relative_error(without_lrn(x), gm(x)) <= 1e-5
    assert [f["fit"] for f in report.regions] == ["original", "original"]


def test_paper_schedule_merges_bottom_up_one_region_per_step() -> None:
    torch.manual_seed(0)
    model = googlenet_lrn(10, width=0.125).eval()
    plan = plan_all(model, 32)
    gm, report = rebirth(model, plan, Shapes("train", 64, 32), test_data=Shapes("test", 32, 32), schedule="paper",
                         init="xavier", epochs=0.5, batch_size=32, eval_images=32)
    assert [s.regions[0] for s in report.steps] == [r["id"] for r in report.regions]  # graph order
    assert report.steps[0].regions == ["streamline:conv1.conv"]
    assert len(report.steps) == len(plan.selected)
    assert report.retraining_epochs == pytest.approx(0.5 * len(plan.selected))
    assert not any(isinstance(m, (nn.LocalResponseNorm, nn.MaxPool2d)) for m in gm.modules())
    assert "local_response_norm" not in gm.code
    assert gm.code.count("max_pool2d(") == 2  # pool3 and pool4 stand alone between inception modules


def _crash_at(stage: str):
    def progress(event):
        if event.stage == stage:
            raise KeyboardInterrupt
    return progress


def test_resume_after_an_interrupted_step_matches_an_uninterrupted_run(tmp_path) -> None:
    torch.manual_seed(0)
    model = LRNNet().eval()
    plan = plan_all(model)
    data = labelled_data(128)
    reference, _ = rebirth(model, plan, data, **FAST)
    with pytest.raises(KeyboardInterrupt):
        rebirth(model, plan, data, checkpoint_dir=tmp_path, progress=_crash_at("end-to-end distillation"), **FAST)
    assert (tmp_path / "rebirth.ckpt").exists()
    resumed, report = rebirth(model, plan, data, checkpoint_dir=tmp_path, **FAST)
    assert report.resumed_from is not None and len(report.steps) == 3
    for (k, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_a_checkpoint_of_another_job_is_refused(tmp_path) -> None:
    model = LRNNet().eval()
    plan = plan_all(model)
    rebirth(model, plan, labelled_data(64), checkpoint_dir=tmp_path, **FAST)
    with pytest.raises(fxrebirth.FxRebirthError, match="another rebirth job"):
        rebirth(model, plan, labelled_data(64), checkpoint_dir=tmp_path, **{**FAST, "epochs": 0.5})


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_retrain import LRNNet, labelled_data, plan_all, FAST
    from fxrebirth.retraining.engine import rebirth
    torch.manual_seed(0)
    model = LRNNet().eval()
    plan = plan_all(model)
    slow = lambda event: __import__("time").sleep(0.05) if event.stage == "end-to-end distillation" else None
    gm, report = rebirth(model, plan, labelled_data(128), checkpoint_dir=sys.argv[1], progress=slow,
                         **{{**FAST, "epochs": 2.0}})
    torch.save(gm.state_dict(), sys.argv[2])
""")


def test_kill_9_loses_at_most_the_step_in_progress(tmp_path) -> None:
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT.format(tests=os.path.dirname(__file__)))
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.pt"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), str(out)])
    deadline = time.time() + 120
    state = None
    while time.time() < deadline and proc.poll() is None:
        if (ckpt / "rebirth.ckpt").exists():
            state = torch.load(ckpt / "rebirth.ckpt", weights_only=True)
            if state["done"] >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the job ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state is not None and state["done"] == 2  # init and layer-wise done, end-to-end in progress
    assert not out.exists()
    subprocess.run([sys.executable, str(script), str(ckpt), str(out)], check=True, timeout=300)
    resumed = torch.load(out, weights_only=True)
    fresh_dir, fresh_out = tmp_path / "fresh", tmp_path / "fresh.pt"
    subprocess.run([sys.executable, str(script), str(fresh_dir), str(fresh_out)], check=True, timeout=300)
    fresh = torch.load(fresh_out, weights_only=True)
    for k in fresh:
        torch.testing.assert_close(resumed[k], fresh[k], rtol=0, atol=0, msg=k)


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_retrain import LRNNet, labelled_data, plan_all, FAST
    from fxrebirth.retraining.engine import rebirth
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = LRNNet().eval()
    plan = plan_all(model)
    # plain BatchNorm normalises with each rank's half of the batch: compare without it
    gm, report = rebirth(model, plan, labelled_data(128), train_batch_norm=False, **{{**FAST, "epochs": 1.0}})
    if not distributed or dist.get_rank() == 0:
        torch.save(gm.state_dict(), sys.argv[-1])
    if distributed:
        dist.destroy_process_group()
""")


def test_ddp_on_two_processes_matches_a_single_process(tmp_path, one_and_two_processes) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__)))
    a, b = one_and_two_processes(script)
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)  # float sums in another order, through Adam
        moved += 1
    assert moved


def test_bad_inputs_get_clear_errors() -> None:
    model = LRNNet().eval()
    plan = plan_all(model)
    empty = Labelled(torch.zeros(0, 3, 12, 12), torch.zeros(0, dtype=torch.long), 4)
    with pytest.raises(DataError, match="empty"):
        rebirth(model, plan, empty)
    with pytest.raises(DataError, match="label 7 is out of range"):
        rebirth(model, plan, Labelled(torch.randn(8, 3, 12, 12), torch.tensor([0, 1, 2, 3, 7, 0, 1, 2]), 8))
    with pytest.raises(DataError, match=r"images are \[10, 10\]"):
        rebirth(model, plan, labelled_data(8), test_data=labelled_data(8, size=10))
    with pytest.raises(RegionError, match="plan was made for a LRNNet"):
        rebirth(googlenet_lrn(4, width=0.125), plan, labelled_data(8, size=32))
    other = plan_all(LRNNet().eval())
    other.candidates[0].region.nodes = ("not_a_node",) + other.candidates[0].region.nodes[1:]
    with pytest.raises(RegionError, match="does not fit"):
        rebirth(model, other, labelled_data(8))
    with pytest.raises(DataError, match="does not accept"):
        rebirth(model, plan, Labelled(torch.randn(8, 1, 12, 12), torch.zeros(8, dtype=torch.long), 4))
    with pytest.raises(fxrebirth.FxRebirthError, match="init="):
        RebirthConfig(init="magic")
    with pytest.raises(fxrebirth.FxRebirthError, match=r"unknown rebirth option\(s\) \['epoch'\]"):
        rebirth(model, plan, labelled_data(8), epoch=1)


def test_extract_region_computes_what_the_region_computes() -> None:
    model = LRNNet().eval()
    x = torch.randn(2, 3, 12, 12)
    gm = capture(model, (x,))
    plan = plan_all(model)
    region = plan.selected[0].region
    sub = extract_region(gm, region)
    torch.testing.assert_close(sub(x), model.pool(model.norm(model.relu(model.conv1(x)))))


def test_shapes_is_deterministic_balanced_and_splits_differ() -> None:
    a, b = Shapes("train", 200, 16), Shapes("train", 200, 16)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert torch.bincount(a.labels).tolist() == [20] * 10
    test = Shapes("test", 200, 16)
    assert not torch.equal(a.images, test.images)
    x, y = a[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= y < 10
    check_dataset(a, name="a", num_classes=10, image_size=(16, 16))
    lo, hi = accuracy_interval(9000, 10000)
    assert lo < 0.9 < hi and hi - lo < 0.013


@pytest.mark.parametrize("images", [None, 300, 1000, 77, 1])
def test_batch_count_matches_what_batches_yields(images) -> None:
    from fxrebirth.retraining.train import batch_count, batches

    data = Shapes("train", 300, 8)
    assert sum(1 for _ in batches(data, 128, seed=0, images=images)) == batch_count(300, 128, images)


def test_auto_init_keeps_the_start_nearest_the_teacher_in_every_region() -> None:
    """``init="auto"``: every region keeps the candidate start with the least KL to the teacher, each candidate's
    KL recorded; the fits and the judging passes are counted as forward-only images."""
    torch.manual_seed(0)
    model = googlenet_lrn(10, width=0.125).eval()
    plan = plan_all(model, 32)
    _, report = rebirth(model, plan, Shapes("train", 64, 32), init="auto", epochs=0, calibration_images=64)
    for region in report.regions:
        kl = region["start_kl"]
        assert set(kl) <= {"original", "lstsq"} and region["init"] == min(kl, key=kl.get), region["id"]
    branches = sum(1 for r in report.regions if r["id"].startswith("branch:"))
    judged = sum(len(r["start_kl"]) for r in report.regions)
    assert report.calibration_images >= 64 * branches + judged  # the fits, then every candidate judged


def test_image_folder_and_cifar10_loaders(tmp_path) -> None:
    from PIL import Image

    from fxrebirth.paper.data import cifar10, image_folder

    for label in ("cat", "dog"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 100, 200)).save(tmp_path / "imgs" / label / f"{i}.png")
    data = image_folder(tmp_path / "imgs", size=24)
    x, y = data[0]
    assert len(data) == 6 and data.classes == ["cat", "dog"] and x.shape == (3, 24, 24) and y == 0
    check_dataset(data, name="folder", num_classes=2, image_size=(24, 24))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="image folder"):
        image_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        image_folder(tmp_path / "nowhere")
    with pytest.raises(DataError, match="CIFAR-10 not found"):
        cifar10(tmp_path / "cifar-10-batches-py")


# ------------------------------------------------------------------------------ the scratch control and budgets


def test_reinitialise_renews_every_weight_of_a_captured_model() -> None:
    """The control's start: every conv/linear weight of the canonical graph and of module submodules is drawn
    anew (He), biases zero, the last linear layer small; a BatchNorm is reset to the identity."""
    from fxrebirth.retraining.weights import reinitialise

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
        model[1].weight.fill_(5.0)
    gm = capture(model.eval(), (torch.randn(2, 3, 8, 8),))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    assert reinitialise(gm) == []
    after = gm.state_dict()
    conv_w, linear_w = (next(v for k, v in after.items() if v.dim() == d) for d in (4, 2))
    assert not torch.equal(conv_w, before[next(k for k, v in before.items() if v.dim() == 4)])
    assert abs(float(conv_w.std()) - (2 / 27) ** 0.5) < 0.15  # He normal: std sqrt(2 / fan_in)
    assert float(linear_w.std()) < 0.02  # the last layer starts small
    one_dim = sorted(float(v.abs().sum()) for k, v in after.items() if v.dim() == 1 and "num_batches" not in k)
    assert one_dim.count(8.0) == 2 and set(one_dim) <= {0.0, 8.0}  # BN weight and running_var are ones
    assert float(model[1].weight.detach()[0]) == 5.0 and float(model[1].running_mean[0]) == 3.0  # model untouched


def test_the_control_trains_the_same_architecture_from_scratch_on_the_same_budget() -> None:
    torch.manual_seed(0)
    model = LRNNet().eval()
    train, test = labelled_data(96), labelled_data(48, seed=1)
    options = {**FAST, "layerwise_epochs": 0.25, "epochs": 0.5}
    reborn, report = rebirth(model, plan_all(model), train, test_data=test, control=True,
                             teacher_cost={"images": 960, "wall_s": 12.0}, **options)
    control = report.control
    assert control["trained_images"] == report.trained_images == 24 + 48  # layer-wise + end to end
    assert [s["name"] for s in control["steps"]] == ["re-initialise (He), every region merged",
                                                     "end-to-end from scratch"]
    assert control["steps"][1]["trained_images"] == report.trained_images
    assert 0 <= control["top1"] <= 1 and control["images"] == 48
    lo, hi = control["reborn_minus_control"]
    assert lo <= report.student["top1"] - control["top1"] <= hi
    assert report.teacher_share == pytest.approx(72 / 960)
    text = report.table()
    assert "retraining 7.5% of it" in text and "scratch control" in text
    data = report.to_dict()
    assert data["teacher_share"] == report.teacher_share and data["control"]["top1"] == control["top1"]
    # the control is a different model from the reborn one: the same architecture, other weights
    again, _ = rebirth(model, plan_all(model), train, **options)
    assert [p.shape for p in again.parameters()] == [p.shape for p in reborn.parameters()]


def test_a_two_point_budget_curve_resumes_from_its_checkpoints(tmp_path) -> None:
    from benchmarks._budget import budget_curve, budget_figure, budget_table

    torch.manual_seed(0)
    model = LRNNet().eval()
    train, test = labelled_data(64), labelled_data(32, seed=1)
    plan = plan_all(model)
    options = {k: v for k, v in FAST.items() if k not in ("epochs", "layerwise_epochs")}
    points = budget_curve(model, plan, train, test, [16, 64], checkpoint_dir=tmp_path,
                          teacher_cost={"images": 640}, **options)
    assert [p.images for p in points] == [16, 64]
    assert [p.teacher_share for p in points] == [pytest.approx(0.025), pytest.approx(0.1)]
    assert all(0 <= p.control_top1 <= 1 and p.reborn_minus_control[0] <= p.reborn_minus_control[1] for p in points)
    assert sorted(os.listdir(tmp_path)) == ["budget-16", "budget-64"]
    assert sorted(os.listdir(tmp_path / "budget-64")) == ["control.ckpt", "rebirth.ckpt"]
    table = budget_table(points)
    assert "| 16 (2%) |" in table and "| 64 (10%) |" in table
    figure = budget_figure(points)
    assert '"2%", "10%"' in figure and figure.count("    line [") == 3
    assert f"{100 * points[1].control_top1:.2f}]" in figure
    # a second call finds every step done: the same numbers, no training
    again = budget_curve(model, plan, train, test, [16, 64], checkpoint_dir=tmp_path,
                         teacher_cost={"images": 640}, **options)
    assert [(p.reborn_top1, p.control_top1) for p in again] == [(p.reborn_top1, p.control_top1) for p in points]
    with pytest.raises(fxrebirth.FxRebirthError, match="distill schedule"):
        budget_curve(model, plan, train, test, [16], schedule="paper")


def test_the_teacher_curve_trains_each_budget_once_and_reads_its_gains_from_the_cache(tmp_path) -> None:
    from benchmarks.teacher_curve import teacher_curve, teacher_curve_table
    from fxrebirth.paper.teacher import TeacherConfig

    config = TeacherConfig(train_images=64, test_images=32, batch_size=32, width=0.125)
    points = teacher_curve([2, 1], config, directory=str(tmp_path))
    assert [(p.epochs, p.images) for p in points] == [(1, 64), (2, 128)]
    assert all(p.top1_interval[0] <= p.top1 <= p.top1_interval[1] for p in points)
    assert len([f for f in os.listdir(tmp_path) if f.startswith("teacher-googlenet_lrn-")]) == 2
    table = teacher_curve_table(points)
    gain = 100 * (points[1].top1 - points[0].top1)
    assert f"| 2 (128) | {points[1].top1:.2%}" in table and f"| {gain:+.2f} pt |" in table
    assert table.splitlines()[2].split("|")[3].strip() == ""  # the first teacher has no half to compare with
    again = teacher_curve([1, 2], config, directory=str(tmp_path))  # from the cache: the same teachers
    assert [(p.top1, p.wall_s) for p in again] == [(p.top1, p.wall_s) for p in points]
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        teacher_curve([0], config, directory=str(tmp_path))
