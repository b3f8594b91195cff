import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest-xdist runs two workers.
torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def images(request):
    """Seeded random images (n, channels, size, size) for a test module, shared by its tests (do not
    modify them in place). The module says which: ``IMAGES = dict(n=5, channels=3, size=16)``, with
    optional ``seed`` (1) and ``low`` (values uniform in [low, 1); 0)."""
    from nets import random_images

    spec = getattr(request.module, "IMAGES", None)
    if not isinstance(spec, dict):
        raise ValueError(f"images: {request.module.__name__} must define IMAGES = dict(n=..., channels=..., size=...) "
                         "to use the shared images fixture")
    return random_images(**spec)


# ---------------------------------------------------------------------------- skips
# Every session prints how many tests were skipped and fails when one was skipped that
# tests/skip_allowlist.txt does not allow (a required dependency or a vxnb module that fails
# to import must fail the run, never skip it).
_ALLOWLIST = os.path.join(os.path.dirname(__file__), "skip_allowlist.txt")
_skipped: list[tuple[str, str]] = []


def _allowed_skips() -> list[tuple[str, str]]:
    rules = []
    with open(_ALLOWLIST, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                node, reason, _why = (part.strip() for part in line.split("|", 2))
                rules.append((node, reason))
    return rules


def _is_allowed(nodeid: str, reason: str, rules: list[tuple[str, str]]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(nodeid, node) and text in reason for node, text in rules)


def pytest_runtest_logreport(report):
    if report.skipped:
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def _offending() -> list[tuple[str, str]]:
    rules = _allowed_skips()
    return [(n, r) for n, r in _skipped if not _is_allowed(n, r, rules)]


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller decides
        return
    if _offending() and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if hasattr(config, "workerinput"):
        return
    bad = _offending()
    terminalreporter.write_line(f"skipped tests: {len(_skipped)} ({len(_skipped) - len(bad)} allowed by "
                                f"tests/skip_allowlist.txt)")
    for nodeid, reason in bad:
        terminalreporter.write_line(f"NOT ALLOWED TO SKIP: {nodeid}: {reason}", red=True)
