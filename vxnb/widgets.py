"""ipywidgets controls for the notebooks (controls only; figures come from ``vxnb.plots``).

Each ``*_picker`` returns a widget; :func:`panel` wires widgets to a function that returns a
plotly figure (or anything displayable) and re-renders it when a control changes. The
initial output is rendered at once, so a notebook executed headlessly (papermill) and its HTML
export show the controls and the first figure.
"""
from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["class_picker", "mu_slider", "layer_picker", "index_slider", "panel", "offline_choices", "offline_frames",
           "offline_html", "offline_panel"]


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


def _updatable(obj) -> tuple:
    """(args, kwargs) for ``display``/``DisplayHandle.update`` that keep an output updatable. A
    plotly figure goes as a raw HTML bundle: displayed as itself, plotly publishes it without the
    display id (so an update never reached it), and JupyterLab's plotly renderer ignores updates
    of a shown figure. The HTML draws with the ``window.Plotly`` of ``plots.setup_notebook``."""
    import plotly.graph_objects as go

    if isinstance(obj, go.Figure):
        html = obj.to_html(include_plotlyjs=False, full_html=False, config={"displaylogo": False})
        return ({"text/html": html, "text/plain": f"<Figure: {obj.layout.title.text or ''}>"},), {"raw": True}
    if isinstance(obj, str):  # a sentence (nothing to show) reads as text, not as a quoted repr
        return ({"text/plain": obj},), {"raw": True}
    return (obj,), {}


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
    handles = [display(*args, display_id=True, **kwargs) for args, kwargs in map(_updatable, values())]

    def render(*_):
        for h, r in zip(handles, values()):
            args, kwargs = _updatable(r)
            h.update(*args, **kwargs)

    for c in controls.values():
        c.observe(render, names="value")


# --- the report's stand-in: plotly's own controls over precomputed frames ----------------------
#: Environment variable the report sets for its kernels: :func:`offline_panel` computes and
#: shows its frames only then (a live notebook keeps its ipywidgets and skips the work).
OFFLINE_ENV = "VXNB_OFFLINE_FRAMES"
#: Output metadata key marking an offline panel (the report hides the frozen live controls above it).
OFFLINE_MARK = "vxnb_offline_panel"


def offline_choices(control, n: int = 30) -> list[tuple[str, object]]:
    """The (label, value) states an offline panel offers for ``control``.

    A drop-down: its options. A log slider (μ): ``n`` values spaced evenly in log over its range,
    plus its current value. An integer slider: every value, or ``n`` evenly spaced ones (with its
    current value) when there are more. A list of values or (label, value) pairs, or a dict
    {label: value}: those. A multiple selection cannot be enumerated: pass it in ``fixed``.
    """
    import ipywidgets as w
    import numpy as np

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if isinstance(control, w.SelectMultiple):
        raise TypeError("control: a SelectMultiple has 2^k states; pass its value in fixed= instead")
    if isinstance(control, w.Dropdown):
        return [(str(label), value) for label, value in zip(control._options_labels, control._options_values)]
    if isinstance(control, w.FloatLogSlider):
        lo, hi = control.base ** control.min, control.base ** control.max
        values = sorted(set(np.geomspace(lo, hi, n).tolist()) | {float(control.value)})
        return [(f"{v:.3g}", v) for v in values]
    if isinstance(control, (w.IntSlider, w.FloatSlider)):
        if isinstance(control, w.IntSlider) and control.max - control.min + 1 <= n:
            values = list(range(control.min, control.max + 1))
        else:
            values = np.linspace(control.min, control.max, n).tolist()
            values = sorted(set((round(v) if isinstance(control, w.IntSlider) else v for v in values))
                            | {control.value})
        return [(f"{v:.3g}" if isinstance(v, float) else str(v), v) for v in values]
    if isinstance(control, dict):
        return [(str(k), v) for k, v in control.items()]
    if isinstance(control, (list, tuple, range)):
        if not len(control):
            raise ValueError("control: expected at least one value, got an empty sequence")
        return [(str(v[0]), v[1]) if isinstance(v, tuple) and len(v) == 2 else (str(v), v) for v in control]
    raise TypeError(f"control: expected an ipywidgets Dropdown/slider, a list or a dict, got {type(control).__name__}")


def _as_figure(result, message_title: str | None = None):
    """The figure a panel function returned: its first plotly figure; a sentence (a panel's
    "nothing to show") becomes a figure that says it."""
    import plotly.graph_objects as go

    from .plots import message_figure

    items = result if isinstance(result, tuple) else (result,)
    for r in items:
        if isinstance(r, go.Figure):
            return r
        if isinstance(r, dict) and "data" in r:
            return go.Figure(r)
    for r in items:
        if isinstance(r, str) and r:
            return message_figure(r, message_title)
    raise TypeError(f"fn: expected it to return a plotly Figure or a sentence, got {type(result).__name__}")


def offline_frames(fn: Callable[..., object], *, fixed: dict | None = None, n: int = 30,
                   max_frames: int = 400, progress: bool = True, **controls) -> dict:
    """Every state of ``controls`` evaluated once: ``fn`` is the live panel's own function.

    Returns {"names", "choices" [[(label, value)]], "kinds" ("slider" for sliders and lists of
    numbers, else "menu"), "start" (the widgets' current values), "figures" [plotly JSON dicts, in the order
    of ``itertools.product`` over the choices]}. A state where ``fn`` returns a sentence instead
    of a figure (nothing to show) becomes a figure with that sentence.
    """
    import itertools
    import json

    import plotly.io as pio
    from tqdm.auto import tqdm

    if not controls:
        raise ValueError("controls: expected at least one control or list of values, e.g. cls=class_picker(classes)")
    if fixed is not None and not isinstance(fixed, dict):
        raise TypeError(f"fixed: expected a dict of argument values or None, got {type(fixed).__name__}")
    import ipywidgets as w

    names = list(controls)
    choices = [offline_choices(c, n) for c in controls.values()]
    kinds = ["slider" if isinstance(c, (w.FloatLogSlider, w.IntSlider, w.FloatSlider)) or (
        isinstance(c, (list, tuple, range)) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    for _, v in ch)) else "menu"
             for c, ch in zip(controls.values(), choices)]
    total = 1
    for c in choices:
        total *= len(c)
    if total > max_frames:
        raise ValueError(f"controls: {' × '.join(str(len(c)) for c in choices)} = {total} states exceed "
                         f"max_frames={max_frames}; pass fewer values (lists) or a smaller n")
    figures = []
    for state in tqdm(list(itertools.product(*choices)), desc="offline frames", disable=not progress, leave=False):
        kwargs = {**(fixed or {}), **{k: v for k, (_, v) in zip(names, state)}}
        fig = _as_figure(fn(**kwargs))
        figures.append(json.loads(pio.to_json(fig, validate=False)))
    start = {k: c.value for k, c in controls.items() if isinstance(c, w.ValueWidget)}
    return {"names": names, "choices": choices, "kinds": kinds, "start": start, "figures": figures}


_CONTROL_ROW = 90   # pixels per slider or drop-down row below the figure


def _frame_layout(layout: dict, bottom: int, n_rows: int) -> dict:
    """A frame's layout with room for ``n_rows`` rows of controls below a bottom margin of ``bottom``."""
    layout = dict(layout)
    margin = dict(layout.get("margin") or {})
    old_b = margin.get("b", 40)
    margin["b"] = bottom + _CONTROL_ROW * n_rows
    layout["margin"] = margin
    layout["height"] = (layout.get("height") or 450) + margin["b"] - old_b
    layout.pop("sliders", None), layout.pop("updatemenus", None)
    return layout


def _controls_layout(frames: dict, sliders: Sequence[str], bottom: int) -> tuple[list, list]:
    """plotly sliders (one row each) and drop-downs (one row, opening upwards) below the figure,
    every step a no-op ("skip"): the page's script swaps the whole figure."""
    slider_list, menu_list = [], []
    for name, choice in zip(frames["names"], frames["choices"]):
        if name in sliders:
            slider_list.append(dict(
                active=0, name=name, currentvalue=dict(prefix=f"{name} = "), len=1.0, x=0, y=0, yanchor="top",
                pad=dict(t=bottom + 10 + _CONTROL_ROW * len(slider_list), b=0),
                steps=[dict(label=label, method="skip", args=[None]) for label, _ in choice]))
    for name, choice in zip(frames["names"], frames["choices"]):
        if name not in sliders:
            menu_list.append(dict(
                active=0, type="dropdown", direction="up", x=0.3 * len(menu_list), xanchor="left", y=0,
                yanchor="top", pad=dict(t=bottom + 10 + _CONTROL_ROW * len(slider_list), r=4), showactive=True,
                name=name, buttons=[dict(label=f"{name}: {label}", method="skip", args=[None]) for label, _ in choice]))
    return slider_list, menu_list


_SWAP_SCRIPT = """
(function () {
  var gd = document.getElementById('{plot_id}');
  var F = JSON.parse(document.getElementById('{plot_id}-frames').textContent);
  var state = F.start.slice();
  function index() { var i = 0; for (var d = 0; d < F.sizes.length; d++) { i = i * F.sizes[d] + state[d]; } return i; }
  function show() {
    var fig = F.figures[index()], layout = JSON.parse(JSON.stringify(fig.layout));
    if (F.template && layout.template === undefined) layout.template = F.template;
    layout.sliders = F.sliders.map(function (s, k) { s = JSON.parse(JSON.stringify(s)); s.active = state[F.sliderDims[k]]; return s; });
    layout.updatemenus = F.menus.map(function (m, k) { m = JSON.parse(JSON.stringify(m)); m.active = state[F.menuDims[k]]; return m; });
    gd.setAttribute('data-vxnb-state', state.join(','));
    return Plotly.react(gd, fig.data, layout);
  }
  gd.on('plotly_sliderchange', function (e) {
    var d = F.sliderDims[e.slider._index];
    if (state[d] === e.step._index) return;
    state[d] = e.step._index; setTimeout(show, 0);
  });
  gd.on('plotly_buttonclicked', function (e) {
    var d = F.menuDims[e.menu._index];
    if (state[d] === e.active) return;
    state[d] = e.active; setTimeout(show, 0);
  });
  gd.setAttribute('data-vxnb-state', state.join(','));
  gd.setAttribute('data-vxnb-frames', String(F.figures.length));
})();
"""


def offline_html(frames: dict, *, start: dict | None = None, sliders: Sequence[str] | None = None) -> str:
    """A self-contained HTML fragment: a plotly figure with plotly's own sliders and drop-downs
    that swap between the precomputed ``frames`` (:func:`offline_frames`) in the browser, with
    no kernel and no server. It uses the page's ``window.Plotly`` (``plots.setup_notebook``
    embeds it once per page).

    start: {name: value} of the state shown first (default: each widget's current value, else the
    first state).
    sliders: the names drawn as sliders (default: those whose values are all numbers, except
    booleans); the others are drop-downs.
    """
    import html as _html
    import json
    import re

    import plotly.graph_objects as go
    import plotly.io as pio

    names, choices, figures = frames["names"], frames["choices"], frames["figures"]
    if sliders is None:
        sliders = [nm for nm, kind in zip(names, frames["kinds"]) if kind == "slider"]
    unknown = set(sliders) - set(names)
    if unknown:
        raise ValueError(f"sliders: expected names among {names}, got {sorted(unknown)}")
    state = []
    for nm, ch in zip(names, choices):
        want = {**frames.get("start", {}), **(start or {})}.get(nm, ch[0][1])
        pos = [i for i, (_, v) in enumerate(ch) if v == want or (isinstance(v, float) and isinstance(want, (int, float))
                                                              and abs(v - want) <= 1e-9 * max(1.0, abs(v)))]
        if not pos:
            raise ValueError(f"start: {nm}={want!r} is not one of the states {[v for _, v in ch][:10]}")
        state.append(pos[0])
    slider_dims = [d for d, nm in enumerate(names) if nm in sliders]
    menu_dims = [d for d, nm in enumerate(names) if nm not in sliders]
    bottom = max(int(((f.get("layout") or {}).get("margin") or {}).get("b", 40)) for f in figures)
    rows = len(slider_dims) + (1 if menu_dims else 0)
    figs = [{"data": f.get("data", []), "layout": _frame_layout(f.get("layout") or {}, bottom, rows)}
            for f in figures]
    idx = 0
    for d, s in enumerate(state):
        idx = idx * len(choices[d]) + s
    slider_list, menu_list = _controls_layout(frames, sliders, bottom)
    first = go.Figure(data=figs[idx]["data"], layout=figs[idx]["layout"], skip_invalid=True)
    for k, s in enumerate(slider_list):
        s["active"] = state[slider_dims[k]]
    for k, m in enumerate(menu_list):
        m["active"] = state[menu_dims[k]]
    first.update_layout(sliders=slider_list, updatemenus=menu_list)
    # the template (~7 kB of JSON in every figure plotly makes) is kept once, not once per frame
    template = figs[0]["layout"].get("template") if figs else None
    if template is not None:
        figs = [{"data": f["data"], "layout": {k: v for k, v in f["layout"].items() if k != "template"}}
                if f["layout"].get("template") == template else f for f in figs]
    payload = {"sizes": [len(c) for c in choices], "start": state, "figures": figs, "sliders": slider_list,
               "menus": menu_list, "sliderDims": slider_dims, "menuDims": menu_dims, "template": template}
    div = pio.to_html(first, include_plotlyjs=False, full_html=False, validate=False,
                      post_script=_SWAP_SCRIPT, config={"displaylogo": False})
    plot_id = re.search(r'<div[^>]*\sid="([^"]+)"[^>]*class="plotly-graph-div"|<div[^>]*class="plotly-graph-div"'
                        r'[^>]*\sid="([^"]+)"', div)
    plot_id = plot_id.group(1) or plot_id.group(2)
    data = json.dumps(payload, separators=(",", ":")).replace("</", "<\\/")
    return (f'<div class="vxnb-offline-panel" title="{_html.escape("precomputed frames: no kernel needed")}">'
            f'<script type="application/json" id="{plot_id}-frames">{data}</script>{div}</div>')


def offline_panel(fn: Callable[..., object], *, fixed: dict | None = None, start: dict | None = None,
                  sliders: Sequence[str] | None = None, n: int = 30, max_frames: int = 400,
                  max_mb: float = 6.0, force: bool = False, **controls) -> None:
    """The report's stand-in for a live :func:`panel`: ``fn`` (the live panel's own function)
    evaluated over every state of ``controls`` and shown as one plotly figure whose sliders and
    drop-downs answer in a static page (:func:`offline_frames`, :func:`offline_html`).

    Computed only when the report runs the notebook (environment variable ``VXNB_OFFLINE_FRAMES``,
    set by ``vxnb.report``) or with ``force=True``; in a live notebook it prints one line instead.
    ``fixed``: values of ``fn``'s other arguments; ``start``: the state shown first. It prints
    the number of frames and what they add to the page, with a warning above ``max_mb``.
    """
    import os
    import warnings

    from IPython.display import HTML, display

    if not (force or os.environ.get(OFFLINE_ENV)):
        print("(the HTML report shows a kernel-free version of the panel above here)")
        return None
    frames = offline_frames(fn, fixed=fixed, n=n, max_frames=max_frames, **controls)
    page = offline_html(frames, start=start, sliders=sliders)
    size_mb = len(page.encode("utf-8")) / 2**20
    print(f"offline panel: {len(frames['figures'])} precomputed frames, {size_mb:.2f} MB of the page")
    if size_mb > max_mb:
        warnings.warn(f"offline panel: its {len(frames['figures'])} frames take {size_mb:.1f} MB of the page "
                      f"(max_mb={max_mb}); pass fewer values or a smaller n", RuntimeWarning, stacklevel=2)
    display(HTML(page), metadata={OFFLINE_MARK: True})
    return None
