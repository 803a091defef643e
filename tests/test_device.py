"""Where and in what precision the retraining engine runs: ``device=`` and ``precision=`` (issue 17).

On this CPU-only machine the CUDA tests skip with their reason; ``benchmarks/cuda_smoke.py`` is the one-GPU
smoke run for a machine that has one.
"""

from __future__ import annotations

import pytest
import torch

import fxrebirth
from fxrebirth.retraining.engine import rebirth
from fxrebirth.retraining.train import Arithmetic, batches, resolve_device

from tests.test_retrain import FAST, LRNNet, labelled_data, plan_all

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device here (benchmarks/cuda_smoke.py runs on one)")


def _weights(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def test_explicit_cpu_and_auto_on_a_cpu_machine_give_the_default_result() -> None:
    model, data = LRNNet().eval(), labelled_data(64)
    plan = plan_all(model)
    reference, _ = rebirth(model, plan, data, **FAST)
    explicit, report = rebirth(model, plan, data, device="cpu", **FAST)
    for (k, a), b in zip(_weights(reference).items(), _weights(explicit).values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)
    assert report.config["device"] == "cpu" and report.config["precision"] == "fp32"
    if not CUDA:
        automatic, _ = rebirth(model, plan, data, device="auto", **FAST)
        for (k, a), b in zip(_weights(reference).items(), _weights(automatic).values()):
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)
    assert all(p.device.type == "cpu" for p in explicit.parameters())


def test_bf16_autocast_trains_on_the_cpu_and_returns_a_float32_model() -> None:
    torch.manual_seed(0)
    model, data = LRNNet().eval(), labelled_data(64)
    plan = plan_all(model)
    full, _ = rebirth(model, plan, data, **FAST)
    half, report = rebirth(model, plan, data, precision="bf16", **FAST)
    assert report.config["precision"] == "bf16"
    assert all(p.dtype == torch.float32 for p in half.parameters())
    x = torch.randn(2, 3, 12, 12)
    y_full, y_half = full(x), half(x)
    assert torch.isfinite(y_half).all()
    # the same run in another arithmetic: close to the float32 run, but not the same numbers
    assert not torch.equal(y_full, y_half)
    assert (y_half - y_full).abs().max() <= 0.1 * y_full.abs().max()
    steps = [s for s in report.steps if s.trained_images]
    assert steps and all(s.loss is not None and s.loss == s.loss for s in steps)


def test_a_checkpoint_resumes_whatever_the_device_setting(tmp_path) -> None:
    model, data = LRNNet().eval(), labelled_data(64)
    plan = plan_all(model)
    first, _ = rebirth(model, plan, data, checkpoint_dir=tmp_path, device="cpu", **FAST)
    again, report = rebirth(model, plan, data, checkpoint_dir=tmp_path, device="auto" if not CUDA else "cpu", **FAST)
    assert report.resumed_from is not None
    for (k, a), b in zip(_weights(first).items(), _weights(again).values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)
    # the precision changes the result, so it is part of the job: another precision is another job
    with pytest.raises(fxrebirth.FxRebirthError, match="another rebirth job"):
        rebirth(model, plan, data, checkpoint_dir=tmp_path, precision="bf16", **FAST)


def test_bad_device_and_precision_get_clear_errors() -> None:
    model, data = LRNNet().eval(), labelled_data(16)
    plan = plan_all(model)
    with pytest.raises(fxrebirth.FxRebirthError, match="precision='fp8'"):
        rebirth(model, plan, data, precision="fp8", **FAST)
    with pytest.raises(fxrebirth.FxRebirthError, match="device='gpu0'"):
        rebirth(model, plan, data, device="gpu0", **FAST)
    with pytest.raises(fxrebirth.FxRebirthError, match="fp16' needs a CUDA device"):
        rebirth(model, plan, data, device="cpu", precision="fp16", **FAST)
    if not CUDA:
        with pytest.raises(fxrebirth.FxRebirthError, match="sees no CUDA device"):
            rebirth(model, plan, data, device="cuda", **FAST)


def test_batches_move_to_the_device_without_changing_order_or_flips() -> None:
    data = labelled_data(40)
    here = list(batches(data, 16, seed=3, images=56, augment=True))
    there = list(batches(data, 16, seed=3, images=56, augment=True, device=resolve_device("auto")))
    assert [len(x) for x, _ in here] == [16, 16, 8, 16]
    for (x, y), (u, v) in zip(here, there):
        torch.testing.assert_close(u.cpu(), x, rtol=0, atol=0)
        assert torch.equal(v.cpu(), y)


def test_arithmetic_autocasts_only_inside_its_block() -> None:
    bf16 = Arithmetic("bf16", torch.device("cpu"))
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with bf16:
        inside = a @ b
    assert inside.dtype == torch.bfloat16 and (a @ b).dtype == torch.float32
    with Arithmetic("fp32", torch.device("cpu")):
        assert (a @ b).dtype == torch.float32


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_rebirth_trains_and_returns_a_cpu_model(precision: str) -> None:
    model, data = LRNNet().eval(), labelled_data(64)
    plan = plan_all(model)
    cpu, _ = rebirth(model, plan, data, **FAST)
    gpu, report = rebirth(model, plan, data, device="cuda", precision=precision, **FAST)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in gpu.parameters())
    x = torch.randn(2, 3, 12, 12)
    assert torch.isfinite(gpu(x)).all()
    # the same seeds on another device: close, not equal (other kernels, other rounding)
    assert (gpu(x) - cpu(x)).abs().max() <= 0.1 * cpu(x).abs().max()
