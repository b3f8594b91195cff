import pytest

from vxnb import widgets


def test_panel_updates_the_same_outputs(monkeypatch):
    shown, handles = [], []

    class Handle:
        def __init__(self, obj):
            self.obj = obj

        def update(self, obj):
            self.obj = obj

    def fake_display(obj, display_id=False):
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
