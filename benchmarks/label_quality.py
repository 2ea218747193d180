"""Label quality on the demo's planted problems: near copies found, flipped labels ranked.

Writes the demo's ``pattern`` task (5% of its training images filed under a wrong class, near
copies of training images in val and train; :func:`mtmc_pipeline.demo.pattern_label_problems`),
runs the pipeline's stages on it with the task's own settings plus
``label_quality.enabled``, and scores:

- near duplicates: a planted copy is found when integrity puts it in its source's group
  (recall); a pair of files in one group is right when both are the same planted picture
  (precision, over every pair of every group);
- suspected label errors: precision and recall of cleanlab's flags against the flipped
  files, and recall within the first 2 x (number flipped) ranks;
- the shipped model's validation accuracy (the demo's bar: >= 0.85 with the flips).

    .venv/bin/python benchmarks/label_quality.py [--folds 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import load_task_config
from mtmc_pipeline.demo import pattern_label_problems, write_pattern
from mtmc_pipeline.runtime import DeviceSettings
from mtmc_pipeline.stages.label_quality import TABLE_FILE, label_issues_dir, run_label_issues
from mtmc_pipeline.stages.reporting import run_evaluation
from mtmc_pipeline.stages.training import run_training


def near_duplicate_scores(integrity: pd.DataFrame, copies: dict[str, tuple[str, str]]) -> dict:
    """Recall of the planted copies and pairwise precision of the groups found."""
    group = integrity.set_index("relpath")["near_duplicate_group"]
    picture = {rel: src for rel, (src, _) in copies.items()}  # copy -> its source picture
    found = sum(
        pd.notna(group.get(c)) and group.get(c) == group.get(s) for c, (s, _) in copies.items()
    )
    pairs = right = 0
    for _, members in integrity.dropna(subset=["near_duplicate_group"]).groupby(
        "near_duplicate_group"
    ):
        for a, b in itertools.combinations(members["relpath"], 2):
            pairs += 1
            right += picture.get(a, a) == picture.get(b, b)
    return {
        "planted_copies": len(copies),
        "copies_found": int(found),
        "near_duplicate_recall": found / max(len(copies), 1),
        "groups": int(integrity["near_duplicate_group"].nunique()),
        "pairs_in_groups": pairs,
        "near_duplicate_precision": right / max(pairs, 1),
    }


def label_error_scores(table: pd.DataFrame, flipped: set[str]) -> dict:
    flagged = set(table.loc[table["is_label_issue"], "relpath"])
    top = set(table.head(2 * len(flipped))["relpath"])
    return {
        "flipped": len(flipped),
        "flagged": len(flagged),
        "flag_precision": len(flagged & flipped) / max(len(flagged), 1),
        "flag_recall": len(flagged & flipped) / max(len(flipped), 1),
        "recall_in_top_2x": len(top & flipped) / max(len(flipped), 1),
        "precision_in_top_2x": len(top & flipped) / max(len(top), 1),
    }


def _print(results: dict) -> dict:
    """Print the figures as they come (a run takes minutes); nothing is left to print."""
    for key, value in results.items():
        print(f"{key:26s} {value:.3f}" if isinstance(value, float) else f"{key:26s} {value}")
    return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="work here and keep the files")
    parser.add_argument(
        "--near-duplicates-only", action="store_true", help="only the data stages (seconds)"
    )
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="mtmc-label-quality-"))
    try:
        task = work / "data" / "pattern"
        write_pattern(task)
        problems = pattern_label_problems()
        cfg = load_task_config(task, {"label_quality": {"enabled": True, "folds": args.folds}})
        art = TaskArtifacts(work / "artifacts", "pattern")
        runtime = DeviceSettings("auto")
        results: dict = {"device": runtime.resolve().describe()}
        start = time.perf_counter()
        stages.run_inventory(task, art, cfg.scan)
        stages.run_integrity(task, art, cfg.integrity)
        stages.run_splits(art, cfg.split, task)
        stages.run_sampling(art, cfg.sampling)
        results |= near_duplicate_scores(pd.read_parquet(art.integrity), problems.near_copies)
        results["data_stages_s"] = time.perf_counter() - start
        results = _print(results)
        if args.near_duplicates_only:
            return

        start = time.perf_counter()
        run_training(task, art, cfg.train, DeviceSettings("auto"), lambda _: None)
        run_evaluation(task, art, cfg.evaluation, DeviceSettings("auto"))
        metrics = json.loads((art.evaluation_dir / "metrics.json").read_text("utf-8"))
        results["val_accuracy"] = metrics["by_split"]["val"]["accuracy"]
        results["model_s"] = time.perf_counter() - start
        results = _print(results)

        start = time.perf_counter()
        run_label_issues(task, art, cfg, runtime, lambda _: None)
        table = pd.read_parquet(label_issues_dir(art) / TABLE_FILE)
        results["label_issues_s"] = time.perf_counter() - start
        flipped = {new for new, _ in problems.flips.values()}
        results |= label_error_scores(table, flipped)
        _print(results)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
