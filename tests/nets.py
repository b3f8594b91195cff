"""Tiny networks shared by several test files."""
from collections import OrderedDict

import torch
from torch import nn


def tiny_strided_net(n_classes: int) -> nn.Sequential:
    """conv(stride 2) → max-pool → conv → FC → FC for 3×16×16 inputs, with positive biases so most
    units respond and rankings are non-trivial; seeded, in eval mode."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 6, 3, stride=2, padding=1)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(6, 8, 3, padding=1)), ("relu2", nn.ReLU()),
        ("flat", nn.Flatten()),
        ("fc3", nn.Linear(8 * 4 * 4, 10)), ("relu3", nn.ReLU()),
        ("fc4", nn.Linear(10, n_classes)),
    ]))
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.bias.uniform_(0.05, 0.2)
    return m.eval()
