import pytest

from vxnb import widgets


def test_panel_updates_the_same_outputs(monkeypatch):
    shown, handles = [], []

    class Handle:
        def __init__(self, obj):
            self.obj = obj

        def update(self, obj, raw=False):
            self.obj = obj["text/plain"] if raw else obj

    def fake_display(obj, display_id=False, raw=False):
        obj = obj["text/plain"] if raw else obj  # a sentence goes as plain text (no quotes)
        shown.append(obj)
        if display_id:
            handles.append(Handle(obj))
            return handles[-1]

    monkeypatch.setattr("IPython.display.display", fake_display)
    picker = widgets.class_picker(["a", "b", "c"])
    assert widgets.panel(lambda cls: (f"class {cls}", cls * 10), cls=picker) is None
    assert [h.obj for h in handles] == ["class 0", 0]
    picker.value = 2
    assert [h.obj for h in handles] == ["class 2", 20]
    assert len(shown) == 3  # the controls and two outputs, no new outputs on change


def test_controls_validate():
    with pytest.raises(ValueError, match="classes"):
        widgets.class_picker([])
    with pytest.raises(ValueError, match="mu_min"):
        widgets.mu_slider(mu_max=0.05)
    with pytest.raises(ValueError, match="n"):
        widgets.index_slider(0)
    s = widgets.mu_slider(50, value=10)
    assert abs(s.value - 10) < 1e-9
    with pytest.raises(ValueError, match="controls"):
        widgets.panel(lambda: None)


# --- offline panels: the report's stand-in, built from the live panel's own function -------------
def _bars(cls, mu, scale=1):
    """A panel function like notebook 02's: a figure, or a sentence when nothing is selected."""
    import plotly.graph_objects as go

    n = int(mu * (cls + 1) * scale)
    if n == 0:
        return f"no feature is selected for class {cls} at μ = {mu:.3g}", "table"
    return go.Figure(go.Bar(x=list(range(n)), y=[1] * n), layout=dict(title=f"class {cls}: {n}")), "table"


def test_offline_choices_follow_the_controls():
    import numpy as np

    assert widgets.offline_choices(widgets.class_picker(["a", "b"])) == [("0: a", 0), ("1: b", 1)]
    mu = widgets.offline_choices(widgets.mu_slider(50, value=10), n=5)
    values = [v for _, v in mu]
    assert np.allclose(values[0], 0.1) and np.allclose(values[-1], 50) and 10 in values and len(values) == 6
    assert np.all(np.diff(values) > 0)
    assert [v for _, v in widgets.offline_choices(widgets.index_slider(4))] == [0, 1, 2, 3]
    wide = [v for _, v in widgets.offline_choices(widgets.index_slider(1000, value=7), n=5)]
    assert wide[0] == 0 and wide[-1] == 999 and 7 in wide and len(wide) == 6
    assert widgets.offline_choices({"x": 1, "y": 2}) == [("x", 1), ("y", 2)]
    with pytest.raises(TypeError, match="SelectMultiple"):
        widgets.offline_choices(widgets.layer_picker(["a", "b"]))
    with pytest.raises(ValueError, match="n"):
        widgets.offline_choices([1, 2], n=0)
    with pytest.raises(ValueError, match="empty"):
        widgets.offline_choices([])
    with pytest.raises(TypeError, match="control"):
        widgets.offline_choices(3.5)


def test_offline_frames_are_the_live_functions_figures():
    import json

    import plotly.io as pio

    frames = widgets.offline_frames(_bars, fixed=dict(scale=2), cls=widgets.class_picker(["a", "b", "c"]),
                                    mu=[0.1, 1.0, 4.0], progress=False)
    assert frames["names"] == ["cls", "mu"] and frames["kinds"] == ["menu", "slider"]
    assert len(frames["figures"]) == 9 and frames["start"] == {"cls": 0}
    for i, cls in enumerate(range(3)):
        for j, mu in enumerate([0.1, 1.0, 4.0]):
            fig = frames["figures"][i * 3 + j]  # itertools.product order
            live = _bars(cls, mu, scale=2)[0]
            if isinstance(live, str):  # nothing to show: the same sentence, in a figure
                assert [a["text"] for a in fig["layout"]["annotations"]] == [live] and not fig["data"]
            else:
                assert fig == json.loads(pio.to_json(live, validate=False))
    assert len(frames["figures"][0]["data"]) == 0  # class 0 at μ = 0.1 (scale 2): 0 bars, a sentence
    assert len(frames["figures"][8]["data"][0]["x"]) == 24
    with pytest.raises(ValueError, match="max_frames"):
        widgets.offline_frames(_bars, cls=list(range(10)), mu=list(range(10)), max_frames=50, progress=False)
    with pytest.raises(TypeError, match="fn"):
        widgets.offline_frames(lambda cls: 3, cls=[0], progress=False)
    with pytest.raises(ValueError, match="controls"):
        widgets.offline_frames(_bars, progress=False)


def test_offline_html_carries_every_frame_and_plotly_controls():
    import json
    import re

    frames = widgets.offline_frames(_bars, cls=widgets.class_picker(["a", "b"]),
                                    mu=widgets.mu_slider(10, value=1.0), n=4, progress=False)
    page = widgets.offline_html(frames)
    plot_id = re.search(r'<div id="([^"]+)" class="plotly-graph-div"', page).group(1)
    payload = json.loads(re.search(rf'<script type="application/json" id="{plot_id}-frames">(.*?)</script>',
                                   page, re.S).group(1))
    assert payload["sizes"] == [2, 5] and len(payload["figures"]) == 10
    assert payload["start"] == [0, [v for _, v in frames["choices"][1]].index(1.0)]  # the widgets' values
    assert [s["name"] for s in payload["sliders"]] == ["mu"] and [m["name"] for m in payload["menus"]] == ["cls"]
    assert [b["label"] for b in payload["menus"][0]["buttons"]] == ["cls: 0: a", "cls: 1: b"]
    assert all(step["method"] == "skip" for step in payload["sliders"][0]["steps"])
    # every frame keeps its data and gets the same room for the controls below it
    for f, src in zip(payload["figures"], frames["figures"]):
        assert f["data"] == src["data"] and f["layout"]["margin"]["b"] == 40 + 2 * 90
    # the template, in every source frame, is carried once and put back by the swap script
    assert all(src["layout"]["template"] == payload["template"] for src in frames["figures"])
    assert payload["template"]["layout"] and not any("template" in f["layout"] for f in payload["figures"])
    assert "if (F.template && layout.template === undefined) layout.template = F.template;" in page
    assert page.count('"template"') == 2  # the first figure's own div, and the shared copy
    with pytest.raises(ValueError, match="start"):
        widgets.offline_html(frames, start={"mu": 123.0})
    with pytest.raises(ValueError, match="sliders"):
        widgets.offline_html(frames, sliders=["nope"])


def test_offline_panel_computes_only_for_the_report(monkeypatch, capsys):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, **kw: shown.append((obj, kw)))
    monkeypatch.delenv(widgets.OFFLINE_ENV, raising=False)
    calls = []

    def fn(cls):
        calls.append(cls)
        return _bars(cls, 2.0)

    assert widgets.offline_panel(fn, cls=[0, 1]) is None
    assert not calls and not shown and "report" in capsys.readouterr().out
    monkeypatch.setenv(widgets.OFFLINE_ENV, "1")
    widgets.offline_panel(fn, cls=[0, 1])
    assert calls == [0, 1] and len(shown) == 1 and shown[0][1]["metadata"] == {widgets.OFFLINE_MARK: True}
    assert "plotly-graph-div" in shown[0][0].data
    assert "2 precomputed frames" in capsys.readouterr().out
    with pytest.warns(RuntimeWarning, match="max_mb"):
        widgets.offline_panel(fn, cls=[0, 1], max_mb=1e-4)


def test_panel_sends_plotly_updates_as_html(monkeypatch):
    """A plotly figure displays itself without the display id, and JupyterLab's plotly renderer
    ignores updates: the panel's figures go as HTML bundles tied to the id (found by the browser
    test: the live figure never changed)."""
    import plotly.graph_objects as go

    updates = []

    class Handle:
        def update(self, obj, **kw):
            updates.append((obj, kw))

    shown = []

    def fake_display(obj, display_id=False, **kw):
        shown.append((obj, display_id, kw))
        return Handle() if display_id else None

    monkeypatch.setattr("IPython.display.display", fake_display)
    picker = widgets.class_picker(["a", "b"])
    widgets.panel(lambda cls: go.Figure(layout=dict(title=f"class {cls}")), cls=picker)
    first, display_id, kw = shown[-1]  # the first figure too: as a bundle tied to its display id
    assert display_id is True and kw == {"raw": True} and '"class 0"' in first["text/html"]
    picker.value = 1
    (bundle, kw), = updates
    assert kw == {"raw": True} and "Plotly.newPlot" in bundle["text/html"] and '"class 1"' in bundle["text/html"]
    assert "<script src" not in bundle["text/html"]  # plotly.js is not sent again with every update
