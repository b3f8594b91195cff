"""vxnb.plots: interpretation figures (average-image grids, overview, layer composition, mask overlap)."""
import numpy as np
import pandas as pd
import pytest

from vxnb import plots
from vxnb.averages import AverageImage, AverageImages
from vxnb.interpret import ReceptiveField


def _item(klass, feature, layer, channel, kind, weight, seed, with_maps=True):
    rng = np.random.default_rng(seed)
    rf = ReceptiveField(None, None, None) if kind == "fc" else ReceptiveField((27, 27), (8, 8), (3.0, 3.0))
    return AverageImage(klass=klass, feature=feature, layer=layer, channel=channel, kind=kind, weight=weight, rf=rf,
                        indices=np.arange(5), boxes=np.zeros((5, 4), np.int64),
                        image=rng.random((3, 8, 8)).astype(np.float32),
                        ours=rng.random((8, 8)).astype(np.float32) * 0.3 + 0.1 if with_maps else None,
                        deconv=rng.random((8, 8)).astype(np.float32) if with_maps else None,
                        activation=None if kind == "fc" else rng.random((8, 8)).astype(np.float32))


def _averages():
    res = AverageImages()
    specs = [(0, 3, "relu2", 3, "conv", 0.2, 2), (0, 40, "relu6", 7, "fc", 0.9, 6), (0, 9, "relu3", 1, "conv", 0.5, 3),
             (2, 3, "relu2", 3, "conv", 0.4, 2)]
    rows = []
    for c, f, layer, ch, kind, w, ln in specs:
        res.items[(c, f)] = _item(c, f, layer, ch, kind, w, seed=f + c)
        rows.append({"class": c, "class_name": f"c{c}", "feature": f, "layer": layer, "layer_number": ln,
                     "channel": ch, "kind": kind, "weight": w})
    res.summary = pd.DataFrame(rows)
    res.messages.append("class 1 has no relevant feature (at this μ); nothing to average")
    return res


def _pixels(trace) -> np.ndarray:
    """The RGB pixels of an image trace (a PNG data URI in ``source``)."""
    import base64
    import io

    from PIL import Image

    head, data = trace.source.split(",", 1)
    assert head == "data:image/png;base64"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def _texts(fig):
    return [a.text for a in fig.layout.annotations]


def test_average_image_grid_order_labels_colours_and_tiles():
    avg = _averages()
    fig = plots.average_image_grid(avg, 0, classes=["c0", "c1", "c2"], per_row=2, size=64)
    # 3 features x 4 tiles, one image trace per tile (n/a tiles included)
    assert len(fig.data) == 12 and all(t.type == "image" for t in fig.data)
    # sorted by weight: fc (0.9), relu3 (0.5), relu2 (0.2); titles carry layer number and type, kind colours
    heads = [a for a in fig.layout.annotations if a.text.startswith("<b>#")]
    assert [a.text for a in heads] == ["<b>#1</b> layer 6 · fc", "<b>#2</b> layer 3 · conv",
                                       "<b>#3</b> layer 2 · conv"]
    assert [a.font.color for a in heads] == [plots.KIND_COLORS["fc"], plots.KIND_COLORS["conv"],
                                              plots.KIND_COLORS["conv"]]
    # the FC feature's activation tile is n/a, and the title says why
    assert _texts(fig).count("n/a") == 1
    assert "FC features have no activation map" in fig.layout.title.text
    assert "c0" in fig.layout.title.text and "3 relevant features" in fig.layout.title.text
    # a negative weight is marked
    avg.items[(0, 3)].weight = -0.3
    neg = plots.average_image_grid(avg, 0)
    assert [a.text for a in neg.layout.annotations if a.text.startswith("<b>#")][-1] == "<b>#3</b> layer 2 · conv (−)"
    avg.items[(0, 3)].weight = 0.2
    # hover: layer, channel, weight
    assert "channel 7" in fig.data[0].hovertemplate and "weight 0.9" in fig.data[0].hovertemplate
    # pixels: the average image as uint8, heatmaps min-max scaled then coloured
    item = avg[(0, 9)]
    np.testing.assert_array_equal(_pixels(fig.data[4]), plots.to_uint8_rgb(item.image))
    scaled = (item.ours - item.ours.min()) / (item.ours.max() - item.ours.min())
    want = (np.clip(plots.colorize(scaled), 0, 1) * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(_pixels(fig.data[5]), want)
    assert "Deconv+GB" in _texts(fig) and "ours" in _texts(fig)


def test_average_image_grid_subset_methods_max_features_and_empty_class():
    avg = _averages()
    fig = plots.average_image_grid(avg, 0, methods=("image", "ours"), max_features=2, per_row=3)
    assert len(fig.data) == 4 and "(first 2)" in fig.layout.title.text
    assert "n/a" not in _texts(fig)
    # a map that was not computed is n/a, not a crash
    avg.items[(2, 3)].deconv = None
    fig = plots.average_image_grid(avg, 2, methods=("deconv",))
    assert _texts(fig).count("n/a") == 1 and "FC" not in fig.layout.title.text
    # a class without relevant feature: a figure carrying the message
    fig = plots.average_image_grid(avg, 1, classes=["c0", "c1", "c2"])
    assert len(fig.data) == 0 and "class 1 has no relevant feature" in _texts(fig)[0]


def test_average_image_grid_bad_inputs():
    avg = _averages()
    with pytest.raises(TypeError, match="average_images"):
        plots.average_image_grid({"a": 1}, 0)
    with pytest.raises(ValueError, match="methods"):
        plots.average_image_grid(avg, 0, methods=("gradcam",))
    with pytest.raises(ValueError, match="per_row"):
        plots.average_image_grid(avg, 0, per_row=0)
    with pytest.raises(ValueError, match="size"):
        plots.average_image_grid(avg, 0, size=4)


def test_average_image_overview_rows_and_empty_class():
    avg = _averages()
    fig = plots.average_image_overview(avg, ["c0", "c1", "c2"], top=2, size=60)
    assert len(fig.data) == 3                      # class 0: top 2 of 3, class 1: none, class 2: one
    texts = _texts(fig)
    assert "<b>c1</b>" in texts and "no relevant feature" in texts
    np.testing.assert_array_equal(_pixels(fig.data[0]), plots.to_uint8_rgb(avg[(0, 40)].image))
    colours = [a.font.color for a in fig.layout.annotations if a.text.startswith("layer")]
    assert colours == [plots.KIND_COLORS[k] for k in ("fc", "conv", "conv")]
    with pytest.raises(ValueError, match="top"):
        plots.average_image_overview(avg, top=0)


def test_layer_composition_counts_shades_and_empty_class():
    rel = pd.DataFrame({"class": [0, 0, 0, 2, 2], "class_name": ["a", "a", "a", "c", "c"],
                        "layer": ["relu1", "relu6", "relu1", "relu5", "relu1"], "layer_number": [1, 6, 1, 5, 1],
                        "kind": ["conv", "fc", "conv", "conv", "conv"], "channel": [0, 1, 2, 3, 4],
                        "weight": [1.0] * 5})
    fig = plots.layer_composition(rel, ["a", "b", "c"])
    assert [t.name.split(" (")[0] for t in fig.data] == ["layer 1 · conv", "layer 5 · conv", "layer 6 · fc"]
    counts = {t.name.split(" (")[0]: list(t.y) for t in fig.data}
    assert counts == {"layer 1 · conv": [2, 0, 1], "layer 5 · conv": [0, 0, 1], "layer 6 · fc": [1, 0, 0]}
    assert list(fig.data[0].x) == ["a", "b", "c"] and fig.layout.barmode == "stack"
    # conv layers in green shades (deeper darker), FC in pink
    conv = [t.marker.color for t in fig.data[:2]]
    rgb = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in conv + [fig.data[2].marker.color]]
    assert all(g > r and g > b for r, g, b in rgb[:2]) and sum(rgb[0]) > sum(rgb[1])
    assert rgb[2][0] > rgb[2][1] and rgb[2][2] > rgb[2][1]
    assert "none" in _texts(fig)
    with pytest.raises(ValueError, match="missing column"):
        plots.layer_composition(rel.drop(columns="kind"))
    with pytest.raises(ValueError, match=r"class ids \[2\]"):
        plots.layer_composition(rel, ["a", "b"])
    with pytest.raises(TypeError, match="relevant"):
        plots.layer_composition([1, 2])


def test_mask_overlap_bars_values():
    frame = pd.DataFrame({"class": [0, 1], "class_name": ["a", "b"], "overlap": [1.0, 0.9],
                          "box_on_mask": [0.4, 0.2], "center_on_mask": [0.8, 0.3], "chance": [0.15, 0.15]})
    fig = plots.mask_overlap_bars(frame)
    assert [list(t.y) for t in fig.data] == [[0.8, 0.3], [0.4, 0.2], [0.15, 0.15]]
    assert list(fig.data[0].customdata) == [1.0, 0.9]
    with pytest.raises(ValueError, match="center_on_mask"):
        plots.mask_overlap_bars(frame.drop(columns="center_on_mask"))
