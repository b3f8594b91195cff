"""Benchmark: hooked feature extraction against the plain forward pass (issue 16: ≥ 0.95×).

``vxnb.features.extract_features`` (default layers — every conv/FC block — descriptors
computed in the hooks, G = XᵀX and XᵀL accumulated, X kept) against a plain loop ``model(x)``
over the SAME DataLoader of random 128 px images (cycling through a pool of 256), same model,
same device, same torch thread count, in the same process. Prints images/s of both and their
ratio (goal ≥ 0.95), with the accumulating thread on (``overlap=True``: the G update runs beside
the next batch's forward pass) and off (``overlap=False``, the synchronous "before" reference).

The ratio of the goal is wall-clock throughput: CPU time summed over threads cannot show the
overlap (the G update costs the same CPU time on either thread). The CPU-time ratio (user +
system of the process, all threads) is printed beside it — on a shared machine wall time also
measures waiting for a core, CPU time does not. On CUDA both are wall times with a
synchronisation at the end (the overlap thread is off on CUDA: see ``extract_features``).

The number of images N is chosen per model so that the plain pass takes about ``--seconds``,
and is at least ``--min-images`` (the m×m Gram matrix has a fixed cost per extraction — allocating and touching it, 1 GB for
VGG-11's All pool — which large datasets amortise). Plain, overlap-on and overlap-off passes
alternate (``--repeats`` rounds, the order rotated each round); each ratio reported is the
median over the rounds of plain time / hooked time (so that a slow stretch of a shared machine
hits both sides of a round), with the range over rounds beside it. Also printed: the fixed
per-call setup (one-batch extraction minus one-batch forward) and, with ``--float64``, the ratio
with G's products forced to float64 (``gram_dtype="auto"``, the default timed here, multiplies
float32 blocks at these sizes; see ``extract_features``).

ResNet-50 and VGG-16 run on 224 px images with the run's default layers (ResNet: the residual
blocks' outputs, ``layer3.4`` etc.; VGG: every conv/FC block). After each model the peak memory
is printed: on CUDA the peak allocated during the hooked pass, on the CPU the process's peak RSS
so far (``ru_maxrss``, which includes everything measured before).

    python benchmarks/bench_features.py            # VGG-11, ResNet-18, FlowerNet (128 px)
    python benchmarks/bench_features.py --models resnet50 vgg16   # 224 px, block outputs
    python benchmarks/bench_features.py --quick --threads 1       # shorter passes, fewer repeats
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset

from vxnb.features import default_layers, extract_features
from vxnb.utils import get_device


class CyclicImages(Dataset):
    """N items (image, label) cycling through a fixed pool of random images."""

    def __init__(self, n: int, size: int, pool: int = 256, classes: int = 10):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(min(pool, n), 3, size, size, generator=g)
        self.labels = torch.randint(0, classes, (min(pool, n),), generator=g)
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        j = i % len(self.images)
        return self.images[j], self.labels[j]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def plain_pass(model: torch.nn.Module, loader: DataLoader, dev: torch.device) -> int:
    n = 0
    with torch.inference_mode():
        for x, _ in loader:
            model(x.to(dev, non_blocking=True))
            n += x.shape[0]
    _sync(dev)
    return n


def hooked_pass(model: torch.nn.Module, loader: DataLoader, dev: torch.device, **kw) -> int:
    f = extract_features(model, loader, device=dev, progress=False, **kw)
    _sync(dev)
    return f.n


def _peak_memory(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process, so far)"


def bench(name: str, model: torch.nn.Module, args: argparse.Namespace, dev: torch.device, size: int = 128) -> float:
    model = model.to(dev).eval()
    cuda = dev.type == "cuda"
    cpu_clock = time.perf_counter if cuda else time.process_time
    batch = args.batch_size
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    def loader(n: int) -> DataLoader:
        return DataLoader(CyclicImages(n, size), batch_size=batch, shuffle=False, pin_memory=cuda)

    one = loader(batch)

    def timed(fn, *a, **kw) -> tuple[float, float]:
        """(wall, CPU) seconds of one call."""
        w0, c0 = time.perf_counter(), cpu_clock()
        fn(*a, **kw)
        return time.perf_counter() - w0, cpu_clock() - c0

    plain_pass(model, one, dev)  # warm-up (allocator, cuDNN autotuning)
    hooked_pass(model, one, dev)
    per_batch = min(timed(plain_pass, model, one, dev)[0] for _ in range(3))
    n_batches = int(min(max(args.seconds / max(per_batch, 1e-6), -(-args.min_images // batch)), 1000))
    data = loader(n_batches * batch)
    n = n_batches * batch
    runs = {"plain": lambda: plain_pass(model, data, dev),
            "on": lambda: hooked_pass(model, data, dev, overlap=True),
            "off": lambda: hooked_pass(model, data, dev, overlap=False)}
    if args.float64:
        runs["f64"] = lambda: hooked_pass(model, data, dev, gram_dtype=torch.float64, overlap=True)
    keys = list(runs)
    t: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    for r in range(args.repeats):  # alternate, order rotated: slow drift hits every side alike
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t[k].append(timed(runs[k]))
    setup = max(0.0, timed(hooked_pass, model, one, dev)[0] - timed(plain_pass, model, one, dev)[0])
    m = extract_features(model, one, device=dev, progress=False).m

    def ratios(k: str, clock: int) -> list[float]:
        return sorted(p[clock] / h[clock] for p, h in zip(t["plain"], t[k]))

    def rate(k: str) -> float:
        return n / statistics.median(w for w, _ in t[k])

    on_w, off_w, on_c, off_c = ratios("on", 0), ratios("off", 0), ratios("on", 1), ratios("off", 1)
    ratio = statistics.median(on_w)
    print(f"{name:<10} {size}px N={n:>6}  m={m:>6} ({len(default_layers(model)):>2} layers)  "
          f"images/s (median): plain {rate('plain'):7.1f}  overlap on {rate('on'):7.1f}  off {rate('off'):7.1f}\n"
          f"           wall ratio hooked/plain: overlap on {ratio:5.3f} {'OK ' if ratio >= 0.95 else 'LOW'} "
          f"(range {on_w[0]:.3f}–{on_w[-1]:.3f}), off (before) {statistics.median(off_w):5.3f} "
          f"(range {off_w[0]:.3f}–{off_w[-1]:.3f})  [median of {len(on_w)} rounds]\n"
          f"           {'wall' if cuda else 'CPU-time'} ratio: overlap on {statistics.median(on_c):5.3f} "
          f"(range {on_c[0]:.3f}–{on_c[-1]:.3f}), off {statistics.median(off_c):5.3f} "
          f"(range {off_c[0]:.3f}–{off_c[-1]:.3f}) | setup {setup:5.2f} s"
          + (f" | float64 products (overlap on): wall {statistics.median(ratios('f64', 0)):5.3f}"
             if args.float64 else "")
          + f" | {_peak_memory(dev)}", flush=True)
    return ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter passes, fewer repeats")
    p.add_argument("--device", default=None, help="cpu / cuda (default: CUDA when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seconds", type=float, default=None, help="target duration of one plain pass")
    p.add_argument("--min-images", type=int, default=512,
                   help="at least this many images per pass (default 512), so that allocating G is amortised")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds (plain, overlap on, overlap off) per model (default 7, quick 4)")
    p.add_argument("--models", nargs="+", default=["vgg11", "resnet18", "flowernet"],
                   choices=["vgg11", "resnet18", "flowernet", "resnet50", "vgg16"],
                   help="which models (default: the first three; resnet50 and vgg16 run at 224 px)")
    p.add_argument("--float64", action="store_true",
                   help="also time gram_dtype=torch.float64 (auto uses float32 products for these sizes)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = get_device(args.device)
    if args.seconds is None:
        args.seconds = (1.0 if args.quick else 4.0) if dev.type == "cuda" else (6.0 if args.quick else 15.0)
    if args.repeats is None:
        args.repeats = 4 if args.quick else 7
    from vxnb.features.stream import _cpu_cores, _resolve_overlap

    print(f"device {dev}, torch threads {torch.get_num_threads()} (plain and hooked alike), {_cpu_cores()} cores "
          f"usable, overlap thread: timed on and off (extract_features' default 'auto' is "
          f"{'on' if _resolve_overlap('auto', dev) else 'off'} here), random images, batch {args.batch_size}, "
          f"plain pass ≈ {args.seconds:g} s, {args.repeats} rounds, ratios of wall-clock time"
          f"{'' if dev.type == 'cuda' else ' (and of process CPU time)'}", flush=True)
    from vxnb.models import FlowerNet

    builders = {"vgg11": ("VGG-11", lambda: torchvision.models.vgg11(num_classes=10)),
                "resnet18": ("ResNet-18", lambda: torchvision.models.resnet18(num_classes=10)),
                "flowernet": ("FlowerNet", lambda: FlowerNet(num_classes=6, size=128)),
                "resnet50": ("ResNet-50", lambda: torchvision.models.resnet50(num_classes=10)),
                "vgg16": ("VGG-16", lambda: torchvision.models.vgg16(num_classes=10))}
    ratios = []
    for key in args.models:
        torch.manual_seed(0)
        name, build = builders[key]
        ratios.append(bench(name, build(), args, dev, size=224 if key in ("resnet50", "vgg16") else 128))
    print(f"lowest median wall ratio hooked/plain, overlap on: {min(ratios):.3f} (goal ≥ 0.95, issue 16)")


if __name__ == "__main__":
    main()
