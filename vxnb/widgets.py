"""ipywidgets controls for the notebooks (controls only; figures come from ``vxnb.plots``).

Each ``*_picker`` returns a widget; :func:`panel` wires widgets to a function that returns a
plotly figure (or anything displayable) and re-renders it when a control changes. The
initial output is rendered at once, so a notebook executed headlessly (papermill) and its HTML
export show the controls and the first figure.
"""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["class_picker", "mu_slider", "layer_picker", "index_slider", "panel"]


def class_picker(classes: Sequence[str], value: int = 0, description: str = "class"):
    import ipywidgets as w

    if not classes:
        raise ValueError("classes: expected at least one class name")
    return w.Dropdown(options=[(f"{i}: {c}", i) for i, c in enumerate(classes)], value=value,
                      description=description)


def mu_slider(mu_max: float, value: float = 10.0, mu_min: float = 0.1, description: str = "μ"):
    """A log-scale μ slider (the μ-lasso path answers any value instantly)."""
    import ipywidgets as w
    import math

    if not 0 < mu_min < mu_max:
        raise ValueError(f"mu_min, mu_max: expected 0 < mu_min < mu_max, got {mu_min}, {mu_max}")
    value = min(max(value, mu_min), mu_max)
    return w.FloatLogSlider(value=value, base=10, min=math.log10(mu_min), max=math.log10(mu_max), step=0.05,
                            description=description, continuous_update=False, readout_format=".2g")


def layer_picker(layers: Sequence[str], description: str = "layers", value: Sequence[str] | None = None):
    import ipywidgets as w

    return w.SelectMultiple(options=list(layers), value=tuple(value if value is not None else layers),
                            description=description, rows=min(8, max(2, len(layers))))


def index_slider(n: int, value: int = 0, description: str = "image"):
    import ipywidgets as w

    if n < 1:
        raise ValueError(f"n: expected at least one item, got {n}")
    return w.IntSlider(value=min(value, n - 1), min=0, max=n - 1, description=description,
                       continuous_update=False)


def panel(fn: Callable[..., object], **controls):
    """Show ``controls`` above the output of ``fn(**values)``, updated in place on every change.

    ``fn`` returns one displayable object or a tuple of them (always the same number).

    The first output is an ordinary cell output (so an executed notebook and its HTML export
    show it); later changes replace it through its display id. No ``Output`` widget is used:
    plotly's HTML renderer inside one hangs headless execution (nbclient).
    """
    import ipywidgets as w
    from IPython.display import display

    if not controls:
        raise ValueError("controls: expected at least one widget, e.g. cls=class_picker(classes)")

    def values() -> tuple:
        result = fn(**{k: c.value for k, c in controls.items()})
        result = result if isinstance(result, tuple) else (result,)
        return tuple("" if r is None else r for r in result)

    display(w.HBox(list(controls.values())))
    handles = [display(r, display_id=True) for r in values()]

    def render(*_):
        for h, r in zip(handles, values()):
            h.update(r)

    for c in controls.values():
        c.observe(render, names="value")
