"""The wheel carries the numbered notebooks as package data (``vxnb/notebooks/``).

People edit them in the top-level ``notebooks/``; the build copies them into the package, so
an installed vxnb finds them (``vxnb.paths.notebooks_dir``). A clone or editable install reads
``notebooks/`` directly. Everything else is in pyproject.toml.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

NOTEBOOKS = Path(__file__).resolve().parent / "notebooks"


class build_py_with_notebooks(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        found = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
        if not found:
            raise RuntimeError(f"no numbered notebooks in {NOTEBOOKS}: the wheel would ship without them")
        target = Path(self.build_lib) / "vxnb" / "notebooks"
        target.mkdir(parents=True, exist_ok=True)
        for nb in found:
            shutil.copyfile(nb, target / nb.name)


setup(cmdclass={"build_py": build_py_with_notebooks})
