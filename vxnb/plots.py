"""Plotly figures for the notebooks (figures only; computation lives in the other modules).

Call :func:`setup_notebook` once per notebook: figures then render in JupyterLab and, with
plotly's JavaScript embedded once per page, in the offline HTML report.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["setup_notebook", "to_uint8_rgb", "image_grid", "heatmap_overlay", "KIND_COLORS", "curves"]

#: Layer-type colours of the explanation panels (paper, Fig. 6): conv green, FC pink.
KIND_COLORS = {"conv": "#2ca02c", "fc": "#e377c2", "other": "#7f7f7f"}


def setup_notebook() -> None:
    """Render figures natively in JupyterLab and as self-contained HTML in exported pages; in a
    kernel started by the report, progress bars also reach its terminal
    (:func:`vxnb.utils.mirror_progress_to_terminal`)."""
    import plotly.io as pio
    from plotly.offline import init_notebook_mode

    from .utils import mirror_progress_to_terminal

    pio.renderers.default = "plotly_mimetype+notebook"
    mirror_progress_to_terminal()
    # plotly.js now, not at the first figure: HTML figures shown earlier (widgets.panel and
    # offline_panel outputs) draw with window.Plotly, in JupyterLab and in the report pages
    init_notebook_mode(connected=False)


def to_uint8_rgb(image) -> np.ndarray:
    """(C, H, W) or (H, W) float in [0, 1] (tensor or array) → (H, W, 3) uint8."""
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    a = a.astype(np.float32)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def image_grid(images: Sequence, titles: Sequence[str] | None = None, *, cols: int = 6,
               title: str | None = None, size: int = 150, title_colors: Sequence[str] | None = None):
    """A grid of images (each (C, H, W) or (H, W) in [0, 1]) with optional subplot titles."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    n = len(images)
    if n == 0:
        raise ValueError("images: expected at least one image")
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    titles = list(titles) if titles is not None else [""] * n
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.01,
                        vertical_spacing=0.06 if any(titles) else 0.01)
    for i, img in enumerate(images):
        fig.add_trace(_image_trace(to_uint8_rgb(img), hoverinfo="skip"), row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    if title_colors is not None:
        for ann, color in zip(fig.layout.annotations, title_colors):
            ann.font.color = color
    fig.update_layout(title=title, height=rows * size + (60 if title else 20), width=cols * size + 20,
                      margin=dict(l=5, r=5, t=50 if title else 20, b=5))
    return fig


def heatmap_overlay(image, heat, alpha: float = 0.6) -> np.ndarray:
    """Blend a [0, 1] heatmap (H, W) over an image, jet-like colouring → (H, W, 3) in [0, 1]."""
    base = to_uint8_rgb(image).astype(np.float32) / 255
    h = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, dtype=np.float32)
    h = np.clip(h, 0, 1)
    colour = np.stack([np.clip(1.5 - np.abs(4 * h - 3), 0, 1), np.clip(1.5 - np.abs(4 * h - 2), 0, 1),
                       np.clip(1.5 - np.abs(4 * h - 1), 0, 1)], axis=-1)
    w = alpha * h[..., None]
    return (1 - w) * base * 0.8 + w * colour


def curves(frame, x: str, y: str, color: str, *, error: str | None = None, title: str | None = None,
           labels: dict | None = None):
    """A line plot of a tidy DataFrame, one line per ``color`` value, optional error bars."""
    import plotly.express as px

    fig = px.line(frame, x=x, y=y, color=color, error_y=error, markers=True, title=title, labels=labels)
    fig.update_layout(height=420)
    return fig


# ---------------------------------------------------------------------------- explanations (Figs. 1, 2, 6, 7)
__all__ += ["colorize", "explanation_panel", "method_comparison"]


def colorize(heat) -> np.ndarray:
    """A [0, 1] heatmap (H, W) in the jet-like colours of :func:`heatmap_overlay` → (H, W, 3) in [0, 1]."""
    h = heat.detach().cpu().numpy() if isinstance(heat, torch.Tensor) else np.asarray(heat, dtype=np.float32)
    if h.ndim != 2:
        raise ValueError(f"heat: expected a (H, W) map, got shape {h.shape}")
    h = np.clip(h.astype(np.float32), 0, 1)
    return np.stack([np.clip(1.5 - np.abs(4 * h - 3), 0, 1), np.clip(1.5 - np.abs(4 * h - 2), 0, 1),
                     np.clip(1.5 - np.abs(4 * h - 1), 0, 1)], axis=-1)


def _hwc(a) -> np.ndarray:
    """(H, W, 3) float in [0, 1] → uint8."""
    return (np.clip(np.asarray(a, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)


def _image_trace(z: np.ndarray, **kwargs):
    """A go.Image of an (H, W, 3) uint8 array, embedded as PNG (far smaller than a pixel array)."""
    import plotly.graph_objects as go

    return go.Image(source=_png_source(z), **kwargs)


def explanation_panel(image, explanation, classes: Sequence[str] | None = None, *, mode: str = "overlay",
                      show_combined: bool = False, size: int = 150, alpha: float = 0.6):
    """The paper's explanation panel (Figs. 1, 6): the image with its predicted label, then one
    heatmap per top feature, titled ``layer n · ch q`` in the colour of the layer type
    (:data:`KIND_COLORS`: convolutional green, fully connected pink); hovering a heatmap shows
    layer, channel, weight and response.

    image: (C, H, W) in [0, 1]; explanation: a ``vxnb.explanations.Explanation``; classes: class
    names (default: the explanation's). mode: ``"overlay"`` (heatmap over the image),
    ``"heatmap"`` (the heatmap alone) or ``"rgb"`` (the signed DeconvNet visualisation).
    show_combined: add the combined map as a last panel. Without features the panel shows
    the image and the explanation's message.
    """
    from plotly.subplots import make_subplots

    if mode not in ("overlay", "heatmap", "rgb"):
        raise ValueError(f"mode: expected 'overlay', 'heatmap' or 'rgb', got {mode!r}")
    for attr in ("features", "heatmaps", "rgb", "combined", "predicted", "target", "probabilities"):
        if not hasattr(explanation, attr):
            raise TypeError(f"explanation: expected a vxnb.explanations.Explanation, got {type(explanation).__name__}")
    names = list(classes) if classes is not None else list(getattr(explanation, "classes", []) or [])
    name = lambda j: names[j] if j < len(names) else str(j)  # noqa: E731
    feats = explanation.features
    k = len(feats)
    p = float(explanation.probabilities[explanation.predicted])
    head = f"<b>{name(explanation.predicted)}</b> ({p:.0%})"
    if explanation.target != explanation.predicted:
        head += f"<br>explaining {name(explanation.target)}"
    titles = [head] + [f"layer {int(r.layer_number)} · ch {int(r.channel)}" for r in feats.itertuples()]
    colors = ["#000000"] + [KIND_COLORS.get(str(kd), KIND_COLORS["other"]) for kd in feats["kind"]]
    if show_combined and k:
        titles.append("combined")
        colors.append("#000000")
    n = len(titles)
    fig = make_subplots(rows=1, cols=n, subplot_titles=titles, horizontal_spacing=0.01)
    fig.add_trace(_image_trace(to_uint8_rgb(image), hovertemplate=f"predicted {name(explanation.predicted)}"
                           f"<br>p = {p:.3f}<extra></extra>"), row=1, col=1)
    for i, r in enumerate(feats.itertuples()):
        h = explanation.heatmaps[i]
        if mode == "overlay":
            z = _hwc(heatmap_overlay(image, h, alpha))
        elif mode == "heatmap":
            z = _hwc(colorize(h))
        else:
            z = to_uint8_rgb(explanation.rgb[i])
        hover = (f"{r.layer} (layer {int(r.layer_number)}, {r.kind})<br>channel {int(r.channel)}"
                 f"<br>weight {float(r.weight):.4g}<br>response {float(r.response):.4g}<extra></extra>")
        fig.add_trace(_image_trace(z, hovertemplate=hover), row=1, col=i + 2)
    if show_combined and k:
        z = _hwc(heatmap_overlay(image, explanation.combined, alpha) if mode == "overlay"
                 else colorize(explanation.combined))
        fig.add_trace(_image_trace(z, hovertemplate="response-weighted sum of the heatmaps<extra></extra>"),
                      row=1, col=n)
    for ann, color in zip(fig.layout.annotations, colors):
        ann.font.color = color
        ann.font.size = 12
    bottom = 10
    if k == 0:
        msg = getattr(explanation, "message", None) or "no relevant feature responds"
        fig.add_annotation(text=msg, xref="paper", yref="paper", x=0, y=-0.02, xanchor="left", yanchor="top",
                           showarrow=False, font=dict(size=11, color="#555"), align="left")
        bottom = 40
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    fig.update_layout(height=size + 60 + bottom, width=max(n * size, 300 if k == 0 else 0) + 20,
                      margin=dict(l=5, r=5, t=50, b=bottom))
    return fig


def method_comparison(comparison, *, mode: str = "heatmap", size: int = 140, transpose: bool = False,
                      alpha: float = 0.6):
    """The visual-quality comparison (Figs. 2, 7) of a ``vxnb.explanations.Comparison``.

    One row per method ("upsampled activation", "Deconv+GB", "ours (resampled)"), one column
    per (layer, channel) (e.g. low / high / FC), after a first column with the image. Column
    titles give the layer number and channel in the colour of the layer type; each map shows
    its grid-artifact score below it (and on hover); a method that does not apply (activation
    maps at FC layers) shows "not applicable". ``transpose=True`` puts methods in columns.
    mode: ``"heatmap"`` (jet colours) or ``"overlay"`` (over the image).
    """
    from plotly.subplots import make_subplots

    if mode not in ("heatmap", "overlay"):
        raise ValueError(f"mode: expected 'heatmap' or 'overlay', got {mode!r}")
    for attr in ("image", "features", "methods", "maps", "scores"):
        if not hasattr(comparison, attr):
            raise TypeError(f"comparison: expected a vxnb.explanations.Comparison, got {type(comparison).__name__}")
    methods = list(comparison.methods)
    feats = comparison.features.reset_index(drop=True)
    col_titles = ["image"] + [f"{r.column}: layer {int(r.layer_number)} · ch {int(r.channel)}"
                              for r in feats.itertuples()]
    col_colors = ["#000000"] + [KIND_COLORS.get(str(kd), KIND_COLORS["other"]) for kd in feats["kind"]]
    n_m, n_f = len(methods), len(feats)
    rows, cols = (n_f + 1, n_m) if transpose else (n_m, n_f + 1)
    if transpose:
        fig = make_subplots(rows=rows, cols=cols, column_titles=methods, row_titles=col_titles,
                            horizontal_spacing=0.01, vertical_spacing=0.04)
        title_colors = ["#000000"] * n_m + col_colors
    else:
        fig = make_subplots(rows=rows, cols=cols, column_titles=col_titles, row_titles=methods,
                            horizontal_spacing=0.01, vertical_spacing=0.04)
        title_colors = col_colors + ["#000000"] * n_m
    for ann, color in zip(fig.layout.annotations, title_colors):
        ann.font.color = color
        ann.font.size = 12
    cell = (lambda mi, fi: (fi + 1, mi + 1)) if transpose else (lambda mi, fi: (mi + 1, fi + 1))
    fig.add_trace(_image_trace(to_uint8_rgb(comparison.image), hoverinfo="skip"), row=1, col=1)
    scores = comparison.scores
    for mi, m in enumerate(methods):
        for fi, f in enumerate(feats.itertuples()):
            r, c = cell(mi, fi + 1)
            h = comparison.maps[m][fi]
            axis = (r - 1) * cols + c
            ref = "" if axis == 1 else str(axis)
            if h is None:
                fig.add_trace(_image_trace(np.full((*comparison.image.shape[-2:], 3), 245, np.uint8),
                                       hoverinfo="skip"), row=r, col=c)
                fig.add_annotation(text="not applicable", xref=f"x{ref} domain", yref=f"y{ref} domain", x=0.5,
                                   y=0.5, showarrow=False, font=dict(size=11, color="#777"))
                continue
            sel = scores[(scores["method"] == m) & (scores["column"] == f.column)]
            g = float(sel["grid_score"].iloc[0]) if len(sel) else float("nan")
            z = heatmap_overlay(comparison.image, h, alpha) if mode == "overlay" else colorize(h)
            fig.add_trace(_image_trace(_hwc(z), hovertemplate=f"{m}<br>{f.layer} channel {int(f.channel)}"
                                   f"<br>grid score {g:.3f}<extra></extra>"), row=r, col=c)
            fig.add_annotation(text=f"grid {g:.3f}", xref=f"x{ref} domain", yref=f"y{ref} domain", x=0.5, y=0,
                               yanchor="top", showarrow=False, font=dict(size=10, color="#333"))
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    fig.update_layout(height=rows * (size + 18) + 50, width=cols * size + 60, margin=dict(l=5, r=40, t=40, b=15))
    return fig


# ---------------------------------------------------------------------------- interpretation (Fig. 5, supp. Figs. 12-14)
__all__ += ["average_image_grid", "average_image_overview", "layer_composition", "mask_overlap_bars"]

#: Titles of the tiles of :func:`average_image_grid`.
AVERAGE_LABELS = {"image": "average image", "ours": "ours", "deconv": "Deconv+GB", "activation": "upsampled act."}


def _png_source(z: np.ndarray) -> str:
    """(H, W, 3) uint8 → a PNG data URI (a page holds it far more compactly than a JSON pixel array)."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(z, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _scaled(a) -> np.ndarray:
    """Min-max scale a map to [0, 1] for display (a constant map becomes 0)."""
    a = np.asarray(a, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _check_averages(average_images) -> None:
    for attr in ("items", "summary", "messages", "for_class"):
        if not hasattr(average_images, attr):
            raise TypeError("average_images: expected the AverageImages of vxnb.averages.average_images, "
                            f"got {type(average_images).__name__}")


def _layer_numbers(average_images) -> dict:
    """{(class, feature): layer_number} from the AverageImages summary (when it has them)."""
    s = average_images.summary
    if s is None or len(s) == 0 or "layer_number" not in s.columns:
        return {}
    return {(c, f): ln for c, f, ln in zip(s["class"], s["feature"], s["layer_number"])}


def _class_name(klass, classes) -> str:
    if classes is not None and isinstance(klass, (int, np.integer)) and 0 <= int(klass) < len(classes):
        return str(classes[int(klass)])
    return str(klass)


def _layer_label(item, numbers: dict) -> str:
    """"layer n · kind", with " (−)" for a negative weight (evidence against the class)."""
    ln = numbers.get((item.klass, item.feature))
    sign = " (−)" if float(item.weight) < 0 else ""
    if ln is None or (isinstance(ln, float) and np.isnan(ln)):
        return f"{item.layer} · {item.kind}{sign}"
    return f"layer {int(ln)} · {item.kind}{sign}"


def _message_figure(text: str, title: str | None = None):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0, y=0.5, xanchor="left", showarrow=False,
                       font=dict(size=13, color="#555"))
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    fig.update_layout(title=title, height=140 if title else 100, width=700, margin=dict(l=10, r=10, t=40 if title else 10, b=10),
                      plot_bgcolor="white")
    return fig


__all__ += ["message_figure"]


def message_figure(text: str, title: str | None = None):
    """A figure that says ``text`` (a panel state with nothing to show), never an empty plot."""
    return _message_figure(text, title)


def average_image_grid(average_images, klass, *, classes: Sequence[str] | None = None,
                       methods: Sequence[str] = ("image", "ours", "deconv", "activation"), per_row: int = 2,
                       size: int = 100, max_features: int | None = None, title: str | None = None):
    """The average images of one class's relevant features, most relevant first (supp. Figs. 12-14).

    For each feature a group of tiles: the average image of its top crops, then (as in the
    supplementary figures) the averages over the same crops of our resampled DeconvNet+GB
    heatmaps ("ours"), plain Deconv+GB heatmaps and upsampled activation maps, each min-max
    scaled for display and coloured like :func:`colorize`. Features are sorted by weight
    (descending) and laid out ``per_row`` groups to a row. The first tile's title gives the
    rank, layer number and type, coloured as in the explanation panels (:data:`KIND_COLORS`:
    conv green, FC pink), and "(−)" for a negative weight (evidence against the class);
    hovering any tile shows layer, channel, weight, crops and field.
    FC features have no activation map: their tile says "n/a", and so does the figure title.

    average_images: a ``vxnb.averages.AverageImages``; klass: the class key used in it (e.g.
    the class index); classes: class names for the title. methods: which tiles, a subset of
    :data:`AVERAGE_LABELS` in any order; maps that were not computed are shown as "n/a".
    max_features: show only the first ones. A class without items gives a figure with the
    reason (the AverageImages message when there is one).
    """
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    _check_averages(average_images)
    methods = [methods] if isinstance(methods, str) else list(methods)
    bad = [m for m in methods if m not in AVERAGE_LABELS]
    if bad or not methods:
        raise ValueError(f"methods: expected a non-empty subset of {tuple(AVERAGE_LABELS)}, got {methods!r}")
    if not isinstance(per_row, (int, np.integer)) or isinstance(per_row, bool) or per_row < 1:
        raise ValueError(f"per_row: expected a positive int, got {per_row!r}")
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 16:
        raise ValueError(f"size: expected an int >= 16 (pixels per tile), got {size!r}")
    if max_features is not None and (not isinstance(max_features, (int, np.integer)) or max_features < 1):
        raise ValueError(f"max_features: expected a positive int or None, got {max_features!r}")
    name = _class_name(klass, classes)
    items = sorted(average_images.for_class(klass), key=lambda it: -float(it.weight))
    total = len(items)
    if max_features is not None:
        items = items[:max_features]
    if not items:
        notes = [m for m in average_images.messages if m.startswith(f"class {klass!r} ")]
        return _message_figure(notes[0] if notes else f"class {name}: no relevant feature (nothing to average)",
                               title or f"class {name}")
    numbers = _layer_numbers(average_images)
    k = len(methods)
    n = len(items)
    per_row = min(int(per_row), n)
    rows = -(-n // per_row)
    cols = per_row * k + per_row - 1                     # a narrow spacer column between groups
    widths = ([1.0] * k + [0.25]) * per_row
    widths = widths[:cols]
    title_px, gap_px = 20, 3
    plot_w = size * sum(widths) + (cols - 1) * gap_px
    plot_h = rows * size + (rows - 1) * title_px
    fig = make_subplots(rows=rows, cols=cols, column_widths=widths, horizontal_spacing=gap_px / plot_w,
                        vertical_spacing=title_px / plot_h if rows > 1 else 0.0)
    any_na = False
    for i, item in enumerate(items):
        r, g = divmod(i, per_row)
        color = KIND_COLORS.get(str(item.kind), KIND_COLORS["other"])
        field = "whole image" if item.rf.whole_image else f"{item.rf.size[0]}×{item.rf.size[1]} px"
        info = (f"{item.layer} ({_layer_label(item, numbers)})<br>channel {item.channel}<br>weight {item.weight:.4g}"
                f"<br>{item.n} crops, field {field}")
        for j, m in enumerate(methods):
            c = g * (k + 1) + j + 1
            axis = r * cols + c
            ref = "" if axis == 1 else str(axis)
            data = getattr(item, m)
            if data is None:
                z = np.full((size, size, 3), 240, np.uint8)
                any_na = any_na or m == "activation"
                why = "FC: no activation map" if (m == "activation" and item.rf.whole_image) else "not computed"
                fig.add_trace(go.Image(source=_png_source(z), hovertemplate=f"{AVERAGE_LABELS[m]}: n/a ({why})<br>{info}<extra></extra>"),
                              row=r + 1, col=c)
                fig.add_annotation(text="n/a", xref=f"x{ref} domain", yref=f"y{ref} domain", x=0.5, y=0.5,
                                   showarrow=False, font=dict(size=12, color="#888"))
            else:
                z = to_uint8_rgb(data) if m == "image" else _hwc(colorize(_scaled(data)))
                fig.add_trace(go.Image(source=_png_source(z), hovertemplate=f"{AVERAGE_LABELS[m]}<br>{info}<extra></extra>"),
                              row=r + 1, col=c)
            if j == 0:
                text, font = f"<b>#{i + 1}</b> {_layer_label(item, numbers)}", dict(size=11, color=color)
            else:
                text, font = AVERAGE_LABELS[m], dict(size=10, color="#555")
            fig.add_annotation(text=text, xref=f"x{ref} domain", yref=f"y{ref} domain", x=0.5, y=1.0,
                               yanchor="bottom", showarrow=False, font=font)
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    head = title or f"class {name}: {total} relevant feature{'s' if total != 1 else ''}, by weight"
    if n < total:
        head += f" (first {n})"
    if any_na:
        head += "<br><sup>n/a: FC features have no activation map to upsample</sup>"
    top_px = 60 + (15 if any_na else 0)
    fig.update_layout(title=dict(text=head, font=dict(size=14)), height=int(plot_h) + top_px + 5,
                      width=int(plot_w) + 10, margin=dict(l=5, r=5, t=top_px, b=5), plot_bgcolor="white")
    return fig


def average_image_overview(average_images, classes: Sequence[str] | None = None, *, top: int = 4,
                           size: int = 90, class_keys: Sequence | None = None, title: str | None = None):
    """Paper Fig. 5: for every class (a row) the average images of its ``top`` most relevant
    features, each titled with its layer number and type in the colour of the type
    (:data:`KIND_COLORS`); hover gives layer, channel and weight. A class without relevant
    feature shows "no relevant feature" in its row.

    classes: class names (row labels); class_keys: the class keys of ``average_images`` in row
    order (default: ``range(len(classes))`` when classes are given, else the keys in it).
    """
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    _check_averages(average_images)
    if not isinstance(top, (int, np.integer)) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top: expected a positive int, got {top!r}")
    if class_keys is None:
        class_keys = list(range(len(classes))) if classes is not None else \
            list(dict.fromkeys(c for c, _ in average_images.items))
    class_keys = list(class_keys)
    if not class_keys:
        return _message_figure("no class to show: the average images are empty", title)
    numbers = _layer_numbers(average_images)
    rows = len(class_keys)
    plot_w = int(top) * size + (int(top) - 1) * 4
    plot_h = rows * size + (rows - 1) * 20
    fig = make_subplots(rows=rows, cols=int(top), horizontal_spacing=4 / plot_w if top > 1 else 0.0,
                        vertical_spacing=20 / plot_h if rows > 1 else 0.0)
    for r, klass in enumerate(class_keys):
        items = sorted(average_images.for_class(klass), key=lambda it: -float(it.weight))[:top]
        first = "" if r * top == 0 else str(r * top + 1)
        fig.add_annotation(text=f"<b>{_class_name(klass, classes)}</b>", xref=f"x{first} domain",
                           yref=f"y{first} domain", x=-0.05, y=0.5, xanchor="right", showarrow=False,
                           font=dict(size=12))
        if not items:
            fig.add_annotation(text="no relevant feature", xref=f"x{first} domain", yref=f"y{first} domain",
                               x=0, y=0.5, xanchor="left", showarrow=False, font=dict(size=11, color="#888"))
        for c, item in enumerate(items):
            axis = r * top + c + 1
            ref = "" if axis == 1 else str(axis)
            hover = (f"{item.layer} ({_layer_label(item, numbers)})<br>channel {item.channel}"
                     f"<br>weight {item.weight:.4g}<br>{item.n} crops<extra></extra>")
            fig.add_trace(go.Image(source=_png_source(to_uint8_rgb(item.image)), hovertemplate=hover), row=r + 1, col=c + 1)
            fig.add_annotation(text=_layer_label(item, numbers), xref=f"x{ref} domain", yref=f"y{ref} domain",
                               x=0.5, y=1.0, yanchor="bottom", showarrow=False,
                               font=dict(size=10, color=KIND_COLORS.get(str(item.kind), KIND_COLORS["other"])))
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    fig.update_layout(title=title or f"average images of the {top} most relevant features per class",
                      height=plot_h + 55, width=plot_w + 125, margin=dict(l=120, r=5, t=50, b=5),
                      plot_bgcolor="white")
    return fig


def _shades(base_light: str, base_dark: str, n: int) -> list[str]:
    """n colours from light to dark between two hex colours."""
    a = np.array([int(base_light[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)
    b = np.array([int(base_dark[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)
    ts = [0.5] if n == 1 else np.linspace(0, 1, n)
    return ["#" + "".join(f"{int(round(v)):02x}" for v in a + t * (b - a)) for t in ts]


#: Light-to-dark ranges of the layer shades in :func:`layer_composition` (around KIND_COLORS).
KIND_SHADES = {"conv": ("#b7e4b0", "#145a14"), "fc": ("#f7c6e6", "#8e1a6b"), "other": ("#d9d9d9", "#4d4d4d")}


def layer_composition(relevant, classes: Sequence[str] | None = None, *, title: str | None = None):
    """A stacked bar per class: how many of its relevant features come from each layer.

    relevant: ``vxnb.relevance.relevant_features`` rows (class, layer, layer_number, kind, ...).
    classes: the class names; with integer class ids every class is on the axis, also those
    without any relevant feature (marked "none"). Each layer is a segment, in a shade of its
    type's colour (conv greens, FC pinks; deeper layers darker), in layer order.
    """
    import pandas as pd
    import plotly.graph_objects as go

    if not isinstance(relevant, pd.DataFrame):
        raise TypeError(f"relevant: expected the DataFrame of vxnb.relevance.relevant_features, got "
                        f"{type(relevant).__name__}")
    missing = [c for c in ("class", "layer", "layer_number", "kind") if c not in relevant.columns]
    if missing:
        raise ValueError(f"relevant: missing column(s) {missing}; expected class, layer, layer_number, kind")
    ids = list(range(len(classes))) if classes is not None else list(dict.fromkeys(relevant["class"].tolist()))
    if classes is not None and len(relevant) and not relevant["class"].isin(ids).all():
        raise ValueError(f"relevant: class ids {sorted(set(relevant['class']) - set(ids))} are not indices of "
                         f"the {len(classes)} classes given")
    names = [_class_name(c, classes) if classes is not None else
             str(relevant.loc[relevant["class"] == c, "class_name"].iloc[0]) if "class_name" in relevant.columns
             else str(c) for c in ids]
    layers = (relevant[["layer", "layer_number", "kind"]].drop_duplicates("layer")
              .sort_values(["layer_number", "layer"], kind="mergesort"))
    colors: dict = {}
    for kind, group in layers.groupby("kind", sort=False):
        light, dark = KIND_SHADES.get(str(kind), KIND_SHADES["other"])
        colors.update(zip(group["layer"], _shades(light, dark, len(group))))
    counts = relevant.groupby(["layer", "class"]).size()
    fig = go.Figure()
    for lay in layers.itertuples(index=False):
        y = [int(counts.get((lay.layer, c), 0)) for c in ids]
        fig.add_trace(go.Bar(x=names, y=y, name=f"layer {int(lay.layer_number)} · {lay.kind} ({lay.layer})",
                             marker_color=colors[lay.layer],
                             hovertemplate=f"%{{x}}<br>{lay.layer} (layer {int(lay.layer_number)}, {lay.kind})"
                                           "<br>%{y} feature(s)<extra></extra>"))
    totals = relevant.groupby("class").size()
    for c, nm in zip(ids, names):
        if int(totals.get(c, 0)) == 0:
            fig.add_annotation(x=nm, y=0, text="none", showarrow=False, yanchor="bottom",
                               font=dict(color="#888"))
    fig.update_layout(barmode="stack", title=title or "relevant features per class, by layer",
                      xaxis=dict(title="class", categoryorder="array", categoryarray=names),
                      yaxis_title="relevant features", legend_title_text="layer", height=420,
                      width=max(520, 90 * len(names) + 260))
    return fig


def mask_overlap_bars(overlap, *, title: str | None = None):
    """Per class: where the crops behind the average images fall relative to the mask.

    overlap: ``vxnb.averages.mask_overlap(..., per="class")``. Bars: the fraction of crop
    centres on the mask, the mean fraction of each crop box on the mask, and the chance level
    (the fraction of the image on the mask); the fraction of boxes touching the mask at all is
    in the hover text.
    """
    import pandas as pd
    import plotly.graph_objects as go

    if not isinstance(overlap, pd.DataFrame):
        raise TypeError(f"overlap: expected the DataFrame of vxnb.averages.mask_overlap(per='class'), got "
                        f"{type(overlap).__name__}")
    need = ["class_name", "overlap", "box_on_mask", "center_on_mask", "chance"]
    missing = [c for c in need if c not in overlap.columns]
    if missing:
        raise ValueError(f"overlap: missing column(s) {missing}; expected mask_overlap(..., per='class')")
    names = [str(c) for c in overlap["class_name"]]
    fig = go.Figure()
    series = [("center_on_mask", "crop centre on the mask", "#2ca02c"),
              ("box_on_mask", "crop box on the mask (fraction)", "#98df8a"),
              ("chance", "chance (image on the mask)", "#bbbbbb")]
    touch = overlap["overlap"].to_numpy(dtype=float)
    for col, label, color in series:
        fig.add_trace(go.Bar(x=names, y=overlap[col].to_numpy(dtype=float), name=label, marker_color=color,
                             customdata=touch,
                             hovertemplate=f"%{{x}}<br>{label}: %{{y:.2f}}<br>boxes touching the mask: "
                                           "%{customdata:.2f}<extra></extra>"))
    fig.update_layout(barmode="group", title=title or "do the relevant features look at the class part?",
                      yaxis=dict(title="fraction", range=[0, 1.05]), xaxis_title="class", height=400,
                      width=max(520, 110 * len(names) + 260))
    return fig


# ---------------------------------------------------------------------------- an8Flower benchmark (Table 1, Fig. 8)
__all__ += ["benchmark_iou_curves", "benchmark_occlusion_curves", "benchmark_examples"]


def benchmark_iou_curves(frame, *, title: str | None = "IoU vs threshold (mean over folds)"):
    """IoU curves of the benchmark (``BenchmarkResult.mean_curves()``: variant, label, threshold,
    iou): one line per method, one panel per variant."""
    import plotly.express as px

    facet = "variant" if frame["variant"].nunique() > 1 else None
    fig = px.line(frame, x="threshold", y="iou", color="label", facet_col=facet, title=title,
                  labels={"threshold": "threshold on the normalised heatmap", "iou": "mean IoU", "label": "method"})
    fig.update_layout(height=420, width=None if facet else 760)
    return fig


def benchmark_occlusion_curves(frame, *, title: str | None = "Box occlusion: confidence of the predicted class"):
    """Box-occlusion curves (``BenchmarkResult.occlusion_curves()``: variant, label, coverage,
    confidence): confidence vs the fraction of the image covered, one line per method."""
    import plotly.express as px

    frame = frame.assign(covered=100 * frame["coverage"])
    facet = "variant" if frame["variant"].nunique() > 1 else None
    fig = px.line(frame, x="covered", y="confidence", color="label", facet_col=facet, markers=True, title=title,
                  labels={"covered": "image covered (%)", "confidence": "softmax confidence", "label": "method"})
    fig.update_layout(height=420, width=None if facet else 760)
    return fig


def benchmark_examples(examples: dict, method_labels: dict | None = None, *, size: int = 110):
    """Fig. 8 (centre): per image (row) the image, its ground-truth mask and every method's heatmap
    (min-max normalised per map, jet colours), each embedded as PNG. ``examples``: the dict of
    ``vxnb.studies.benchmark.explain_examples`` (images, masks, labels, preds, classes, heatmaps)."""
    from plotly.subplots import make_subplots

    images, masks, heat = examples["images"], examples["masks"], examples["heatmaps"]
    methods = list(heat)
    labels = method_labels or {}
    classes = examples.get("classes")
    n, cols = len(images), 2 + len(methods)
    titles = ["image", "ground truth"] + [labels.get(m, m) for m in methods]
    fig = make_subplots(rows=n, cols=cols, column_titles=titles, horizontal_spacing=0.005, vertical_spacing=0.01)
    for i in range(n):
        true, pred = int(examples["labels"][i]), int(examples["preds"][i])
        name = (lambda j: classes[j] if classes else str(j))
        hover = f"true {name(true)}<br>predicted {name(pred)}<extra></extra>"
        fig.add_trace(_image_trace(to_uint8_rgb(images[i]), hovertemplate=hover), row=i + 1, col=1)
        fig.add_trace(_image_trace(to_uint8_rgb(masks[i].float()), hoverinfo="skip"), row=i + 1, col=2)
        for c, m in enumerate(methods):
            h = heat[m][i].detach().cpu().double().numpy() if isinstance(heat[m], torch.Tensor) \
                else np.asarray(heat[m][i], dtype=np.float64)
            span = h.max() - h.min()
            h = (h - h.min()) / span if span > 0 else np.zeros_like(h)
            fig.add_trace(_image_trace((colorize(h) * 255).round().astype(np.uint8),
                                       hovertemplate=f"{labels.get(m, m)}<br>{hover}"), row=i + 1, col=c + 3)
    for ann in fig.layout.annotations:
        ann.font.size = 11
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    fig.update_layout(height=n * size + 50, width=cols * size + 20, margin=dict(l=5, r=5, t=40, b=5))
    return fig


# ---------------------------------------------------------------------------- sanity checks (Sec. 4.4, Fig. 9)
__all__ += ["sanity_class_panel", "sanity_sensitivity_bars", "randomization_curves"]


def sanity_class_panel(image, maps: dict, row_labels: Sequence[str], *, subtitles: dict | None = None,
                       size: int = 130, title: str | None = None):
    """Fig. 9: one image explained for several classes (rows) by several methods (columns).

    image: (C, H, W) in [0, 1]; maps: ``{method: (R, H, W) maps in [0, 1]}`` (e.g.
    ``vxnb.studies.sanity_study.explain_classes``), row r explaining class ``row_labels[r]``;
    subtitles: optional ``{method: text}`` shown under the method's name (e.g. the similarity
    of its rows)."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    methods = list(maps)
    if not methods:
        raise ValueError("maps: expected at least one method")
    rows = len(row_labels)
    for m in methods:
        if len(maps[m]) != rows:
            raise ValueError(f"maps[{m!r}]: expected {rows} maps (one per row label), got {len(maps[m])}")
    subtitles = subtitles or {}
    titles = ["image"] + [f"{m}<br><sub>{subtitles[m]}</sub>" if m in subtitles else m for m in methods]
    cols = 1 + len(methods)
    fig = make_subplots(rows=rows, cols=cols, column_titles=titles, row_titles=list(row_labels),
                        horizontal_spacing=0.008, vertical_spacing=0.02)
    base = to_uint8_rgb(image)
    for r in range(rows):
        fig.add_trace(_image_trace(base, hoverinfo="skip"), row=r + 1, col=1)
        for c, m in enumerate(methods):
            h = maps[m][r]
            h = h.detach().cpu().numpy() if isinstance(h, torch.Tensor) else np.asarray(h)
            fig.add_trace(_image_trace(_hwc(colorize(_scaled(h))), hoverinfo="skip"), row=r + 1, col=c + 2)
    for ann in fig.layout.annotations:
        ann.font.size = 11
    fig.update_xaxes(visible=False).update_yaxes(visible=False)
    top = 70 if title else 50
    fig.update_layout(title=title, height=rows * size + top + 10, width=cols * size + 60,
                      margin=dict(l=5, r=40, t=top, b=5))
    return fig


def sanity_sensitivity_bars(summary, *, metrics: Sequence[str] = ("spearman", "ssim"), title: str | None = None):
    """Class sensitivity per method: mean similarity of the predicted class's explanation to the
    runner-up's and a random class's (bars, ± std), one panel per metric (and row per
    ``dataset`` when the table has several). 1 = the explanation ignores the class."""
    import pandas as pd
    import plotly.express as px

    long = pd.concat([summary.assign(metric=m, value=summary[m], std=summary[f"{m}_std"]) for m in metrics],
                     ignore_index=True)
    row = "dataset" if "dataset" in long.columns and long["dataset"].nunique() > 1 else None
    fig = px.bar(long, x="method", y="value", color="comparison", error_y="std", barmode="group",
                 facet_col="metric", facet_row=row, title=title or "class sensitivity: similarity to the "
                 "explanation of another class (lower = more class-sensitive)",
                 labels={"value": "similarity", "method": ""})
    fig.update_yaxes(range=[min(0.0, float(long["value"].min()) - 0.05), 1.05])
    fig.update_layout(height=360 * (long[row].nunique() if row else 1) + 60)
    return fig


def randomization_curves(summary, *, metrics: Sequence[str] = ("spearman", "ssim"), title: str | None = None):
    """Cascading randomisation (Adebayo et al.): similarity to the trained model's explanation vs
    the layers randomised (top first), one line per method, one row per metric and
    one column per ``dataset`` (when the table has that column). The first point ("trained") is
    the unmodified model (similarity 1). ``summary``: ``SanityResult.randomization_summary()``
    (method, step, layer, the metrics and their ``_std``)."""
    import pandas as pd
    import plotly.colors as pc
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    frame = summary.copy()
    if "dataset" not in frame.columns:
        frame["dataset"] = ""
    datasets = list(dict.fromkeys(frame["dataset"]))
    methods = list(dict.fromkeys(frame["method"]))
    colors = {m: pc.qualitative.Plotly[i % 10] for i, m in enumerate(methods)}
    titles = [f"{d}<br>{m}" if d else m for m in metrics for d in datasets]
    fig = make_subplots(rows=len(metrics), cols=len(datasets), subplot_titles=titles, shared_yaxes=True,
                        vertical_spacing=0.22 / max(1, len(metrics) - 1) if len(metrics) > 1 else 0.1,
                        horizontal_spacing=0.06)
    for c, d in enumerate(datasets, 1):
        part = frame[frame["dataset"] == d]
        layers = part.drop_duplicates("step").sort_values("step")
        ticks = ["trained"] + [f"→ {l}" for l in layers["layer"]]
        steps = [0] + layers["step"].tolist()
        for r, metric in enumerate(metrics, 1):
            for m in methods:
                g = part[part["method"] == m].sort_values("step")
                if g.empty:
                    continue
                y = np.r_[1.0, g[metric].to_numpy(dtype=float)]
                hover = [f"{m}<br>{t}<br>{metric} = {v:.3f}<extra></extra>" for t, v in zip(ticks, y)]
                fig.add_trace(go.Scatter(x=steps, y=y, mode="lines+markers", name=m, legendgroup=m,
                                         line=dict(color=colors[m]), showlegend=(r == 1 and c == 1),
                                         hovertemplate=hover), row=r, col=c)
            fig.update_xaxes(tickmode="array", tickvals=steps, ticktext=ticks, tickangle=-45, row=r, col=c)
        fig.update_xaxes(title_text="layers randomised (from the top)", row=len(metrics), col=c)
    for r, metric in enumerate(metrics, 1):
        fig.update_yaxes(title_text=metric, row=r, col=1)
    lo = min([-0.05] + [float(np.nanmin(frame[m])) - 0.05 for m in metrics if frame[m].notna().any()])
    fig.update_yaxes(range=[lo, 1.05])
    fig.update_layout(title=title or "cascading randomisation: similarity to the trained model's explanation",
                      height=300 * len(metrics) + 140, width=max(560, 430 * len(datasets) + 160),
                      legend_title_text="method")
    return fig
