"""One rank of the distributed-extraction tests (tests/test_distributed.py starts it as plain
processes with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set, as torchrun does).

python tests/dist_worker.py OUT.npz [--kill-rank R --kill-after B] [--checkpoint DIR] [--cache DIR]
    [--n N] [--refusals R] [--timeout S]

--refusals R: rank R differs in its model, its layers, then its data length (and with --hang,
then hangs); each rank prints the errors. Else rank 0 writes G, XtL, labels, index and the merged top patches to OUT.npz.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nets import tiny_strided_net  # noqa: E402

N_CLASSES = 3
BATCH = 4
TOP_K = 5


class TinyImages(Dataset):
    """n seeded random 3×16×16 images, labels i mod 3; batches 6 and 11 (of 4) repeat batch 0, so
    that top-k lists have exact ties."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int = 50):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, 16, 16, generator=g)
        for start in (24, 44):  # batches equal to the first one: exactly equal scores, ties by index
            if start + BATCH <= n:
                self.images[start:start + BATCH] = self.images[:BATCH]
        self.labels = torch.arange(n) % N_CLASSES

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i])


class KillAfter:
    """A callback that SIGKILLs its own process after ``after`` batches (a rank dying mid-run), or
    with ``hang`` (the process group's timeout) first sleeps 2 × hang seconds (a rank that hangs)."""

    def __init__(self, after: int, hang: float = 0):
        self.after, self.seen, self.hang = after, 0, hang

    def __call__(self, outputs, index) -> None:
        self.seen += 1
        if self.seen > self.after:
            if self.hang:  # long past the process group's timeout, then gone
                time.sleep(2 * self.hang)
            os.kill(os.getpid(), signal.SIGKILL)

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass

    def sync_distributed(self) -> None:
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-after", type=int, default=0)
    p.add_argument("--hang", action="store_true", help="the kill rank hangs instead of dying")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--cache", default=None)
    p.add_argument("--refusals", type=int, default=None, help="rank that differs in model, layers, data")
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--every-rank", action="store_true", help="every rank writes its result")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from vxnb import distributed
    from vxnb.features import extract_features
    from vxnb.interpret import TopPatches

    assert distributed.init(timeout=args.timeout, backend="gloo")
    rank = torch.distributed.get_rank()

    def run(perturb=False, fewer_layers=False, fewer_images=False, kill=False):
        model = tiny_strided_net(N_CLASSES)
        if perturb:  # another model on this rank
            with torch.no_grad():
                model.conv1.bias.add_(0.01)
        layers = ["relu1", "relu2"] if fewer_layers else ["relu1", "relu2", "relu3"]
        tracker = TopPatches(model, layers=layers, k=TOP_K)
        callbacks = [tracker] + ([KillAfter(args.kill_after, args.timeout if args.hang else 0)] if kill else [])
        feats = extract_features(model, TinyImages(args.n - 1 if fewer_images else args.n), layers, batch_size=BATCH,
                                 n_classes=N_CLASSES, callbacks=callbacks, checkpoint_dir=args.checkpoint,
                                 checkpoint_every=args.every, cache_dir=args.cache, progress=False,
                                 gram_dtype=torch.float64)
        return feats, tracker

    if args.refusals is not None:  # each case on rank args.refusals; every rank prints its error
        for case in ("perturb", "fewer_layers", "fewer_images") + (("kill",) if args.hang else ()):
            try:
                run(**{case: rank == args.refusals})
                print(f"RANK{rank} {case} ACCEPTED", flush=True)
            except Exception as err:  # noqa: BLE001 - the test reads the message
                print(f"RANK{rank} {case} ERROR {type(err).__name__}: {err}", flush=True)
        # leave without running the process group's C++ destructors: after a peer hung past the
        # timeout, gloo's teardown can abort (SIGABRT) depending on when the peer dies, which is
        # not what this worker tests (seen once in a full make test)
        sys.stdout.flush()
        os._exit(0)
    try:
        feats, tracker = run(kill=rank == args.kill_rank)
    except Exception as err:  # noqa: BLE001 - the test reads the message
        print(f"RANK{rank} ERROR {type(err).__name__}: {err}", flush=True)
        os._exit(3)  # as above: no gloo teardown after a peer died
    top = tracker.to_frame()  # rank 0 writes OUT, the others OUT.rank<r>.npz
    out = args.out if rank == 0 else f"{args.out[:-4]}.rank{rank}.npz"
    if rank == 0 or args.every_rank:
        np.savez(out, G=feats.G, XtL=feats.XtL, labels=feats.labels, index=feats.index,
                 top_index=top["index"].to_numpy(), top_score=top["score"].to_numpy(),
                 top_row=top["row"].to_numpy(), top_col=top["col"].to_numpy(), top_channel=top["channel"].to_numpy(),
                 n_seen=tracker.n_seen_)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
