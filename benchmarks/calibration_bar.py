"""Does the calibration table keep its promise on images nothing was fitted on?

For several seeds of two generated data sets, the pipeline's own pieces run as they do by
default: ``make_splits`` (stratified train / val / test at the default fractions), a model
fitted on train only, ``calibrate`` with the default settings fitted on val, and the realised
precision of every reachable (class, score kind, level) threshold on test. A linear model
(scikit-learn's logistic regression) stands in for the network: calibration sees only logits,
so this isolates what it promises from how good the classifier is.

- ``digits``: scikit-learn's 1,797 handwritten digits (about 36 test images per class);
- ``blobs``: ``make_classification``, 20,000 samples, 5 overlapping classes (about 800 test
  images per class, so levels select a few hundred test images).

The bar: a level may fall short on test by at most 0.05 when it selects 200 or more test
images, and by at most the one-sided 95% Clopper-Pearson slack on fewer.

    .venv/bin/python benchmarks/calibration_bar.py --seeds 5
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np
import pandas as pd
from sklearn.datasets import load_digits, make_classification
from sklearn.linear_model import LogisticRegression

from mtmc_pipeline.config import CalibrationConfig, SplitConfig
from mtmc_pipeline.data.splits import make_splits
from mtmc_pipeline.evaluation.calibrate import calibrate

MANY = 200  # test images from which the 0.05 tolerance applies on its own


def data_set(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if name == "digits":
        digits = load_digits()
        return digits.data / 16.0, digits.target
    x, y = make_classification(
        20_000, 20, n_informative=8, n_classes=5, class_sep=0.8, random_state=seed
    )
    return x, y


def one_run(name: str, seed: int) -> pd.DataFrame:
    x, y = data_set(name, seed)
    hashes = [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in x]
    usable = pd.DataFrame(
        {
            "relpath": [f"{label}/{i}.png" for i, label in enumerate(y)],
            "split_dir": "none",
            "class_name": [str(label) for label in y],
            "content_hash": hashes,
        }
    )
    manifest, classes = make_splits(usable, SplitConfig(seed=seed))
    index = {h: i for i, h in enumerate(hashes)}
    rows = manifest["content_hash"].map(index).to_numpy()
    labels = manifest["label"].to_numpy()
    train = (manifest["split"] == "train").to_numpy()
    model = LogisticRegression(max_iter=2000).fit(x[rows[train]], labels[train])
    preds = manifest.loc[~train, ["relpath", "split", "label"]].reset_index(drop=True)
    preds["logits"] = list(model.decision_function(x[rows[~train]]))
    cal = calibrate(preds, classes, CalibrationConfig())
    out = cal.realised
    assert out is not None, "the default split carves a test split"
    out = out[out["n"] > 0].copy()
    out["short"] = out["level"] - out["precision"]
    out["data"], out["seed"] = name, seed
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    start = time.perf_counter()
    runs = [one_run(name, s) for name in ("digits", "blobs") for s in range(args.seeds)]
    every = pd.concat(runs, ignore_index=True)
    print(
        "| data | seeds | (class, kind, level) checked | ≥ 200 test images | worst short "
        "there | flagged | worst short, fewer images (allowed) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, part in every.groupby("data", sort=False):
        many = part[part["n"] >= MANY]
        few = part[part["n"] < MANY]
        worst_few = few.loc[few["short"].idxmax()] if len(few) else None
        few_text = (
            f"{worst_few['short']:.3f} on {worst_few['n']} ({worst_few['allowed']:.3f})"
            if worst_few is not None
            else "–"
        )
        print(
            f"| {name} | {args.seeds} | {len(part)} | {len(many)} | "
            f"{many['short'].max() if len(many) else float('nan'):.3f} | "
            f"{int(part['flagged'].sum())} | {few_text} |"
        )
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
