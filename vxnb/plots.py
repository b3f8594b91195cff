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
    """Render figures natively in JupyterLab and as self-contained HTML in exported pages."""
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"


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
        fig.add_trace(go.Image(z=to_uint8_rgb(img), hoverinfo="skip"), row=i // cols + 1, col=i % cols + 1)
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
