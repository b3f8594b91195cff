"""Issue 12, item 4: what used to fall back silently now says so or fails."""
import warnings

import pytest
import torch
from torch import nn

from vxnb.deconv import heatmap, visualize
from vxnb.features import default_layers


class Branchy(nn.Module):
    """A forward with data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        if x.sum() > 0:
            x = x * 1.0
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_warns_that_numbers_follow_registration_order():
    with pytest.warns(RuntimeWarning, match="registration order"):
        layers = default_layers(Branchy())
    assert layers == ["relu1"]


def test_traceable_model_gives_no_such_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert default_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))) == ["1"]


def test_nan_in_a_visualisation_names_layer_and_channel():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 4, 3, padding=1))
    model.add_module("relu1", nn.ReLU())
    x = torch.rand(2, 3, 8, 8)
    assert torch.isfinite(visualize(model, x, "relu1", [2])).all()
    with torch.no_grad():
        model.conv1.bias[2] = float("nan")  # channel 2's activations are NaN
    with pytest.raises(ValueError, match=r"layer 'relu1', channel 2: .*NaN"):
        visualize(model, x, "relu1", [2])


def test_heatmap_of_nan_is_an_error_not_zeros():
    v = torch.rand(2, 3, 3, 5, 5)
    v[1, 2, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"v: .*index \(1, 2\).*NaN"):
        heatmap(v)
    assert torch.isfinite(heatmap(torch.rand(2, 3, 3, 5, 5))).all()
