"""MTMC pipeline core: folders of labelled images in, calibrated classifiers out.

This package holds the domain logic and never imports Dagster; the Dagster layer lives in
the top-level ``assets`` package and calls one function of this package per asset.
"""

__version__ = "0.1.0"
