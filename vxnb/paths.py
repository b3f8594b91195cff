"""Where vxnb keeps its working folders, and where its notebooks are.

``data/`` (rendered an8Flower, MNIST, the report's scripts), ``runs/`` (run folders) and
``reports/`` (the report) live in the *working folder*: ``$VXNB_HOME`` when set, else the
current directory. Installed from a wheel, vxnb therefore never writes into site-packages;
in the clone, ``make`` runs in the repository root, so the folders stay where they were.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HOME_ENV", "REPORT_DIR_ENV", "LEADERBOARD_PAGE", "KINDS", "work_home", "work_dir", "report_dir",
           "notebooks_dir"]

#: The environment variable that moves the working folder away from the current directory.
HOME_ENV = "VXNB_HOME"
#: Set by the report while its notebooks run: the folder its pages go to (:func:`report_dir`).
REPORT_DIR_ENV = "VXNB_REPORT_DIR"
#: The an8Flower leaderboard's page in the report's folder (linked from the index when a run wrote it).
LEADERBOARD_PAGE = "benchmark.html"
#: The working folders vxnb writes.
KINDS = ("data", "runs", "reports")


def work_home() -> Path:
    """The working folder: ``$VXNB_HOME`` when set (and not empty), else the current directory.

    Raises ``ValueError`` when ``$VXNB_HOME`` names something that is not a folder.
    """
    env = os.environ.get(HOME_ENV, "")
    if not env.strip():
        return Path.cwd()
    home = Path(env).expanduser().absolute()
    if home.exists() and not home.is_dir():
        raise ValueError(f"{HOME_ENV}: expected a folder for vxnb's data/, runs/ and reports/, "
                         f"got {home}, which is a file")
    return home


def work_dir(kind: str, *, create: bool = True) -> Path:
    """The working folder ``kind`` (``"data"``, ``"runs"`` or ``"reports"``) under :func:`work_home`.

    With ``create`` the folder is made when missing and must be writable; otherwise a
    ``PermissionError`` (unwritable) or ``NotADirectoryError`` (a file is in the way) names it.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    path = work_home() / kind
    if not create:
        return path
    hint = f"run vxnb from a folder you can write to, or set {HOME_ENV} to one"
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{kind} folder {path}: a file is in the way; {hint}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(f"{kind} folder {path} cannot be created ({err.strerror or err}); {hint}") from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{kind} folder {path} is not writable; {hint}")
    return path


def report_dir() -> Path:
    """Where a notebook writes a page of the report: ``$VXNB_REPORT_DIR`` (set by ``vxnb report``
    while it runs the notebooks), else ``reports/`` of the working folder."""
    env = os.environ.get(REPORT_DIR_ENV, "")
    if env.strip():
        path = Path(env).expanduser().absolute()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return work_dir("reports")


def notebooks_dir() -> Path:
    """The numbered notebooks shipped with vxnb: ``vxnb/notebooks/`` in an installed wheel
    (copied there at build time), else the clone's top-level ``notebooks/``."""
    package = Path(__file__).resolve().parent
    if (package / "notebooks").is_dir():
        return package / "notebooks"
    clone = package.parent
    if (clone / "pyproject.toml").is_file() and (clone / "notebooks").is_dir():
        return clone / "notebooks"
    raise FileNotFoundError(f"notebooks: vxnb's notebooks are neither in {package / 'notebooks'} (a wheel) "
                            f"nor in {package.parent / 'notebooks'} (a clone); pass a folder of your own")
