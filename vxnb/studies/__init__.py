"""Studies: run folders and the analyses that read them (the only layer that knows run folders).

The relevance study (ablation, class reconstruction) lives in :mod:`vxnb.studies.runs`,
the an8Flower benchmark (Table 1) in :mod:`vxnb.studies.benchmark`, the sanity checks of
notebook 06 in :mod:`vxnb.studies.sanity_study`.
"""
