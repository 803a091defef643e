"""Models by name with the user's weights (fxrebirth.paper.loading): a standard architecture trained for another
class count loads as itself with that many classes; anything else that does not fit is a one-line error."""

from __future__ import annotations

import pytest
import torch
import torchvision

from fxrebirth.errors import FxRebirthError
from fxrebirth.paper.loading import load_trained


@pytest.mark.parametrize("name, classes", [("resnet18", 10), ("mobilenet_v2", 3), ("googlenet_lrn", 7)])
def test_weights_trained_for_another_class_count_build_that_many(tmp_path, name, classes):
    from fxrebirth.paper.loading import load_model

    torch.manual_seed(0)
    trained = load_model(name, num_classes=classes).eval()
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path)
    model = load_trained(name, str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x)) and model(x).shape == (2, classes)


def test_weights_that_differ_elsewhere_are_refused_in_one_line(tmp_path):
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)  # not only the classifier differs
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(FxRebirthError, match=r"--weights .* does not fit resnet18") as info:
        load_trained("resnet18", str(path))
    assert "\n" not in str(info.value).strip()
    torch.save([1, 2], path)
    with pytest.raises(FxRebirthError, match="not a state_dict"):
        load_trained("resnet18", str(path))


def test_num_classes_builds_that_many_and_a_count_the_weights_lack_names_both(tmp_path):
    torch.manual_seed(0)
    trained = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path)
    model = load_trained("resnet18", str(path), num_classes=10)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), trained(x))
    with pytest.raises(FxRebirthError) as info:
        load_trained("resnet18", str(path), num_classes=7)
    text = str(info.value)
    assert "--num-classes 7" in text and "10 classes" in text and "\n" not in text
    assert load_trained("resnet18", None, num_classes=5).fc.out_features == 5


def test_weights_that_do_not_fit_name_the_keys_and_shapes(tmp_path):
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    del state["layer1.0.conv1.weight"]
    state["head.extra"] = torch.zeros(2)
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    path = tmp_path / "w.pt"
    torch.save(state, path)
    with pytest.raises(FxRebirthError) as info:
        load_trained("resnet18", str(path), num_classes=10)
    text = str(info.value)
    assert "\n" not in text and "Error(s) in loading" not in text
    assert "1 key(s) missing from the weights: layer1.0.conv1.weight" in text
    assert "1 key(s) in the weights but not the model: head.extra" in text
    assert "layer2.0.conv1.weight [3, 3, 3, 3] vs the model's [128, 64, 3, 3]" in text
    from fxrebirth.paper.loading import state_mismatch

    many = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("layer")}
    assert "key(s) missing from the weights" in state_mismatch(torchvision.models.resnet18(), many)
    assert "more)" in state_mismatch(torchvision.models.resnet18(), many)


def test_checkpoints_saved_from_dataparallel_or_nested_load(tmp_path):
    trained = torchvision.models.resnet18(num_classes=4).eval()
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}, "epoch": 3}, path)
    model = load_trained("resnet18", str(path))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in trained.state_dict().items())


def test_timm_models_load_with_their_recorded_normalisation(tmp_path):
    timm = pytest.importorskip("timm")
    from fxrebirth.paper.loading import model_mean_std

    trained = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    path = tmp_path / "w.pt"
    torch.save(trained.state_dict(), path)
    model = load_trained("timm:resnet18", str(path))
    assert type(model) is type(trained) and model.fc.out_features == 5
    assert model_mean_std(model) == (tuple(trained.pretrained_cfg["mean"]), tuple(trained.pretrained_cfg["std"]))
    with pytest.raises(FxRebirthError, match="timm has no model"):
        load_trained("timm:no_such_net", None)


def test_an_exported_program_is_refused_with_what_to_give_instead():
    with pytest.raises(FxRebirthError, match="give its architecture"):
        load_trained("model.pt2", None)
