"""How long `python -m vxnb.report` takes to refuse a misspelt parameter (issue 24: well under 5 s,
before any notebook starts), against the reference of the same interpreter importing
vxnb.report and exiting, measured in the same run.

    python benchmarks/bench_param_check.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time


def _time(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - t0, res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    out = tempfile.mkdtemp()
    refuse = [sys.executable, "-m", "vxnb.report", "--quick", "-p", "mask_dir", "x", "--out", f"{out}/rep"]
    ref = [sys.executable, "-c", "import vxnb.report"]
    t_refuse, t_ref = [], []
    for _ in range(args.repeat):  # interleaved, so both see the same load
        t, res = _time(refuse)
        assert res.returncode == 2 and "mask_root" in res.stderr, res.stderr
        t_refuse.append(t)
        t_ref.append(_time(ref)[0])
    a, b = statistics.median(t_refuse), statistics.median(t_ref)
    print(f"refusal of -p mask_dir x: {a:.2f} s (median of {args.repeat}); import vxnb.report: {b:.2f} s; "
          f"ratio {a / b:.2f}")
    print(f"message: {res.stderr.strip().splitlines()[-1][:160]}")


if __name__ == "__main__":
    main()
