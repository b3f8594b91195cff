"""``python -m vxnb.extract`` on the tiny test model and data (tests/test_extract.py starts it with
torchrun): the run's data and model come from tests/dist_worker.py instead of rendering and training."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dist_worker import N_CLASSES, TinyImages  # noqa: E402
from nets import tiny_strided_net  # noqa: E402

from vxnb.studies import runs  # noqa: E402


def tiny_data(cfg, progress=True):
    return TinyImages(), TinyImages(12), list(TinyImages.classes)


def tiny_model(cfg, data=None, progress=True, **kwargs):
    return tiny_strided_net(N_CLASSES), {}


if __name__ == "__main__":  # only in the worker process: importing this module patches nothing
    runs.load_data = tiny_data
    runs.get_model = tiny_model
    from vxnb.extract import main

    import os
    argv = sys.argv[1:]
    if os.environ.get("VXNB_TEST_NODE_LOCAL_RUNS"):  # each rank its own runs folder: nodes with local disks
        argv += ["-p", "runs_root", str(Path(os.environ["VXNB_TEST_NODE_LOCAL_RUNS"]) / f"rank{os.environ['RANK']}")]
    sys.exit(main(argv))
