"""The pipeline the kill-safety test (tests/test_faults.py) runs in a subprocess, phase by phase:
render → train → extract → μ-lasso → one benchmark fold → a table → an HTML export, with the
smallest settings that exercise each phase (the whole quick report takes ~10 min on 2 cores;
this takes ~15 s). ``python tests/_fault_driver.py ROOT``; ``VXNB_FAULT=<point>`` kills it."""
import sys
from pathlib import Path

import nbformat
import pandas as pd

from vxnb import report
from vxnb.studies import runs
from vxnb.studies import benchmark as B
from vxnb.utils import atomic_path

root = Path(sys.argv[1])
cfg = runs.RunConfig(dataset="an8flower", variant="single-6c", size=32, epochs=1, train_limit=60, quick=True,
                     data_root=str(root / "data"), runs_root=str(root / "runs"))
data = runs.load_data(cfg, progress=False)
model, meta = runs.get_model(cfg, data=data, progress=False)
feats = runs.get_features(cfg, model, "train", data=data, progress=False)
path = runs.get_lasso_path(cfg, feats, mu_max=5.0)
fold = B.run_fold(cfg, methods=("deconv_gb", "ours"), n_test_images=12, occlusion=False, progress=False)
table = pd.DataFrame({"method": list(fold["auc"]), "auc": list(fold["auc"].values()),
                      "n_relevant_mu1": int((path.coef(1.0) != 0).sum())})
runs.save_table(cfg, "fault-table", table)
nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# fault test"),
                                     nbformat.v4.new_code_cell("1 + 1")])
(root / "pages").mkdir(exist_ok=True)
with atomic_path(root / "pages" / "page.ipynb") as tmp:  # a concurrent run may be reading it
    nbformat.write(nb, str(tmp))
report.export_html(root / "pages" / "page.ipynb", root / "pages" / "page.html", static_url=None)
print("finished")
