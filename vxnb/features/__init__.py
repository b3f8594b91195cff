"""Filter-wise responses x_i (Sec. 3.1 of the paper) and the statistics the μ-lasso needs.

For each selected layer the output of every channel is reduced to one number — its L2 norm
over the spatial positions (conv maps (B, C, H, W); FC outputs (B, C) give ``|a|`` per unit) —
the layer's descriptor is L1-normalised per image (a layer whose descriptor is all zero stays
zero) and the layer descriptors are concatenated into ``x_i`` (m entries). Over a dataset of N
images that gives the matrix X (N, m); the μ-lasso ``min ‖X W − L‖²_F s.t. ‖w_j‖₁ ≤ μ`` only
needs ``G = XᵀX`` (m, m) and ``XᵀL`` (m, C), which :func:`extract_features` accumulates while
streaming, so ImageNet-size datasets never need X in memory.

Transformers: a token tensor (B, T, D) gives D features, the L2 norm over the patch tokens
(class and register tokens excluded); channels-last maps (B, H, W, C) give C (:mod:`.hooks`).

The package, one concept per module (imports point down this list):

- :mod:`.extraction` — :func:`extract_features`, the one entry point, and its option objects
  :class:`CacheOptions`, :class:`DistOptions`;
- :mod:`.stream` — the streamed pass (hooks on, G, XᵀL and X batch by batch, the overlap thread);
- :mod:`.cache` — content keys and the cached file (through ``vxnb._store``);
- :mod:`.hooks` — forward hooks and the per-layer descriptors (:func:`descriptors`);
- :mod:`.container` — :class:`Features` and its file;
- :mod:`.loader` — any Dataset/DataLoader as indexed batches, the model on the pass's device;
- :mod:`.layers` — layer selection (:func:`default_layers`), numbering and columns.

G's kernels (the CPU syrk, the CUDA column blocks) live in ``vxnb._gram``.
"""
from .._graph import residual_blocks
from .container import FORMAT_VERSION, Features
from .extraction import CacheOptions, DistOptions, extract_features
from .hooks import descriptors
from .layers import COLUMN_NAMES, default_layers, feature_columns, layer_numbers, select_layers
from .loader import as_loader, on_device, resolve_device, split_batch
from .stream import WORKER_NAME

__all__ = [
    "Features",
    "extract_features",
    "CacheOptions",
    "DistOptions",
    "default_layers",
    "select_layers",
    "residual_blocks",
    "layer_numbers",
    "descriptors",
    "feature_columns",
    "COLUMN_NAMES",
    "FORMAT_VERSION",
    "WORKER_NAME",
    "as_loader",
    "on_device",
    "resolve_device",
    "split_batch",
]
