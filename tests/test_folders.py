"""The user's image folders (fxrebirth.retraining.folders): both layouts split reproducibly and disjointly, images
converted to the model's channels and normalised as asked, and every bad folder a one-line DataError naming it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fxrebirth.retraining.data import DataError, image_folder
from fxrebirth.retraining.folders import (IMAGENET_MEAN, IMAGENET_STD, check_classes, hold_out, input_channels,
                                          model_mean_std, output_count, user_data)


def _write(folder, classes, per_class, mode="L", size=12, seed=0, value=None):
    """``per_class`` random (or constant ``value``) PNG images of ``mode`` for each class under ``folder``."""
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for name in classes:
        os.makedirs(folder / name, exist_ok=True)
        for i in range(per_class):
            pixels = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, np.uint8)
            Image.fromarray(pixels, mode).save(folder / name / f"{i:03d}.png")


def _paths(data):
    return {path for path, _ in (data.dataset.samples[i] for i in data.indices)} if hasattr(data, "indices") \
        else {path for path, _ in data.samples}


def _one_line(info, *needles):
    text = str(info.value)
    assert "\n" not in text.strip(), text
    assert all(n in text for n in needles), text


class _Net(nn.Module):
    """A tiny classifier taking ``channels``-channel images."""

    def __init__(self, channels=3, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_one_folder_splits_reproducibly_disjointly_and_by_class(tmp_path):
    _write(tmp_path, ["a", "b", "c"], 20)
    data = user_data(tmp_path, size=8, channels=3, val_share=0.25, seed=3)
    again = user_data(tmp_path, size=8, channels=3, val_share=0.25, seed=3)
    other = user_data(tmp_path, size=8, channels=3, val_share=0.25, seed=4)
    splits = [_paths(s) for s in (data.train, data.val, data.test)]
    assert splits == [_paths(s) for s in (again.train, again.val, again.test)]
    assert splits != [_paths(s) for s in (other.train, other.val, other.test)]
    assert sum(len(s) for s in splits) == 60 and len(set.union(*splits)) == 60  # disjoint, all used
    assert [len(s) for s in splits] == [36, 12, 12]  # test 20% of each class, validation 25% of the rest
    for split in (data.train, data.val, data.test):
        assert sorted(set(split.targets)) == [0, 1, 2] and split.classes == ["a", "b", "c"]
    assert data.preprocessing["split"] == {"train": 36, "val": 12, "test": 12}
    assert data.preprocessing["seed"] == 3 and data.preprocessing["layout"] == "one folder of class folders"


def test_imagenet_layout_tests_on_val_and_validates_on_a_hold_out_of_train(tmp_path):
    _write(tmp_path / "train", ["x", "y"], 10, mode="RGB")
    _write(tmp_path / "val", ["y"], 4, mode="RGB", seed=1)  # val/ may lack a class of train/
    data = user_data(tmp_path, size=8, channels=3, val_share=0.2)
    assert _paths(data.test) == {str(tmp_path / "val" / "y" / f"{i:03d}.png") for i in range(4)}
    assert set(data.test.targets) == {1}  # labelled by train/'s classes
    assert _paths(data.train) | _paths(data.val) == {str(p) for p in (tmp_path / "train").rglob("*.png")}
    assert not _paths(data.train) & _paths(data.val) and len(data.val) == 4
    assert data.preprocessing["test"] == "val/" and "ImageNet layout" in data.preprocessing["layout"]
    held, kept = hold_out(data.train, 0.5, seed=0), hold_out(data.train, 0.5, seed=0)
    assert held[0].indices == kept[0].indices and not set(held[0].indices) & set(held[1].indices)


def test_grey_images_are_replicated_for_an_rgb_model_and_colour_greyed_for_a_grey_one(tmp_path):
    _write(tmp_path / "grey", ["a", "b"], 5, mode="L")
    _write(tmp_path / "rgb", ["a", "b"], 5, mode="RGB")
    grey = user_data(tmp_path / "grey", size=8, channels=3)
    image, _ = grey.train[0]
    assert image.shape == (3, 8, 8)
    pixels = image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(pixels[0], pixels[1], atol=1e-6) and torch.allclose(pixels[0], pixels[2], atol=1e-6)
    assert grey.preprocessing["conversions"] == ["grey images (10) replicated to 3 channels"]
    colour = user_data(tmp_path / "rgb", size=8, channels=1)
    assert colour.train[0][0].shape == (1, 8, 8) and "converted to grey" in colour.preprocessing["conversions"][0]
    assert user_data(tmp_path / "rgb", size=8, channels=3).preprocessing["conversions"] == []


def test_mean_and_std_are_applied_and_their_source_recorded(tmp_path):
    _write(tmp_path, ["a", "b"], 5, mode="L", value=51)  # 51 / 255 = 0.2
    given = user_data(tmp_path, size=6, channels=1, mean=[0.5], std=[0.25])
    assert torch.allclose(given.test[0][0], torch.full((1, 6, 6), (0.2 - 0.5) / 0.25), atol=1e-6)
    assert given.preprocessing["mean_std_source"] == "given" and given.preprocessing["std"] == [0.25]
    rgb = user_data(tmp_path, size=6, channels=3, mean=[0.1, 0.2, 0.3], std=[0.5])
    assert torch.allclose(rgb.val[0][0][:, 0, 0], torch.tensor([0.2, 0.0, -0.2]), atol=1e-6)
    default = user_data(tmp_path, size=6, channels=1)  # ImageNet's, averaged over its channels
    assert default.preprocessing["mean_std_source"].startswith("ImageNet default, averaged")
    model = _Net(classes=2)
    model.pretrained_cfg = {"mean": (0.2, 0.2, 0.2), "std": (0.1, 0.1, 0.1)}  # as timm records it
    assert model_mean_std(model) == ((0.2, 0.2, 0.2), (0.1, 0.1, 0.1))
    recorded = user_data(tmp_path, size=6, channels=3, model=model)
    assert recorded.preprocessing["mean_std_source"] == "the model's config (pretrained_cfg)"
    assert torch.allclose(recorded.train[0][0], torch.zeros(3, 6, 6), atol=1e-5)
    with pytest.raises(DataError) as info:
        user_data(tmp_path, size=6, channels=1, mean=[0.1, 0.2, 0.3], std=[1.0])
    _one_line(info, "the mean has 3 values", "1-channel")


def test_images_are_resized_then_centre_cropped_and_cached_when_small(tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        for i in range(3):
            Image.new("L", (20, 10), 200).save(tmp_path / name / f"{i}.png")
    data = user_data(tmp_path, size=6, channels=1, mean=[0], std=[1])
    assert data.train[0][0].shape == (1, 6, 6) and data.preprocessing["cached"]
    assert torch.allclose(data.train[0][0], torch.full((1, 6, 6), 200 / 255), atol=1e-6)
    import fxrebirth.retraining.folders as folders

    original = folders.CACHE_BYTES
    folders.CACHE_BYTES = 0
    try:
        lazy = user_data(tmp_path, size=6, channels=1, mean=[0], std=[1])
    finally:
        folders.CACHE_BYTES = original
    assert not lazy.preprocessing["cached"] and torch.equal(lazy.train[0][0], data.train[0][0])


def test_empty_class_folders_are_named(tmp_path):
    _write(tmp_path, ["a", "b"], 3)
    os.makedirs(tmp_path / "ghost")
    os.makedirs(tmp_path / "phantom")
    with pytest.raises(DataError) as info:
        user_data(tmp_path, size=8, channels=3)
    _one_line(info, "2 class folder(s) with no images", "ghost", "phantom")


def test_a_val_folder_with_classes_train_lacks_is_named(tmp_path):
    _write(tmp_path / "train", ["a", "b"], 3)
    _write(tmp_path / "val", ["a", "zebra"], 2)
    with pytest.raises(DataError) as info:
        user_data(tmp_path, size=8, channels=3)
    _one_line(info, "zebra", "lacks")


@pytest.mark.parametrize("make, needle", [
    (lambda root: None, "does not exist"),
    (lambda root: root.mkdir(), "no class folders"),
    (lambda root: (root / "a").mkdir(parents=True) or (root / "a" / "notes.txt").write_text("x"), "no images"),
])
def test_no_images_is_a_one_line_error(tmp_path, make, needle):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(DataError) as info:
        user_data(root, size=8, channels=3)
    _one_line(info, needle, str(root))


@pytest.mark.parametrize("cache", [True, False])
def test_a_file_that_is_not_an_image_is_named_before_any_training(tmp_path, cache, monkeypatch):
    _write(tmp_path, ["a", "b"], 3)
    (tmp_path / "b" / "broken.jpg").write_bytes(b"this is not a jpeg")
    monkeypatch.setattr("fxrebirth.retraining.folders.CACHE_BYTES", 1 << 30 if cache else 0)
    with pytest.raises(DataError) as info:
        user_data(tmp_path, size=8, channels=3)
    _one_line(info, str(tmp_path / "b" / "broken.jpg"), "cannot be read as an image")


def test_a_model_taking_another_channel_count_is_refused(tmp_path):
    _write(tmp_path, ["a", "b"], 3)
    assert input_channels(_Net(4)) == 4
    with pytest.raises(DataError) as info:
        user_data(tmp_path, size=8, channels=input_channels(_Net(4)))
    _one_line(info, "4-channel", "1 (grey) or 3 (RGB)")


def test_a_class_count_that_differs_from_the_model_names_both(tmp_path):
    _write(tmp_path, ["a", "b", "c"], 3)
    model = _Net(3, classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError) as info:
        user_data(tmp_path, size=8, channels=3, model=model)
    _one_line(info, "3 classes", "outputs 10", "--num-classes")
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert user_data(tmp_path, size=8, channels=3, model=_Net(3, classes=3).eval()).classes == ["a", "b", "c"]
    check_classes(None, ["a"])  # an output that is not [1, classes]: nothing to compare
    assert output_count(nn.Flatten(), 4, 1) == 16


def test_input_channels_probes_a_model_without_conv2d():
    class Probe(nn.Module):
        def forward(self, x):
            if x.shape[1] != 1:
                raise RuntimeError("expected 1 channel")
            return x.flatten(1)

    assert input_channels(_Net(1)) == 1 and input_channels(Probe()) == 1
    with pytest.raises(DataError, match="cannot tell how many channels"):
        input_channels(nn.Sequential(nn.Flatten(), nn.Linear(2, 2)))


def test_hold_out_keeps_classes_and_the_fast_path():
    class Tensors(torch.utils.data.Dataset):
        classes = ["a", "b"]

        def __init__(self):
            self.labels = torch.arange(40) % 2
            self.images = torch.randn(40, 1, 2, 2)

        def __len__(self):
            return 40

        def __getitem__(self, i):
            return self.images[i], int(self.labels[i])

        def tensors(self):
            return self.images, self.labels

    data = Tensors()
    kept, held = hold_out(data, 0.25, seed=1)
    assert len(held) == 10 and len(kept) == 30 and not set(kept.indices) & set(held.indices)
    assert held.classes == ["a", "b"] and sorted(held.targets) == [0] * 5 + [1] * 5
    images, labels = held.tensors()
    assert torch.equal(images[3], data[held.indices[3]][0]) and labels.tolist() == held.targets
    with pytest.raises(DataError, match="between 0 and 1"):
        hold_out(data, 1.0)


def test_image_folder_keeps_its_defaults_and_takes_channels_and_statistics(tmp_path):
    _write(tmp_path, ["a", "b"], 2, mode="L", value=51)
    default = image_folder(tmp_path, size=6)[0][0]
    assert default.shape == (3, 6, 6)
    assert torch.allclose(default[:, 0, 0], (0.2 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD),
                          atol=1e-6)
    grey = image_folder(tmp_path, size=6, mean=[0.5], std=[0.25], channels=1)[0][0]
    assert grey.shape == (1, 6, 6) and torch.allclose(grey, torch.full((1, 6, 6), -1.2), atol=1e-6)


def test_test_folder_serves_as_val_and_a_lone_train_folder_is_the_one_folder(tmp_path):
    _write(tmp_path / "a" / "train", ["x", "y"], 10)
    _write(tmp_path / "a" / "test", ["x", "y"], 2)
    data = user_data(tmp_path / "a", size=8, channels=1)
    assert data.preprocessing["test"] == "test/" and len(data.test) == 4 and data.classes == ["x", "y"]
    _write(tmp_path / "b" / "train", ["x", "y"], 10)
    alone = user_data(tmp_path / "b", size=8, channels=1)
    assert alone.classes == ["x", "y"] and alone.preprocessing["layout"] == "one folder of class folders (train/)"
    assert len(alone.test) == 4 and len(alone.train) + len(alone.val) == 16


def test_sixteen_bit_grey_is_scaled_to_eight_bits(tmp_path):
    for name in ("a", "b"):
        os.makedirs(tmp_path / name)
        for i in range(3):
            Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / name / f"{i}.png")
    assert Image.open(tmp_path / "a" / "0.png").mode.startswith("I")
    data = user_data(tmp_path, size=4, channels=3, mean=[0], std=[1])
    assert torch.allclose(data.train[0][0], torch.ones(3, 4, 4))
    assert "replicated" in data.preprocessing["conversions"][0]
