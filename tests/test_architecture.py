"""The package's shape (docs/ARCHITECTURE.md): imports point down the layers of pyproject.toml,
no private name crosses a module boundary, and ``import vxnb`` exports the paper's steps."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import vxnb

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "vxnb"


def _module_name(file: Path, root: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, root: Path) -> bool:
    p = root.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def private_imports(root: Path, package: str = "vxnb") -> list[str]:
    """Every ``from A import _x`` in ``root/package`` where ``_x`` is a private name (not a
    module, not a dunder) of another module A of the package, as ``"importer <- A._x"``."""
    found = []
    for file in sorted((root / package).rglob("*.py")):
        me = _module_name(file, root)
        here = me if file.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src != package and not src.startswith(package + "."):
                continue
            for alias in node.names:
                name = alias.name
                private = name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
                if private and src != me and not _is_module(f"{src}.{name}", root):
                    found.append(f"{me} <- {src}.{name}")
    return found


def test_scanner_finds_private_imports_in_a_hand_made_package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "_shared.py").write_text("def helper(): pass\n_secret = 1\n")
    (pkg / "a.py").write_text("_own = 1\ndef _f(): pass\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from .. import _shared\n"                 # a private *module*: allowed
        "from .._shared import helper\n"           # a public name of it: allowed
        "from ..a import _f, __doc__\n"            # _f crosses modules; a dunder does not count
        "from pkg._shared import _secret as s\n"   # absolute form
        "import os\nfrom os import _exit\n")       # outside the package: ignored
    assert private_imports(tmp_path, "pkg") == ["pkg.sub.b <- pkg.a._f", "pkg.sub.b <- pkg._shared._secret"]


def test_no_private_name_is_imported_across_modules():
    assert private_imports(ROOT) == []


def _layers(container: str | None = None) -> list[str]:
    """The modules named in the layers contract of ``container`` (None: the package's own)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (contract,) = [c for c in config["tool"]["importlinter"]["contracts"]
                   if c["type"] == "layers" and (c.get("containers") or [None]) == [container]]
    prefix = f"{container}." if container else ""
    return [prefix + m.strip().strip("()") for layer in contract["layers"] for m in layer.replace(":", "|").split("|")]


def test_every_module_of_the_package_has_a_layer():
    """A new module must be placed in the layers contract, or the contract would not see it."""
    listed = set(_layers())
    top = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
           if (p.suffix == ".py" and p.stem not in ("__init__", "__main__")) or (p / "__init__.py").is_file()}
    missing = sorted(f"vxnb.{t}" for t in top if f"vxnb.{t}" not in listed)
    assert missing == [], f"add these to [tool.importlinter] layers in pyproject.toml: {missing}"


def test_every_study_module_has_a_layer_inside_studies():
    """``vxnb.studies`` has its own contract (gc over the studies over Table 1 and run folders)."""
    listed = set(_layers("vxnb.studies"))
    here = {f"vxnb.studies.{p.stem if p.is_file() else p.name}" for p in (PKG / "studies").iterdir()
            if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert sorted(here - listed) == [], "add these to the vxnb.studies contract in pyproject.toml"


def _lint_imports(config: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([exe, "--config", str(config), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_linter_layers_contract_is_kept():
    res = _lint_imports(ROOT / "pyproject.toml")
    assert res.returncode == 0, res.stdout + res.stderr
    n = len(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"])
    assert f"{n} kept, 0 broken" in res.stdout


def test_features_package_contract_breaks_when_a_part_imports_the_entry_point(tmp_path):
    """The contract inside vxnb.features has teeth: with the stream placed above the extraction
    entry point (which imports it), it breaks."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '    "extraction",\n    "stream",\n' in text
    config = tmp_path / "pyproject.toml"
    config.write_text(text.replace('    "extraction",\n    "stream",\n', '    "stream",\n    "extraction",\n'),
                      encoding="utf-8")
    res = _lint_imports(config)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and "vxnb.features.extraction" in res.stdout


def test_import_linter_contract_breaks_when_a_layer_imports_up(tmp_path):
    """The contract has teeth: with evaluate placed below features (it imports features), it breaks."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '    "vxnb.evaluate",\n' in text and '    "vxnb.features",\n' in text
    swapped = (text.replace('    "vxnb.evaluate",\n', '    "@E@",\n').replace('    "vxnb.features",\n', '    "vxnb.evaluate",\n')
               .replace('    "@E@",\n', '    "vxnb.features",\n'))
    config = tmp_path / "pyproject.toml"
    config.write_text(swapped, encoding="utf-8")
    res = _lint_imports(config)
    assert res.returncode != 0
    assert "BROKEN" in res.stdout and "vxnb.evaluate" in res.stdout


@pytest.mark.parametrize("name, owner", [
    ("extract_features", "vxnb.features"), ("lasso_path", "vxnb.lasso"), ("Relevance", "vxnb.relevance"),
    ("explain", "vxnb.explanations"), ("average_images", "vxnb.averages"), ("visualize", "vxnb.deconv"),
    ("attribution", "vxnb.baselines"),
])
def test_import_vxnb_exports_the_papers_steps(name, owner):
    import importlib
    assert name in vxnb.__all__
    assert getattr(vxnb, name) is getattr(importlib.import_module(owner), name)


def test_unknown_attribute_of_vxnb_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'not_there'"):
        vxnb.not_there  # noqa: B018


def _vxnb_imports(source: str) -> list[tuple[str, list[str]]]:
    """(module, names) of every absolute ``import vxnb…`` / ``from vxnb… import …`` in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "vxnb":
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "vxnb"]
    return out


def _sources() -> list[tuple[str, str]]:
    import json

    files = [*PKG.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    out = [(str(f.relative_to(ROOT)), f.read_text(encoding="utf-8")) for f in sorted(files)]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        out.append((str(nb.relative_to(ROOT)), "\n".join(l for l in code.splitlines() if not l.lstrip()[:1] in "%!")))
    return out


def test_every_vxnb_import_names_a_module_of_this_tree():
    """Module paths are checked on disk, not through the import system, so a module that moved
    (vxnb.runs -> vxnb.studies.runs) is caught even where an older install would still serve it."""
    import importlib

    bad = []
    for where, source in _sources():
        for module, names in _vxnb_imports(source):
            if not _is_module(module, ROOT):
                bad.append(f"{where}: {module}")
                continue
            for name in names:
                if not _is_module(f"{module}.{name}", ROOT) and not hasattr(importlib.import_module(module), name):
                    bad.append(f"{where}: {module}.{name}")
    assert bad == []


#: Functions allowed past the limit: the lasso's homotopy kernel (one loop over the path's
#: events, its state shared by every step).
LONG_FUNCTIONS_ALLOWED = {"vxnb/lasso.py:_homotopy_steps"}
MAX_FUNCTION_LINES = 120


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:name (n lines)`` of every function or method under ``root`` longer than ``limit``
    lines, decorators and docstring included."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
                if n > limit:
                    out.append(f"{path.relative_to(root.parent).as_posix()}:{node.name} ({n} lines)")
    return out


def test_long_function_scan_counts_lines_of_a_hand_made_module(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(10))
    (pkg / "m.py").write_text(f"def short():\n{body}\n\n\n@staticmethod\ndef long():\n{body}\n{body}\n")
    assert long_functions(pkg, limit=15) == ["pkg/m.py:long (22 lines)"]
    assert long_functions(pkg, limit=22) == []


def test_no_function_is_longer_than_the_limit():
    """Long functions are cut where a step has a name (issue 23 item 6)."""
    found = [f for f in long_functions(PKG) if f.split(" (")[0] not in LONG_FUNCTIONS_ALLOWED]
    assert found == [], f"cut these below {MAX_FUNCTION_LINES} lines: {found}"
