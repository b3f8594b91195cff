"""vxnb.plots: the explanation panel and the visual-quality comparison figure."""
import numpy as np
import pandas as pd
import pytest
import torch

from vxnb import plots
from vxnb.explanations import COMPARISON_METHODS, Comparison, Explanation


def _explanation(k: int, predicted: int = 1, target: int = 1) -> Explanation:
    feats = pd.DataFrame({"rank": range(k), "feature": range(k), "layer": ["relu2"] * (k - 1) + ["relu6"],
                          "layer_number": [2] * (k - 1) + [6], "kind": ["conv"] * (k - 1) + ["fc"],
                          "channel": range(k), "weight": [0.5] * k, "x": [0.1] * k, "response": [0.05] * k}) \
        if k else pd.DataFrame(columns=["rank", "feature", "layer", "layer_number", "kind", "channel", "weight",
                                        "x", "response"])
    return Explanation(image=torch.rand(3, 8, 8), predicted=predicted, target=target,
                       probabilities=np.array([0.2, 0.7, 0.1]), features=feats, heatmaps=torch.rand(k, 8, 8),
                       rgb=torch.rand(k, 3, 8, 8), combined=torch.rand(8, 8), classes=["a", "b", "c"],
                       message=None if k else "class 'b' (1) has no relevant feature")


@pytest.mark.parametrize("mode", ["overlay", "heatmap", "rgb"])
def test_explanation_panel(mode):
    e = _explanation(3)
    fig = plots.explanation_panel(e.image, e, mode=mode)
    assert len(fig.data) == 4
    texts = [a.text for a in fig.layout.annotations]
    assert texts[0].startswith("<b>b</b>") and texts[1:] == ["layer 2 · ch 0", "layer 2 · ch 1", "layer 6 · ch 2"]
    colors = [a.font.color for a in fig.layout.annotations]
    assert colors[1:] == [plots.KIND_COLORS["conv"]] * 2 + [plots.KIND_COLORS["fc"]]
    assert "weight 0.5" in fig.data[1].hovertemplate and "response 0.05" in fig.data[1].hovertemplate
    assert "channel 0" in fig.data[1].hovertemplate
    fig = plots.explanation_panel(e.image, e, show_combined=True)
    assert len(fig.data) == 5 and fig.layout.annotations[-1].text == "combined"


def test_explanation_panel_target_and_empty():
    e = _explanation(2, predicted=1, target=0)
    fig = plots.explanation_panel(e.image, e, classes=["x", "y", "z"])
    assert "<b>y</b>" in fig.layout.annotations[0].text and "explaining x" in fig.layout.annotations[0].text
    e = _explanation(0)
    fig = plots.explanation_panel(e.image, e)
    assert len(fig.data) == 1
    assert any("no relevant feature" in a.text for a in fig.layout.annotations)
    with pytest.raises(ValueError, match="mode"):
        plots.explanation_panel(e.image, e, mode="nope")
    with pytest.raises(TypeError, match="explanation"):
        plots.explanation_panel(e.image, object())


def _comparison() -> Comparison:
    feats = pd.DataFrame({"column": ["low", "high", "FC"], "layer": ["relu1", "relu4", "relu6"],
                          "layer_number": [1, 4, 6], "kind": ["conv", "conv", "fc"], "channel": [3, 4, 5]})
    maps = {m: [torch.rand(8, 8) for _ in range(3)] for m in COMPARISON_METHODS}
    maps["upsampled activation"][2] = None
    scores = pd.DataFrame([dict(method=m, column=c, grid_score=np.nan if maps[m][i] is None else 0.1 * i)
                           for m in COMPARISON_METHODS for i, c in enumerate(feats["column"])])
    return Comparison(image=torch.rand(3, 8, 8), features=feats, methods=COMPARISON_METHODS, maps=maps,
                      scores=scores)


@pytest.mark.parametrize("transpose", [False, True])
def test_method_comparison(transpose):
    fig = plots.method_comparison(_comparison(), transpose=transpose)
    assert len(fig.data) == 1 + 9  # the image and one trace per cell (a blank one where not applicable)
    texts = [a.text for a in fig.layout.annotations]
    assert texts.count("not applicable") == 1
    assert sum(t.startswith("grid ") for t in texts) == 8
    for m in COMPARISON_METHODS:
        assert m in texts
    assert "FC: layer 6 · ch 5" in texts
    fc = next(a for a in fig.layout.annotations if a.text == "FC: layer 6 · ch 5")
    assert fc.font.color == plots.KIND_COLORS["fc"]
    fig = plots.method_comparison(_comparison(), mode="overlay")
    assert len(fig.data) == 10
    with pytest.raises(TypeError, match="comparison"):
        plots.method_comparison(object())


def test_benchmark_examples_embed_png_images_equal_to_the_pixels():
    import base64
    import io

    from PIL import Image

    from vxnb import plots
    from vxnb.plots import to_uint8_rgb

    g = torch.Generator().manual_seed(0)
    ex = {"images": torch.rand(2, 3, 12, 12, generator=g), "masks": torch.rand(2, 12, 12, generator=g) > 0.5,
          "labels": [0, 1], "preds": [1, 1], "classes": ["a", "b"],
          "heatmaps": {"ours": torch.rand(2, 12, 12, generator=g)}}
    fig = plots.benchmark_examples(ex, {"ours": "Ours"})
    assert len(fig.data) == 2 * 3 and all(t.z is None and t.source.startswith("data:image/png;base64,")
                                          for t in fig.data)
    png = base64.b64decode(fig.data[3].source.split(",", 1)[1])
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), to_uint8_rgb(ex["images"][1]))
    assert "true b<br>predicted b" in fig.data[3].hovertemplate
