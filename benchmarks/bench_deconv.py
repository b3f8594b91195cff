"""Benchmark of vxnb.deconv: speed against Captum, and the grid artifact (plain vs resampled).

    python benchmarks/bench_deconv.py [--quick] [--repeats N] [--figure PATH] [--threads N] [--profile [--model M]]

1. Speed: the top-5 filters (largest activation-map L2 norm) of one 224x224 image at a layer
   of a random-init torchvision network, as resampled heatmaps, against Captum's
   ``NeuronGuidedBackprop`` (one call per filter, seeded by 0.5 ||a_q||^2, the same
   heatmap post-processing). The runs alternate and each time is the min over the repeats;
   the figure that matters is the ratio, measured in the same run.
2. Grid score (``vxnb.deconv.grid_score``; the share of spectral energy at the stride
   lattice) of plain (guided backprop) vs resampled heatmaps at the lower layers of
   random-init VGG-16 and AlexNet, mean over the top-8 filters, printed as a table.
   Also (issue 25) the grid score of the patch embedding of ViT-B/16 (16x16, stride 16) and
   of the stem of ConvNeXt-T (4x4, stride 4), random weights.
3. Latency (``--only latency``; issue 25 item 6): ``vxnb.explanations.explain`` of one 224x224
   image with k = 5 relevant features (the top-5 channels at the last block of each network,
   random weights) against one forward plus five plain autograd backwards of the same
   seeds, on VGG-16, ResNet-50, EfficientNet-B0, ConvNeXt-T and ViT-B/16; goal ≤ 1.2x.
   Process CPU time, alternating runs, median.
4. ``--figure PATH``: plain vs resampled heatmaps of a few lower-layer filters.
5. ``--profile [--model M]``: where the time goes. VGG-16 (default): the top-5 heatmaps
   (ours, Captum) by autograd node type and explain() by phase; then, for M (any of the
   latency models, e.g. ``--model efficientnet_b0``): explain() against the latency reference,
   the backward by node kind (conv transposes, max-pool, ReLU, other activations, batch norm,
   layer/group norm, products) and the rest, the forward alone (plain vs recorded under the
   rules, per torch function call through the tracer), explain() by phase.

Goals: resampled ≤ 1.0x Captum on every model, ≤ 0.5x on VGG-16. ``--threads 1`` (default)
on a shared machine: timings there are CPU time of this process, medians of alternating runs.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import torch
import torchvision
from torch import nn

from vxnb._graph import forward_to
from vxnb.deconv import grid_score, heatmap, visualize
from vxnb.utils import atomic_path


def flower(size: int = 224, petals: int = 6) -> torch.Tensor:
    """A synthetic flower-like RGB image (1, 3, size, size) in [0, 1]: petals, stripes, a
    textured centre on a shaded background."""
    t = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    r, th = (xx ** 2 + yy ** 2).sqrt(), torch.atan2(yy, xx)
    petal = (r < 0.5 + 0.3 * torch.cos(petals * th)).float()
    centre = (r < 0.18).float()
    img = torch.stack([0.2 + 0.1 * yy, 0.45 + 0.1 * xx, 0.2 + 0 * xx])
    pet = torch.stack([0.9 - 0.3 * r, 0.3 + 0.2 * torch.sin(30 * r), 0.5 + 0 * r])
    cen = torch.stack([0.95 + 0 * r, 0.85 + 0 * r, 0.1 + 0.1 * torch.sin(40 * xx) * torch.sin(40 * yy)])
    img = img * (1 - petal) + pet * petal
    img = img * (1 - centre) + cen * centre
    return img.clamp(0, 1).unsqueeze(0)


def top_channels(model: nn.Module, x: torch.Tensor, layer: str, k: int) -> list[int]:
    with torch.no_grad():
        a = forward_to(model.eval(), x, layer)
    return a.flatten(2).norm(dim=2)[0].topk(k).indices.tolist()


def total_stride(model: nn.Module, x: torch.Tensor, layer: str) -> int:
    """Product of the strides of the strided modules run before ``layer`` (chains only)."""
    strides: list[int] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: strides.append(
        mod.stride if isinstance(mod.stride, int) else mod.stride[0]))
        for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))]
    try:
        top_channels(model, x, layer, 1)
    finally:
        for h in hooks:
            h.remove()
    return math.prod(strides)


def captum_heatmaps(model: nn.Module, x: torch.Tensor, layer: str, chans: list[int]) -> torch.Tensor:
    from captum.attr import NeuronGuidedBackprop
    ngb = NeuronGuidedBackprop(model, dict(model.named_modules())[layer])
    vs = [ngb.attribute(x, lambda a, q=q: 0.5 * (a[:, q] ** 2).flatten(1).sum(1)) for q in chans]
    return heatmap(torch.stack(vs, 1))


def timed(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


GOALS = {"vgg16": 0.5, "alexnet": 1.0, "resnet50": 1.0}


def speed(repeats: int) -> None:
    x = flower(224)
    print(f"\n== speed: top-5 filters, one 224x224 image, median CPU time over {repeats} alternating runs ==")
    print(f"{'model':<10} {'layer':<12} {'captum s':>9} {'resampled s':>12} {'ratio':>6} {'goal':>6} "
          f"{'plain s':>8} {'ratio':>6}")
    for arch, layer in [("vgg16", "features.17"), ("alexnet", "features.10"), ("resnet50", "layer2.0")]:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)().eval()
        chans = top_channels(model, x, layer, 5)
        ref = captum_heatmaps(model, x, layer, chans)  # warm-up, and a correctness check
        plain = heatmap(visualize(model, x, layer, chans, resample=False))
        assert torch.allclose(plain, ref, atol=1e-5), "plain mode differs from Captum"
        heatmap(visualize(model, x, layer, chans))
        tc, tr, tp = [], [], []
        for _ in range(repeats):
            tc.append(timed(lambda: captum_heatmaps(model, x, layer, chans)))
            tr.append(timed(lambda: heatmap(visualize(model, x, layer, chans))))
            tp.append(timed(lambda: heatmap(visualize(model, x, layer, chans, resample=False))))
        c, r, p = (statistics.median(t) for t in (tc, tr, tp))
        print(f"{arch:<10} {layer:<12} {c:9.3f} {r:12.3f} {r / c:6.2f} {'≤' + str(GOALS[arch]):>6} "
              f"{p:8.3f} {p / c:6.2f}", flush=True)


#: issue 25 item 6: (builder, layer whose top-5 channels are the relevant features)
LATENCY_MODELS = [("vgg16", "features.29"), ("resnet50", "layer4"), ("efficientnet_b0", "features.7"),
                  ("convnext_tiny", "features.7"), ("vit_b_16", "encoder.layers.encoder_layer_11")]


def latency_pair(arch: str, layer: str, k: int = 5):
    """``(reference, ours)`` for a random-init ``arch`` on the flower at 224 px: one forward + k
    plain autograd backwards of the top-k channels of ``layer`` (channel q of the layer's output,
    every other channel zero; a ViT's patch tokens only), and ``explain()`` with those k features."""
    import pandas as pd

    from vxnb.explanations import explain
    from vxnb.features.hooks import layout
    from vxnb.relevance import Relevance

    x = flower(224)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    with torch.no_grad():
        a = forward_to(model, x, layer)
    kind, prefix = layout(model, layer)  # ViT's blocks: tokens (B, T, D), the D features
    dim = -1 if kind in ("last", "tokens?") and a.dim() > 2 else 1
    a = a[:, prefix:] if dim == -1 and a.dim() == 3 else a
    chans = a.movedim(dim, 1).flatten(2).norm(dim=2)[0].topk(k).indices.tolist()
    frame = pd.DataFrame([dict(**{"class": j}, layer=layer, layer_number=1, kind="conv", channel=q, weight=1.0)
                          for j in range(1000) for q in chans])
    rel = Relevance.from_frame(frame, n_classes=1000)
    module = dict(model.named_modules())[layer]

    def reference() -> None:
        got = {}
        h = module.register_forward_hook(lambda m, i, o: got.setdefault("a", o))
        try:
            xl = x.clone().requires_grad_(True)
            model(xl)
        finally:
            h.remove()
        out = got["a"]
        for q in chans:
            g = torch.zeros_like(out)
            g.select(dim, q).copy_(out.detach().select(dim, q))
            if dim == -1 and out.dim() == 3:
                g[:, :prefix] = 0  # the patch tokens only, as explain() seeds them
            torch.autograd.grad(out, xl, g, retain_graph=True)

    def ours() -> None:
        e = explain(model, rel, x[0], k=k)
        assert len(e.features) == k

    ours.model, ours.rel, ours.x = model, rel, x  # for profile_explain
    return reference, ours


def latency(repeats: int, k: int = 5, models: list[str] | None = None) -> None:
    """explain() of one 224 px image (k features) vs one forward + k plain autograd backwards of
    the same seeds (:func:`latency_pair`)."""
    print(f"\n== latency: explain() of one 224x224 image, k={k}, vs one forward + {k} plain autograd backwards "
          f"of the same seeds; random weights; median process CPU time over {repeats} alternating runs, "
          f"{torch.get_num_threads()} thread(s); goal ≤ 1.2 ==")
    print(f"{'model':<16} {'layer':<32} {'fwd+5 bwd s':>11} {'explain s':>10} {'ratio':>6}")
    for arch, layer in LATENCY_MODELS:
        if models and arch not in models:
            continue
        reference, ours = latency_pair(arch, layer, k)
        reference(), ours()
        tr, to = [], []
        for _ in range(repeats):
            tr.append(timed(reference))
            to.append(timed(ours))
        r, o = statistics.median(tr), statistics.median(to)
        print(f"{arch:<16} {layer:<32} {r:11.3f} {o:10.3f} {o / r:6.2f}", flush=True)


#: autograd node names (without "Backward<n>") -> what they carry back
_NODE_KINDS = {"conv transpose": ("_FastConv2d", "Convolution"),
               "max-pool": ("_FastMaxPool2d", "MaxPool2DWithIndices"),
               "ReLU (guided)": ("_FastGuidedReLU", "_GuidedReLU", "Relu", "Threshold", "BackwardHookFunction"),
               "other activations": ("_GuidedActivation", "Silu", "Gelu", "Hardswish", "Sigmoid", "Hardtanh"),
               "batch norm": ("NativeBatchNorm", "CudnnBatchNorm"),
               "layer/group norm": ("_HeldSigmaNorm", "NativeLayerNorm", "NativeGroupNorm"),
               "products (gates, attention, linear)": ("Mul", "Bmm", "Mm", "Addmm", "Matmul", "Baddbmm",
                                                       "Div", "Softmax")}


def _breakdown(fn) -> tuple[float, dict[str, float]]:
    """Wall time of ``fn()`` (profiler on) and the backward's time per kind of autograd node
    (the profiler's event durations are wall times)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    kinds = dict.fromkeys([*_NODE_KINDS, "other backward nodes"], 0.0)
    prefix = "autograd::engine::evaluate_function: "
    for ev in prof.key_averages():
        if not ev.key.startswith(prefix):
            continue
        node = ev.key[len(prefix):].split("Backward")[0]
        kind = next((k for k, names in _NODE_KINDS.items() if node in names), "other backward nodes")
        kinds[kind] += ev.cpu_time_total / 1e6
    return total, kinds


def _print_breakdown(rows: dict[str, tuple[float, dict[str, float]]]) -> None:
    """One column per run of :func:`_breakdown`: the total, the backward by node kind, the rest."""
    print(f"{'':<38}" + "".join(f"{n:>11}" for n in rows))
    print(f"{'total':<38}" + "".join(f"{t:11.3f}" for t, _ in rows.values()))
    for kind in [*_NODE_KINDS, "other backward nodes"]:
        print(f"{'  ' + kind:<38}" + "".join(f"{d[kind]:11.3f}" for _, d in rows.values()))
    print(f"{'  rest (forward, seeds, maps, Python)':<38}"
          + "".join(f"{t - sum(d.values()):11.3f}" for t, d in rows.values()))


def profile_vgg(k: int = 5, layer: str = "features.17") -> None:
    """Where the time goes: top-5 heatmaps at VGG-16 features.17 (ours, Captum) by
    autograd node kind, and explain() by phase."""
    import pandas as pd

    from vxnb import deconv, explanations
    from vxnb.explanations import explain
    from vxnb.relevance import Relevance

    x = flower(224)
    torch.manual_seed(0)
    model = torchvision.models.vgg16().eval()
    chans = top_channels(model, x, layer, k)

    runs = {"ours": lambda: heatmap(visualize(model, x, layer, chans)),
            "captum": lambda: captum_heatmaps(model, x, layer, chans)}
    for fn in runs.values():
        fn()
    print(f"\n== profile: top-{k} heatmaps, VGG-16 {layer}, one 224x224 image, wall s with the profiler on "
          "(backward: the autograd nodes' time by kind; the rest: forward, seeds, heatmaps, Python) ==")
    rows = {name: _breakdown(fn) for name, fn in runs.items()}
    _print_breakdown(rows)

    frame = pd.DataFrame([dict(**{"class": j}, layer=layer, layer_number=1, kind="conv", channel=q, weight=1.0)
                          for j in range(1000) for q in chans])
    rel = Relevance.from_frame(frame, n_classes=1000)

    def ours() -> None:
        explain(model, rel, x[0], k=k)

    ours()
    print(f"\nexplain() on the same image, k={k}:", end="")
    _explain_phases(explanations, deconv, ours, k)


def profile_explain(arch: str, k: int = 5, repeats: int = 3) -> None:
    """Where explain()'s time goes beyond the latency reference (:func:`latency_pair`) on one of
    :data:`LATENCY_MODELS`: the backward by autograd node kind (ours: the rules' nodes; the
    reference: autograd's), the rest (forward, seeds, heatmaps, Python); the forward alone
    (plain with grad vs recorded under the rules, and the operations the rules' tracer sees);
    explain() by phase. Profiler figures are wall times with the profiler on (min over repeats)."""
    from vxnb import deconv, explanations

    layer = dict(LATENCY_MODELS)[arch]
    reference, ours = latency_pair(arch, layer, k)
    model, x = ours.model, ours.x
    reference(), ours()
    print(f"\n== profile: {arch} {layer}, explain() k={k} vs one forward + {k} plain backwards, one 224x224 "
          f"image; wall s with the profiler on, min over {repeats} runs; the backward's autograd nodes by kind ==")
    rows = {"reference": None, "explain": None}
    for name, fn in (("reference", reference), ("explain", ours)):
        for _ in range(repeats):
            t, d = _breakdown(fn)
            if rows[name] is None or t < rows[name][0]:
                rows[name] = (t, d)
    _print_breakdown(rows)

    def plain() -> None:
        model(x.clone().requires_grad_(True))

    def recorded() -> None:
        rec = deconv.RecordedForward(model, x, True, [layer])
        with rec.forward() as xl:
            model(xl)

    calls = []
    tracer_call = deconv._Tracer.__torch_function__
    deconv._Tracer.__torch_function__ = lambda self, *a, **kw: (calls.append(1), tracer_call(self, *a, **kw))[1]
    try:
        recorded()
    finally:
        deconv._Tracer.__torch_function__ = tracer_call
    tp = min(timed(plain) for _ in range(repeats + 2))
    tr = min(timed(recorded) for _ in range(repeats + 2))
    print(f"\nforward alone (CPU s, min of {repeats + 2}): plain with grad {tp:.4f}, recorded under the rules {tr:.4f} "
          f"(+{1e3 * (tr - tp):.1f} ms; {len(calls)} torch function calls through the rules' tracer, "
          f"{1e6 * (tr - tp) / max(len(calls), 1):.1f} us each)")
    _explain_phases(explanations, deconv, ours, k)


def _explain_phases(explanations, deconv, ours, k: int) -> None:
    """explain() once more, its phases timed (process CPU time)."""
    phases: dict[str, float] = {}

    def timed_attr(obj, name: str, label: str):
        f = getattr(obj, name)

        def g(*a, **kw):
            t0 = time.process_time()
            try:
                return f(*a, **kw)
            finally:
                phases[label] = phases.get(label, 0.0) + time.process_time() - t0
        return f, g

    patches = [(explanations, "_top", "prediction forward + descriptors + top-k"),
               (explanations, "_forward", "  of which the forward (recorded)"),
               (deconv.RecordedForward, "output", "graph check"),
               (deconv.RecordedForward, "backward", f"{k} backwards")]
    saved = []
    try:
        for obj, name, label in patches:
            f, g = timed_attr(obj, name, label)
            saved.append((obj, name, f))
            setattr(obj, name, g)
        total = timed(ours)
    finally:
        for obj, name, f in saved:
            setattr(obj, name, f)
    print(f"\nexplain() by phase (CPU s): total {total:.3f}")
    for label in [p[2] for p in patches]:
        print(f"  {label:<44} {phases.get(label, 0.0):.3f}")
    inner = phases.get(f"{k} backwards", 0.0) + phases.get("graph check", 0.0)
    print(f"  {'the rest (maps -> heatmaps, rgb, combined)':<44} "
          f"{total - phases.get('prediction forward + descriptors + top-k', 0.0) - inner:.3f}", flush=True)


def grid_table(size: int, k: int) -> None:
    x = flower(size)
    print(f"\n== grid score (share of spectral energy at the stride lattice), {size}x{size} flower, "
          f"mean over the top-{k} filters; white noise ~ (S^2-1)/(HW-1) ==")
    print(f"{'model':<8} {'layer':<12} {'module':<10} {'S':>3} {'plain':>8} {'resampled':>10} {'ratio':>7}")
    for arch, layers in [("vgg16", ["features.4", "features.7", "features.9", "features.14", "features.16"]),
                         ("alexnet", ["features.0", "features.2", "features.3", "features.5", "features.6"])]:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)().eval()
        mods = dict(model.named_modules())
        for layer in layers:
            S = total_stride(model, x, layer)
            chans = top_channels(model, x, layer, k)
            gp = grid_score(heatmap(visualize(model, x, layer, chans, resample=False)), S).mean().item()
            gr = grid_score(heatmap(visualize(model, x, layer, chans)), S).mean().item()
            print(f"{arch:<8} {layer:<12} {type(mods[layer]).__name__:<10} {S:>3} {gp:8.4f} {gr:10.4f} "
                  f"{gr / gp if gp > 0 else float('nan'):7.3f}", flush=True)
    patch_embeddings(size, k)


def patch_embeddings(size: int, k: int) -> None:
    """Issue 25 item 3: the grid score plain -> resampled of ViT-B/16's patch embedding (a
    16x16 stride-16 conv) and ConvNeXt-T's stem (4x4 stride 4 conv + LayerNorm2d), random
    weights (torchvision's initialisation), top-k channels of the flower."""
    x = flower(size)
    print(f"\n== grid score of patch embeddings, {size}x{size} flower, random weights, mean over the top-{k} "
          "channels (issue 25) ==")
    print(f"{'model':<14} {'layer':<12} {'S':>3} {'plain':>8} {'resampled':>10} {'ratio':>7}")
    for arch, layer, S in [("vit_b_16", "conv_proj", 16), ("convnext_tiny", "features.0", 4)]:
        torch.manual_seed(0)
        kw = {"image_size": size} if arch == "vit_b_16" else {}
        model = getattr(torchvision.models, arch)(**kw).eval()
        chans = top_channels(model, x, layer, k)
        gp = grid_score(heatmap(visualize(model, x, layer, chans, resample=False)), S).mean().item()
        gr = grid_score(heatmap(visualize(model, x, layer, chans)), S).mean().item()
        print(f"{arch:<14} {layer:<12} {S:>3} {gp:8.4f} {gr:10.4f} {gr / gp if gp > 0 else float('nan'):7.3f}",
              flush=True)


def figure(path: str, size: int = 224) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = flower(size)
    rows = []
    for arch, layer in [("alexnet", "features.3"), ("alexnet", "features.5"), ("vgg16", "features.9")]:
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)().eval()
        chans = top_channels(model, x, layer, 4)
        rows.append((f"{arch} {layer} plain", heatmap(visualize(model, x, layer, chans, resample=False))[0], chans))
        rows.append((f"{arch} {layer} resampled", heatmap(visualize(model, x, layer, chans))[0], chans))
    fig, axes = plt.subplots(len(rows), 5, figsize=(12.5, 2.6 * len(rows)))
    for r, (title, maps, chans) in enumerate(rows):
        axes[r, 0].imshow(x[0].permute(1, 2, 0).numpy())
        axes[r, 0].set_ylabel(title, fontsize=8)
        for c in range(4):
            axes[r, c + 1].imshow(maps[c].numpy(), cmap="inferno", vmin=0, vmax=1)
            axes[r, c + 1].set_title(f"filter {chans[c]}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    print(f"\nfigure written to {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one repeat, a smaller grid-score input")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3, quick: 1)")
    p.add_argument("--figure", default=None, help="write the plain vs resampled picture here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machine)")
    p.add_argument("--only", choices=["speed", "latency", "grid"], nargs="+", default=None,
                   help="run only these parts (default: all)")
    p.add_argument("--profile", action="store_true", help="print where the time goes (see 5. above)")
    p.add_argument("--model", default="vgg16", choices=[a for a, _ in LATENCY_MODELS],
                   help="--profile: the model (vgg16: also the heatmaps against Captum; others: explain() "
                        "against the latency reference)")
    p.add_argument("--models", nargs="+", default=None, help="latency: only these models (default: all five)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    parts = args.only or ([] if args.profile else ["speed", "latency", "grid"])  # --profile alone: only it
    if "speed" in parts:
        speed(args.repeats or (1 if args.quick else 3))
    if "latency" in parts:
        latency(args.repeats or (1 if args.quick else 3), models=args.models)
    if "grid" in parts:
        grid_table(128 if args.quick else 224, 4 if args.quick else 8)
    if args.figure:
        figure(args.figure)
    if args.profile:
        if args.model == "vgg16":
            profile_vgg()
        profile_explain(args.model, repeats=args.repeats or 3)


if __name__ == "__main__":
    main()
