"""Augmentation of retraining batches (fxrebirth.retraining.augment): what each transform does, that the
draws are the seed's alone (resume, devices, torch.distributed), and the option end to end."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import fxrebirth
from fxrebirth.paper.data import Shapes
from fxrebirth.retraining import train as train_module
from fxrebirth.retraining.augment import Augment, MixedLabels, parse_augment
from fxrebirth.retraining.config import RebirthConfig
from fxrebirth.retraining.engine import rebirth
from fxrebirth.retraining.train import batches, kd_loss


def _data(n: int = 40, size: int = 8, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g))


def test_the_spec_names_transforms_in_a_fixed_order_and_refuses_anything_else() -> None:
    assert parse_augment("none") == parse_augment("") == ()
    assert parse_augment("mixup+flip") == ("flip", "mixup")
    for bad in ("rotate", "flip+flip", "flip,shift", "Flip"):
        with pytest.raises(fxrebirth.FxRebirthError, match="augment="):
            RebirthConfig(augment=bad)  # refused when the options are made, before any work
    with pytest.raises(fxrebirth.FxRebirthError, match="shift"):
        RebirthConfig(augment="shift", shift=0.6)
    with pytest.raises(fxrebirth.FxRebirthError, match="mixup_alpha"):
        RebirthConfig(augment="mixup", mixup_alpha=0)


def test_flip_true_draws_exactly_what_the_teachers_flips_always_drew() -> None:
    """``augment=True`` (the teacher's) must keep its draws, or a retrained teacher would differ from its cache."""
    data = Shapes("train", 40, size=8)
    x_all, _ = data.tensors()
    g = torch.Generator().manual_seed(3)
    order = torch.randperm(len(data), generator=g)
    expected = []
    for start in range(0, len(data), 16):
        x = x_all[order[start:start + 16]]
        flip = torch.rand(len(x), generator=g) < 0.5
        expected.append(torch.where(flip[:, None, None, None], x.flip(3), x))
    got = [x for x, _ in batches(data, 16, seed=3, augment=True)]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(4, 20), shift=st.floats(0.01, 0.45), seed=st.integers(0, 2 ** 16),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_shift_is_a_crop_of_the_reflected_image_within_the_largest_move(size, shift, seed, dtype) -> None:
    x = torch.randn(6, 2, size, size + 1, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    augment = Augment(("shift",), shift=shift)
    out, _ = augment(x, torch.zeros(6, dtype=torch.long), torch.Generator().manual_seed(seed))
    s = min(max(1, round(shift * x.shape[-1])), size - 1, size)
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    assert out.shape == x.shape and out.dtype == dtype
    for i in range(len(x)):
        offsets = [(dy, dx) for dy in range(2 * s + 1) for dx in range(2 * s + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + size, dx:dx + size + 1])]
        assert offsets, f"image {i} is no crop within {s} pixels"


def test_shifts_and_flips_vary_over_a_batch_and_follow_the_seed() -> None:
    x = torch.randn(64, 3, 16, 16)
    augment = Augment(("flip", "shift"))
    a, _ = augment(x, torch.zeros(64), torch.Generator().manual_seed(0))
    b, _ = augment(x, torch.zeros(64), torch.Generator().manual_seed(0))
    c, _ = augment(x, torch.zeros(64), torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    unchanged = sum(torch.equal(a[i], x[i]) for i in range(64))
    assert unchanged < 16  # 1 in 50 keep both offset 0 and no flip; 16 of 64 would be far off


def test_mixup_mixes_images_and_labels_with_one_weight_and_one_pairing() -> None:
    x, y = torch.randn(10, 3, 6, 6, dtype=torch.float64), torch.arange(10) % 4
    out, labels = Augment(("mixup",))(x, y, torch.Generator().manual_seed(5))
    assert isinstance(labels, MixedLabels) and 0 <= labels.weight <= 1
    lam, second = labels.weight, labels.second
    torch.testing.assert_close(labels.first, y, rtol=0, atol=0)
    perm = [next(j for j in range(10) if torch.allclose(out[i], lam * x[i] + (1 - lam) * x[j], rtol=0, atol=1e-12))
            for i in range(10)]
    assert sorted(perm) == list(range(10)) and torch.equal(second, y[perm])
    logits = torch.randn(10, 4, dtype=torch.float64)
    expected = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    torch.testing.assert_close(labels.cross_entropy(logits), expected, rtol=1e-12, atol=0)
    # the hard term of the distillation loss is the mixed cross-entropy; the soft term ignores labels
    torch.testing.assert_close(kd_loss(logits, None, labels, 2.0, 0.0), expected, rtol=1e-12, atol=0)
    # one image has nothing to mix with
    single, same = Augment(("mixup",))(x[:1], y[:1], torch.Generator().manual_seed(5))
    assert torch.equal(single, x[:1]) and torch.equal(same, y[:1])


def test_each_rank_takes_its_rows_of_the_globally_augmented_batch(monkeypatch) -> None:
    """Under torch.distributed the global batch is augmented first, so two ranks see what one process sees."""
    data, augment = _data(), Augment(("flip", "shift", "mixup"))
    single = list(batches(data, 16, seed=7, augment=augment))
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(train_module, "world", lambda rank=rank: (rank, 2))
        shares.append(list(batches(data, 16, seed=7, augment=augment)))
    for (x, y), (x0, y0), (x1, y1) in zip(single, *shares):
        torch.testing.assert_close(x[0::2], x0, rtol=0, atol=0)
        torch.testing.assert_close(x[1::2], x1, rtol=0, atol=0)
        assert y0.weight == y1.weight == y.weight
        assert torch.equal(y.second[0::2], y0.second) and torch.equal(y.second[1::2], y1.second)


def test_rebirth_with_augmentation_trains_and_keys_its_checkpoint_by_it(tmp_path) -> None:
    from tests.test_retrain import FAST, LRNNet, labelled_data as labelled, plan_all

    torch.manual_seed(0)
    model = LRNNet().eval()
    plan, data = plan_all(model), labelled(96)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reborn, report = rebirth(model, plan, data, checkpoint_dir=tmp_path, augment="flip+shift+mixup", **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    end = report.steps[-1]
    assert end.trained_images > 0 and end.loss is not None and torch.isfinite(torch.tensor(end.loss))
    assert reborn(torch.randn(2, 3, 12, 12)).shape == (2, 4)
    # the same options resume; other augmentation is another job
    _, again = rebirth(model, plan, data, checkpoint_dir=tmp_path, augment="flip+shift+mixup", **FAST)
    assert again.resumed_from is not None
    with pytest.raises(fxrebirth.FxRebirthError, match="another rebirth job"):
        rebirth(model, plan, data, checkpoint_dir=tmp_path, augment="flip", **FAST)


def test_options_at_their_defaults_leave_older_checkpoint_keys_unchanged() -> None:
    settings_ = RebirthConfig().key_settings()
    assert "augment" not in settings_ and "shift" not in settings_ and "device" not in settings_
    assert RebirthConfig(augment="flip").key_settings()["augment"] == "flip"
