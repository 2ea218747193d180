"""The label_issues stage (opt-in): k fold models, out-of-fold probabilities, a review list.

Off unless ``label_quality.enabled``. Each fold model trains like the model stage (the same
``train`` settings, balanced by the same ``sampling`` strategy) and checkpoints after every
epoch; each finished fold's held-out probabilities are saved under the task's work directory,
keyed by the stage's input fingerprint, so a killed run resumes with the fold it was training.

The out-of-fold probabilities do not feed calibration: they come from k other models, each
trained on (k - 1) / k of the images, so their confidence is not the shipped model's, and a
threshold or temperature fitted on them would describe models nobody uses. Calibration keeps
fitting the shipped model's own validation outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import TaskArtifacts, fingerprint, stored_fingerprint
from mtmc_pipeline.config import TaskConfig
from mtmc_pipeline.data.sampling import sampling_weights
from mtmc_pipeline.data.splits import read_manifest
from mtmc_pipeline.plots import thumbnails_png
from mtmc_pipeline.runtime import DeviceSettings, Runtime
from mtmc_pipeline.stages.common import (
    Markdown,
    StageResult,
    record_elapsed,
    stage_fingerprint,
    upstream_fingerprint,
)
from mtmc_pipeline.stages.prepare import near_duplicate_preview
from mtmc_pipeline.stages.reporting import embed_pngs

TABLE_FILE = "label_issues.parquet"
SUGGESTIONS_FILE = "review-suggestions.csv"
SUSPECTS_PNG = "suspects.png"
NEAR_DUPLICATES_PNG = "near_duplicates.png"
SHOWN_SUSPECTS = 12  # thumbnails of noisy pictures make large PNGs; the UI inlines them
OFF_FILE = "off.json"
OFF_NOTE = "Off: set label_quality.enabled: true to train the fold models and rank label errors."


def label_issues_dir(art: TaskArtifacts) -> Path:
    return art.dir / "label_issues"


def run_label_issues(
    task_dir: Path,
    art: TaskArtifacts,
    config: TaskConfig,
    device: DeviceSettings,
    log: Callable[[str], None] = print,
) -> StageResult:
    """Rank suspected label errors, or reuse the stored ranking: torch is imported only to
    train the fold models."""
    start = time.perf_counter()
    lq = config.label_quality
    fp = stage_fingerprint(
        "label_issues",
        upstream_fingerprint(art.splits, "splits"),
        lq.model_dump(),
        config.train.model_dump(),
        config.sampling.model_dump(),
        device.precision,
    )
    out = label_issues_dir(art)
    if not lq.enabled:
        return _off(out, fp)
    reused = stored_fingerprint(out / TABLE_FILE) == fp
    if not reused:
        from mtmc_pipeline.evaluation import label_issues as li

        manifest, classes = read_manifest(art.splits)
        pool = li.fold_pool(manifest, lq.folds, config.train.seed)
        runtime = device.resolve()
        probabilities = _out_of_fold(
            task_dir, art, config, runtime, log, manifest, pool, classes, fp
        )
        table = li.rank_label_issues(pool, classes, probabilities, lq.method, lq.filter_by)
        found = li.summary(table, lq.folds, lq.method, lq.filter_by)
        integrity = af.read_parquet(art.integrity)
        with af.atomic_dir(out) as tmp:
            af.write_parquet(tmp / TABLE_FILE, table, fp, meta=found)
            li.review_suggestions(table).to_csv(tmp / SUGGESTIONS_FILE, index=False)
            af.write_bytes(tmp / SUSPECTS_PNG, suspects_png(table, task_dir))
            preview = near_duplicate_preview(integrity, task_dir)
            if "near_duplicate_thumbnails" in preview:
                af.write_bytes(tmp / NEAR_DUPLICATES_PNG, preview["near_duplicate_thumbnails"].data)
            af.write_text(tmp / "report.md", report_markdown(found, table, preview))
        for f in range(lq.folds):
            (art.work_dir / _fold_file(f)).unlink(missing_ok=True)
    table = af.read_parquet(out / TABLE_FILE)
    found = af.parquet_meta(out / TABLE_FILE)
    md: dict[str, Any] = {
        **{k: v for k, v in found.items() if k != "issues_by_given_label"},
        "review_list": table[table["is_label_issue"]]
        .drop(columns=["probabilities", "is_label_issue"])
        .head(50),
        "report": Markdown(embed_pngs((out / "report.md").read_text("utf-8"), out)),
        "path": str(out),
    }
    record_elapsed(md, start)
    return StageResult(fp, reused, md)


def _off(out: Path, fp: str) -> StageResult:
    """Turned off: the stage's output is a note saying so (earlier results would be stale)."""
    reused = stored_fingerprint(out / OFF_FILE) == fp
    if not reused:
        with af.atomic_dir(out) as tmp:
            af.write_json(tmp / OFF_FILE, {"enabled": False, "fingerprint": fp})
            af.write_text(tmp / "report.md", f"# Label quality\n\n{OFF_NOTE}\n")
    return StageResult(fp, reused, {"enabled": False, "note": OFF_NOTE, "path": str(out)})


def _fold_file(fold: int) -> str:
    return f"label-fold-{fold}.parquet"


def _out_of_fold(
    task_dir: Path,
    art: TaskArtifacts,
    config: TaskConfig,
    runtime: Runtime,
    log: Callable[[str], None],
    manifest: pd.DataFrame,
    pool: pd.DataFrame,
    classes: list[str],
    fp: str,
) -> np.ndarray:
    """Each pool image's probabilities from the fold model that did not train on it (the
    task's own recipe, its ``auto`` settings resolved as the model stage resolves them)."""
    from mtmc_pipeline.evaluation import label_issues as li
    from mtmc_pipeline.stages.training import task_recipe
    from mtmc_pipeline.training import train as training_loop
    from mtmc_pipeline.training.checkpoint import Checkpoint
    from mtmc_pipeline.training.loader import DecodedCache
    from mtmc_pipeline.training.recipe import DeviceProfile

    device = DeviceProfile.from_runtime(runtime)
    recipe = task_recipe(art, manifest, len(classes), config.train, device, log).config
    probabilities = np.zeros((len(pool), len(classes)), dtype=np.float32)
    folds = config.label_quality.folds
    for fold in range(folds):
        held = (pool["label_fold"] == fold).to_numpy()
        fold_fp = fingerprint(fp, "fold", fold)
        saved = art.work_dir / _fold_file(fold)
        if stored_fingerprint(saved) == fold_fp:
            stored = af.read_parquet(saved)
            probabilities[held] = np.stack(stored["probabilities"].to_numpy())
            log(f"label_issues: fold {fold + 1}/{folds} reused")
            continue
        rows = li.fold_manifest(pool, fold)
        weights, _ = sampling_weights(rows, classes, config.sampling)
        log(f"label_issues: training fold model {fold + 1}/{folds} on {int((~held).sum())} images")
        checkpoint = Checkpoint(art.work_dir / f"label-fold-{fold}.safetensors", fold_fp)
        cache_root = art.work_dir / "cache"
        result = training_loop.train_model(
            rows, classes, weights, task_dir, cache_root, recipe, runtime, log, checkpoint
        )
        cache = DecodedCache(cache_root, recipe.img_size, result.preprocess.interpolation)
        probs = li.held_out_probabilities(
            result.model, result.preprocess, pool[held], cache, runtime
        )
        probabilities[held] = probs
        frame = pd.DataFrame({"relpath": pool.loc[held, "relpath"], "probabilities": list(probs)})
        af.write_parquet(saved, frame, fold_fp)
        checkpoint.clear()
    return probabilities


def suspects_png(table: pd.DataFrame, task_dir: Path, per_row: int = 6) -> bytes:
    """Thumbnails of the most suspect images, captioned with given -> suggested label."""
    top = table[table["is_label_issue"]].head(SHOWN_SUSPECTS)
    cells = [
        (
            str(task_dir / r.relpath),
            f"#{r.rank} p={r.self_confidence:.2f}\n{r.given_label}\n→ {r.suggested_label}",
        )
        for r in top.itertuples()
    ]
    rows = [cells[i : i + per_row] for i in range(0, len(cells), per_row)]
    return thumbnails_png(rows, f"suspected label errors (first {len(cells)})")


def report_markdown(found: dict[str, Any], table: pd.DataFrame, preview: dict[str, Any]) -> str:
    flagged = table[table["is_label_issue"]]
    lines = [
        "# Label quality",
        "",
        f"{found['label_issues']} of {found['images']} train and val images "
        f"({found['label_issue_share']:.1%}) are suspected label errors: cleanlab "
        f"`find_label_issues` (filter_by `{found['filter_by']}`) on out-of-fold probabilities "
        f"from {found['folds']} fold models, ranked by `{found['method']}`. Out-of-fold "
        f"accuracy: {found['out_of_fold_accuracy']:.4f}.",
        "",
        f"To act on them, copy rows of `{SUGGESTIONS_FILE}` into the task's `review.csv` "
        "(action `relabel` or `drop`); the next run honours it.",
        "",
        "## Suspected label errors",
        "",
        f"![suspected label errors]({SUSPECTS_PNG})" if len(flagged) else "None found.",
        "",
        "| rank | relpath | split | given | suggested | self-confidence |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.rank} | {r.relpath} | {r.split} | {r.given_label} | {r.suggested_label} | "
        f"{r.self_confidence:.3f} |"
        for r in flagged.head(50).itertuples()
    ]
    groups = preview.get("near_duplicate_groups", 0)
    lines += ["", "## Near-duplicate groups (integrity)", ""]
    if groups:
        lines += [
            f"{groups} groups of near copies, {preview['near_duplicate_files']} files.",
            "",
            f"![near-duplicate groups]({NEAR_DUPLICATES_PNG})",
        ]
    else:
        lines.append("None found.")
    return "\n".join(lines) + "\n"
