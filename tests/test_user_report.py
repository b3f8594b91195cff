"""The report on a user's run: -p/--params, cells skipped for what a run lacks, progress bars
in the terminal, and the whole quick report on a test-made image folder with and without masks."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from vxnb import report, utils
from vxnb.studies import runs

sys.path.insert(0, str(Path(__file__).parent))
from folder_fixture import make_folder, save_weights  # noqa: E402


def test_parameters_from_a_file_and_pairs(tmp_path):
    f = tmp_path / "my-run.yaml"
    f.write_text("dataset: folder\nimage_size: 224\nnormalize: [[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]\nquick: true\n")
    args = report.parse_args(["--params", str(f), "-p", "image_size", "96", "-p", "layers", "layer4.*"])
    assert args.parameters == {"dataset": "folder", "image_size": 96, "layers": "layer4.*",
                               "normalize": [[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]]}
    assert args.quick is True       # quick from the file is the --quick switch
    rel = report.parse_args(["-p", "data_root", "my-images", "-p", "weights", "/abs/w.pt"]).parameters
    assert rel["data_root"] == str(Path.cwd() / "my-images") and rel["weights"] == "/abs/w.pt"
    with pytest.raises(SystemExit):
        report.parse_args(["--params", str(tmp_path / "missing.yaml")])


def test_skipped_tags_follow_what_the_run_has(tmp_path):
    images, masks = make_folder(tmp_path, per_class=2, size=16)
    base = dict(dataset="folder", data_root=str(images), model="resnet18")
    ext = report.EXTENDED_STUDIES  # notebook 05's extended studies: only with extended_studies=True
    assert report.skipped_tags({"quick": True}) == {report.FULL_SETTING_ONLY, ext}
    assert report.skipped_tags({"quick": False}) == {ext}
    assert report.skipped_tags({"quick": False, "extended_studies": True}) == set()
    assert report.skipped_tags(base) == {report.NEEDS_MASKS, report.AN8FLOWER_ONLY, report.FULL_SETTING_ONLY, ext}
    assert report.skipped_tags({**base, "mask_root": str(masks)}) == {report.AN8FLOWER_ONLY, report.FULL_SETTING_ONLY,
                                                                     ext}
    with pytest.raises(FileNotFoundError, match="mask_root: no folder"):
        report.skipped_tags({**base, "mask_root": str(tmp_path / "nowhere")})


def test_tagged_cells_are_not_executed(tmp_path):
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"},
                                            "language_info": {"name": "python"}})
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("raise RuntimeError('needs masks')", metadata={"tags": ["needs-masks"]}),
                nbformat.v4.new_code_cell("print('ran', x)")]
    src = tmp_path / "01_t.ipynb"
    nbformat.write(nb, str(src))
    out = report.run_notebook(src, tmp_path / "out", {"x": 2}, progress=False, skip_tags={"needs-masks"})
    cells = nbformat.read(str(out), as_version=4).cells
    assert cells[-2].outputs == [] and "skip-execution" in cells[-2].metadata.tags
    assert "ran 2" in cells[-1].outputs[0]["text"]
    assert "skip-execution" not in json.dumps(nbformat.read(str(src), as_version=4))   # the source is untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["01_t.ipynb"]


def test_progress_bars_are_mirrored_to_the_terminal(monkeypatch):
    import tqdm.auto

    import vxnb.lasso
    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.auto.tqdm)          # undone after the test
    monkeypatch.setattr(vxnb.lasso, "tqdm", vxnb.lasso.tqdm)
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", terminal)
    monkeypatch.delenv(utils.TERMINAL_PROGRESS_ENV, raising=False)
    assert utils.mirror_progress_to_terminal() is False              # only where the report asks
    monkeypatch.setenv(utils.TERMINAL_PROGRESS_ENV, "1")
    monkeypatch.setattr(utils, "MIRROR_KEEP_SECONDS", 0.0)           # keep even a short bar's last line
    assert utils.mirror_progress_to_terminal() is True
    assert vxnb.lasso.tqdm is tqdm.auto.tqdm and tqdm.auto.tqdm.__name__.startswith("Mirrored")
    for _ in tqdm.auto.tqdm(range(7), desc="lasso path"):
        pass
    text = terminal.getvalue()
    assert "lasso path" in text and "7/7" in text
    for _ in tqdm.auto.tqdm(range(3), desc="hidden", disable=True):  # a disabled bar prints nothing
        pass
    assert "hidden" not in terminal.getvalue()


# ---------------------------------------------------------------------------- the whole quick report
@pytest.fixture(scope="module")
def user_reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-report")
    images, masks = make_folder(root, per_class=10, size=40)
    weights = save_weights("resnet18", root / "resnet18.pt")
    saved = torch.load(weights)
    base = dict(dataset="folder", data_root=str(images), model="resnet18", weights=str(weights), image_size=32,
                runs_root=str(root / "runs"), batch_size=16)
    out = {}
    for kind, extra in (("masks", {"mask_root": str(masks)}), ("no-masks", {})):
        res = report.build_report(quick=True, out_dir=root / kind, parameters={**base, **extra}, progress=False,
                                  stop_on_error=False, raise_on_error=False)
        cfg = runs.RunConfig.from_params(quick=True, **base, **extra)
        out[kind] = (root / kind, res, root / "runs" / f"benchmark-{cfg.run_name}")
    return out, weights, saved


def _errors(path):
    nb = json.loads(path.read_text())
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]


@pytest.mark.slow
@pytest.mark.xdist_group("notebooks")
@pytest.mark.parametrize("kind", ["masks", "no-masks"])
def test_quick_report_on_a_user_folder(user_reports, kind):
    reports, weights, saved = user_reports
    folder, res, bench_dir = reports[kind]
    failed = [(e["notebook"], e["error"]) for e in res["entries"] if not e["ok"]]
    assert not failed
    assert len(res["entries"]) == len(report.find_notebooks())
    for e in res["entries"]:
        assert not _errors(folder / e["notebook"]), e["notebook"]
    nb05 = (folder / "05_an8flower_benchmark.ipynb").read_text()
    if kind == "masks":
        assert "one split instead of the paper's five folds" in nb05 and "folder" in nb05
        assert "ours" in (bench_dir / "table1-folder.csv").read_text()
    else:
        assert "No ground-truth masks, so no localisation benchmark" in nb05
        assert not bench_dir.exists()
    cells = json.loads((folder / "02_relevant_features.ipynb").read_text())["cells"]
    mnist = [c for c in cells if "also_mnist and" in "".join(c["source"])]
    assert len(mnist) == 1 and mnist[0]["outputs"] == []           # the MNIST repetition is an8Flower's
    after = torch.load(weights)                                    # the user's file is untouched
    assert all(torch.equal(after[k], saved[k]) for k in saved)
