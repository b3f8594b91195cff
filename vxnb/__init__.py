"""vxnb: Visual Explanation by Interpretation (Oramas, Wang, Tuytelaars, ICLR 2019).

The pipeline is a chain of plain functions over plain data; see README.md and the
numbered notebooks for the tour:

    data  ->  models  ->  features (X, XᵀX, XᵀL)  ->  lasso (W)  ->  relevance
          ->  deconv / explain (heatmaps)  ->  interpret / evaluate
"""
__version__ = "0.1.0"
