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
