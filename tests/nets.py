"""Tiny networks shared by the test files (and the random data some of them run on)."""
from collections import OrderedDict

import torch
from torch import nn
from torch.utils.data import TensorDataset


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


def random_images(n: int, channels: int, size: int, seed: int = 1, low: float = 0.0) -> torch.Tensor:
    """(n, channels, size, size) float32 uniform in [low, 1), from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, channels, size, size, generator=g)
    return x if low == 0 else low + (1 - low) * x


def small_net(num_classes: int = 3) -> nn.Sequential:
    """conv → BN → ReLU → pool → conv (no nonlinearity) → pool → FC → ReLU → dropout → FC for
    1×8×8 inputs: every kind of block the default layers handle (vxnb.features' tests)."""
    net = nn.Sequential()
    for n, m in [("conv1", nn.Conv2d(1, 4, 3, padding=1)), ("bn1", nn.BatchNorm2d(4)), ("relu1", nn.ReLU()),
                 ("pool1", nn.MaxPool2d(2)), ("conv2", nn.Conv2d(4, 6, 3, padding=1)), ("pool2", nn.MaxPool2d(2)),
                 ("flat", nn.Flatten()), ("fc3", nn.Linear(6 * 2 * 2, 5)), ("relu3", nn.ReLU()),
                 ("drop3", nn.Dropout()), ("fc4", nn.Linear(5, num_classes))]:
        net.add_module(n, m)
    return net


def random_data(n: int = 23, classes: int = 3, size: int = 8) -> TensorDataset:
    """n seeded random 1-channel images and labels, for :func:`small_net`."""
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.rand(n, 1, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))


def gray_net(n_classes: int) -> nn.Sequential:
    """Two convs and two FC layers for 1×8×8 inputs (vxnb.evaluate.ablation's tests)."""
    net = nn.Sequential()
    for n, m in [("conv1", nn.Conv2d(1, 4, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
                 ("conv2", nn.Conv2d(4, 6, 3, padding=1)), ("relu2", nn.ReLU()), ("flat", nn.Flatten()),
                 ("fc3", nn.Linear(6 * 16, 8)), ("relu3", nn.ReLU()), ("fc4", nn.Linear(8, n_classes))]:
        net.add_module(n, m)
    return net


def pooled_net(num_classes: int = 4) -> nn.Sequential:
    """conv(stride 2) → pool → conv → pool → two FC layers for 3×32×32 inputs, in eval mode."""
    s = nn.Sequential()
    for name, m in [("conv1", nn.Conv2d(3, 6, 3, stride=2, padding=1)), ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)), ("conv2", nn.Conv2d(6, 8, 3, padding=1)), ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2)), ("flatten", nn.Flatten()), ("fc6", nn.Linear(8 * 4 * 4, 16)),
                    ("relu6", nn.ReLU()), ("fc7", nn.Linear(16, num_classes))]:
        s.add_module(name, m)
    return s.eval()


def rgb_net() -> nn.Sequential:
    """conv → pool → conv → two FC layers for 3×16×16 inputs, in eval mode."""
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 4, 3, padding=1)), ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2, 2)),
        ("conv2", nn.Conv2d(4, 5, 3, padding=1)), ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc3", nn.Linear(5 * 8 * 8, 6)), ("relu3", nn.ReLU()),
        ("fc4", nn.Linear(6, 3)),
    ])).eval()


def dense_net(size: int, num_classes: int = 5) -> nn.Sequential:
    """Two unpooled convs and two FC layers for 1×size×size inputs; seeded."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 4, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 4, 3, padding=1)),
        ("relu2", nn.ReLU()),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(4 * size * size, 16)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(16, num_classes)),
    ]))


def flat_net() -> nn.Sequential:
    """One conv and two FC layers for 1×5×5 inputs, in eval mode."""
    n = nn.Sequential()
    n.add_module("conv1", nn.Conv2d(1, 4, 3, padding=1))
    n.add_module("relu1", nn.ReLU())
    n.add_module("flat", nn.Flatten())
    n.add_module("fc2", nn.Linear(4 * 5 * 5, 6))
    n.add_module("relu2", nn.ReLU())
    n.add_module("fc3", nn.Linear(6, 3))
    return n.eval()


def gap_net() -> nn.Sequential:
    """One conv, global average pooling and a classifier for 3-channel inputs; seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))
