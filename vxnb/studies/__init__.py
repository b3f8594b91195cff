"""Studies: run folders and the analyses that read them (the only layer that knows run folders).

- :mod:`vxnb.studies.runs`: ``RunConfig``, run folders, ``get_model`` / ``get_features`` /
  ``get_lasso_path``, the relevance study, and the registry of artifact kinds;
- :mod:`vxnb.studies.table1`: Table 1 of the paper (its methods and rows, the paper's numbers,
  formatting) and ``BenchmarkResult``;
- :mod:`vxnb.studies.benchmark`: the an8Flower benchmark's protocol (folds, heatmaps, scores);
- :mod:`vxnb.studies.sanity_study`: the sanity checks of notebook 06;
- :mod:`vxnb.studies.counterfactual`: the counterfactual interpretation study (issue 27): causal
  specificity and part precision of the features each selector picks, over folds and seeds;
- :mod:`vxnb.studies.gc`: removing what no current key reaches (``vxnb gc``).

Imports inside point down that list, bottom first: ``runs`` and ``table1``, then ``benchmark``,
``sanity_study``/``counterfactual``, ``gc`` (a contract in ``pyproject.toml``).
"""
