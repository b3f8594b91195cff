"""vxnb._graph: the one model-graph analysis (layer numbers/kinds, receptive fields, total strides,
spatial sizes) against hand-computed values and explicit-loop references on VGG-11, ResNet-18,
AlexNet and the reference nets of vxnb.models."""
import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from vxnb import _graph as G
from vxnb.explanations import total_stride
from vxnb.features import default_layers, layer_numbers
from vxnb.interpret import receptive_field
from vxnb.models import FlowerNet, MnistNet

SEQUENTIAL_NETS = {  # name -> (model, input size (C, H, W))
    "vgg11": (lambda: torchvision.models.vgg11(), (3, 64, 64)),
    "alexnet": (lambda: torchvision.models.alexnet(), (3, 224, 224)),
    "mnist": (lambda: MnistNet(), (1, 28, 28)),
    "flower": (lambda: FlowerNet(num_classes=8, size=64), (3, 64, 64)),
}


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaf modules of a net built from nn.Sequential containers, in forward order."""
    return [(n, m) for n, m in model.named_modules() if n and not list(m.children())]


def _loop_fields(model: nn.Module, sizes: dict[str, tuple]) -> dict[str, tuple]:
    """Receptive fields by the textbook recurrence over a plain chain (independent of the walker):
    size r += (k-1)·d·j, start += ((k-1)·d/2 - p)·j, jump j *= s; None after a global operation
    (adaptive pooling that keeps the map size, per ``sizes`` {name: (in, out)}, is the identity)."""
    r, j, start, out = 1, 1, 0.0, {}
    for name, m in _chain(model):
        if r is None or len(sizes[name][0]) != 2:  # after a global op (or torch.flatten in forward)
            r = out[name] = None
            continue
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            p = m.padding if isinstance(m.padding, int) else m.padding[0]
            d = getattr(m, "dilation", 1)
            d = d if isinstance(d, int) else d[0]
            r, start, j = r + (k - 1) * d * j, start + ((k - 1) * d / 2 - p) * j, j * s
        elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and sizes[name][0] == sizes[name][1]:
            pass
        elif isinstance(m, (nn.Flatten, nn.Linear, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            r = None
            out[name] = None
            continue
        out[name] = (r, j, start)
    return out


def _hook_strides(model: nn.Module, input_size: tuple) -> tuple[dict[str, int], dict[str, tuple]]:
    """The product of the strides of every strided module that ran before each module's first
    output (the old hook-based measure; right for chains, it double-counts parallel branches),
    and each module's (input, output) sizes after the channel dimension."""
    strides, at, sizes = [], {}, {}
    handles = [m.register_forward_hook(lambda mod, i, o: strides.append(max(_pair(mod.stride))))
               for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    def first(name):
        def hook(mod, i, o):
            at.setdefault(name, math.prod(strides))
            sizes[name] = (tuple(i[0].shape[2:]), tuple(o.shape[2:]))
        return hook

    handles += [m.register_forward_hook(first(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1,) + input_size))
    finally:
        for h in handles:
            h.remove()
    return at, sizes


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@pytest.mark.parametrize("name", list(SEQUENTIAL_NETS))
def test_chain_nets_fields_and_strides_match_explicit_loops(name):
    build, size = SEQUENTIAL_NETS[name]
    model = build()
    walker, shapes = G.walk_model(model, size)
    hooks, sizes = _hook_strides(model, size)
    expected = _loop_fields(model, sizes)
    assert len(expected) > 10
    for layer, exp in expected.items():
        rf = G.state_to_rf(walker.record[layer][-1], layer)
        stride, spatial = G.stride_at(model, layer, size)
        assert stride == hooks[layer], layer
        assert spatial == (len(sizes[layer][1]) == 2), layer
        assert shapes[layer][1] == (sizes[layer][1] if spatial else None), layer
        if exp is None:
            assert rf.whole_image, layer
            continue
        r, j, start = exp
        assert rf.size == (r, r) and rf.stride == (j, j) and rf.offset == (start, start), (layer, rf, exp)
        assert stride == j


def test_vgg11_hand_computed():
    model = torchvision.models.vgg11()
    t = layer_numbers(model)
    convs = ["features.0", "features.3", "features.6", "features.8", "features.11", "features.13",
             "features.16", "features.18"]
    assert list(t["name"]) == convs + ["classifier.0", "classifier.3", "classifier.6"]
    assert list(t["layer_number"]) == list(range(1, 12))
    assert list(t["kind"]) == ["conv"] * 8 + ["fc"] * 3
    assert list(t["hook"]) == [f"features.{int(c.split('.')[1]) + 1}" for c in convs] + \
        ["classifier.1", "classifier.4", "classifier.6"]
    # conv 3x3 pad 1 then pool 2/2: 3, 4 (pool), 8, 10 (pool), 18, 26, 30 (pool), ...
    assert receptive_field(model, "features.0").size == (3, 3)
    assert receptive_field(model, "features.2") == G.ReceptiveField((4, 4), (2, 2), (0.5, 0.5))
    assert receptive_field(model, "features.5") == G.ReceptiveField((10, 10), (4, 4), (1.5, 1.5))
    assert receptive_field(model, "features.20") == G.ReceptiveField((150, 150), (32, 32), (15.5, 15.5))
    assert [G.stride_at(model, n, (3, 64, 64))[0] for n in ("features.0", "features.2", "features.20",
                                                           "classifier.6")] == [1, 2, 32, 32]


def test_alexnet_hand_computed():
    model = torchvision.models.alexnet()
    t = layer_numbers(model)
    assert list(t["name"]) == ["features.0", "features.3", "features.6", "features.8", "features.10",
                               "classifier.1", "classifier.4", "classifier.6"]
    assert list(t["layer_number"]) == list(range(1, 9))
    assert list(t["hook"])[:6] == ["features.1", "features.4", "features.7", "features.9", "features.11",
                                   "classifier.2"]
    assert default_layers(model)[-1] == "classifier.5"  # fc7's ReLU; the classifier is left out
    # conv1 11/4 pad 2, pool 3/2, conv2 5 pad 2: 11, 19, 51
    assert receptive_field(model, "features.0") == G.ReceptiveField((11, 11), (4, 4), (3.0, 3.0))
    assert receptive_field(model, "features.2") == G.ReceptiveField((19, 19), (8, 8), (7.0, 7.0))
    assert receptive_field(model, "features.3").size == (51, 51)
    assert receptive_field(model, "features.12").size == (195, 195)
    assert G.stride_at(model, "features.12", (3, 224, 224)) == (32, True)
    assert G.stride_at(model, "avgpool", (3, 224, 224)) == (32, True)      # 6x6 -> 6x6: the identity
    assert receptive_field(model, "avgpool", (3, 224, 224)).size == (195, 195)
    assert G.stride_at(model, "classifier.1", (3, 224, 224)) == (32, False)


def test_resnet18_hand_computed():
    model = torchvision.models.resnet18()
    t = layer_numbers(model).set_index("name")
    order = ["conv1"]
    for s in range(1, 5):
        for b in range(2):
            order += [f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2"]
            if b == 0 and s > 1:
                order.append(f"layer{s}.0.downsample.0")
    order.append("fc")
    assert list(t.index) == order and list(t["layer_number"]) == list(range(1, 22))
    assert t.loc["conv1", "hook"] == "relu"                     # called once
    assert t.loc["layer1.0.conv1", "hook"] == "layer1.0.bn1"   # the block's relu is shared
    assert t.loc["layer2.0.downsample.0", "hook"] == "layer2.0.downsample.1"
    assert t.loc["fc", "kind"] == "fc" and set(t["kind"][:-1]) == {"conv"}
    size = (3, 64, 64)
    # one path: conv1 /2, maxpool /2, then /2 at the first block of layers 2-4 (downsample in parallel)
    expected = {"conv1": 2, "maxpool": 4, "layer1": 4, "layer2.0.conv1": 8, "layer2.0.downsample.1": 8,
                "layer2.1.bn1": 8, "layer3": 16, "layer4.0.conv2": 32, "layer4": 32, "avgpool": 32, "fc": 32}
    assert {n: G.stride_at(model, n, size)[0] for n in expected} == expected
    assert total_stride(model, torch.zeros(2, *size), "layer4.1.bn2") == 32
    old, _ = _hook_strides(model, size)  # the old measure multiplied the parallel downsample in too
    assert old["layer2.0.downsample.1"] == 16 and old["layer4"] == 256
    assert receptive_field(model, "layer1").stride == (4, 4)
    assert G.stride_at(model, "fc", size)[1] is False and G.stride_at(model, "layer4", size)[1] is True


class _Untraceable(nn.Module):
    """Data-dependent control flow (torch.fx cannot trace it), classifier registered first."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.conv = nn.Conv2d(1, 4, 3)
        self.relu = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        return self.head(self.relu(self.conv(x)).mean((2, 3)))


def test_trace_failure_warns_and_numbers_by_registration():
    with pytest.warns(RuntimeWarning, match="registration order"):
        a = G.analyse_layers(_Untraceable())
    assert not a.traced
    assert a.numbers == {"head": 1, "conv": 2}
    assert a.kinds == {"head": "fc", "conv": "conv"}
    traced = G.analyse_layers(nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 4, 3), relu=nn.ReLU())))
    assert traced.traced and traced.hook == {"conv": "relu"}


def test_stride_at_bad_layer():
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 3, stride=2)))
    model.conv.add_module("unused", nn.ReLU())  # registered, never called
    assert G.stride_at(model, "conv", (1, 8, 8)) == (2, True)
    with pytest.raises(ValueError, match="nope"):
        G.stride_at(model, "nope", (1, 8, 8))
    with pytest.raises(ValueError, match="'conv.unused' was not called"):
        G.stride_at(model, "conv.unused", (1, 8, 8))


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x0_5", "regnet_x_400mf"])
def test_total_stride_through_excitation_shuffles_and_branches(arch):
    """Squeeze-excitation products and channel shuffles make the field the whole image but keep
    the grid; stochastic depth is the identity in eval; every one of these nets ends at /32."""
    model = getattr(torchvision.models, arch)()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert G.stride_at(model, convs[0], (3, 96, 96)) == (2, True)
    assert G.stride_at(model, convs[-1], (3, 96, 96)) == (32, True)
