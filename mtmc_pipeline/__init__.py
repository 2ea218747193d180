"""MTMC pipeline core: folders of labelled images in, calibrated classifiers out.

This package holds the domain logic and never imports Dagster; the Dagster layer lives in
the top-level ``assets`` package and calls one function of this package per asset.
"""

import os

# OpenMP threads that spin while waiting starve every other process on a shared CPU (parallel
# Dagster steps, loader workers, other users): training ran 2.5x slower on 2 busy cores with
# the default. Set before torch is imported; an explicit OMP_WAIT_POLICY still wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
