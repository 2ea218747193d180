"""Data stages: inventory, integrity, split manifest and sampling weights."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.artifacts import TaskArtifacts, stored_fingerprint
from mtmc_pipeline.config import (
    IntegrityConfig,
    SamplingConfig,
    ScanConfig,
    SplitConfig,
    load_task_config,
)
from mtmc_pipeline.data.integrity import (
    DEFAULT_SEVERITY,
    INTEGRITY_SCHEMA,
    ISSUES,
    KEY_COLUMNS,
    PER_FILE_COLUMNS,
    Limits,
    check_integrity,
    usable_rows,
)
from mtmc_pipeline.data.labels import attach_labels
from mtmc_pipeline.data.layout import listing_fingerprint, scan_task
from mtmc_pipeline.data.multilabel_sampling import multilabel_sampling_weights
from mtmc_pipeline.data.multilabel_splits import (
    is_multilabel,
    label_split_counts,
    make_multilabel_splits,
    multilabel_schema,
)
from mtmc_pipeline.data.review import Review, apply_review, read_review
from mtmc_pipeline.data.sampling import sampling_weights
from mtmc_pipeline.data.splits import (
    TaskDataError,
    class_split_counts,
    leaking_hashes,
    make_splits,
    manifest_fingerprint,
    read_manifest,
    splits_schema,
)
from mtmc_pipeline.plots import bar_png, thumbnails_png
from mtmc_pipeline.stages.common import (
    CheckOutcome,
    Png,
    StageResult,
    record_elapsed,
    stage_fingerprint,
    upstream_fingerprint,
)


def observe_raw(task_dir: Path, config: ScanConfig | None = None) -> tuple[str, dict[str, Any]]:
    """The raw folder's data version (listing fingerprint) and a few counts, without decoding."""
    scan = scan_task(task_dir, config)
    inv = scan.inventory
    return listing_fingerprint(task_dir, scan), {
        "files": len(inv),
        "bytes": int(inv["bytes"].clip(0).sum()),
    }


def run_inventory(task_dir: Path, art: TaskArtifacts, config: ScanConfig) -> StageResult:
    start = time.perf_counter()
    scan = scan_task(task_dir, config)
    inv = scan.inventory
    if inv.empty:
        problems = "; ".join(
            f"{p['relpath']}: {p['problem']} ({p['detail']})" for p in scan.problems
        )
        raise TaskDataError(
            f"task folder {task_dir} has no image files "
            f"(extensions {', '.join(config.extensions)}); skipped: {dict(scan.skipped) or 'none'}"
            + (f"; could not walk: {problems}" if problems else "")
        )
    fp = stage_fingerprint("inventory", listing_fingerprint(task_dir, scan), config.model_dump())
    reused = stored_fingerprint(art.inventory) == fp
    if not reused:
        af.write_parquet(art.inventory, inv, fp, meta=scan.summary())
    md: dict[str, Any] = {
        "files": len(inv),
        "classes": inv["class_name"].nunique(),
        "layout": scan.layout,
        "skipped": dict(scan.skipped),
        "walk_problems": len(scan.problems),
        "class_by_split_dir": inv.pivot_table(
            index="class_name", columns="split_dir", values="relpath", aggfunc="count", fill_value=0
        ),
        "path": str(art.inventory),
    }
    if scan.problems:
        md["walk_problem_list"] = pd.DataFrame(scan.problems).head(20)
    record_elapsed(md, start, len(inv), "files")
    return StageResult(fp, reused, md)


def run_integrity(task_dir: Path, art: TaskArtifacts, config: IntegrityConfig) -> StageResult:
    start = time.perf_counter()
    fp = stage_fingerprint(
        "integrity", upstream_fingerprint(art.inventory, "inventory"), config.model_dump()
    )
    reused = stored_fingerprint(art.integrity) == fp
    if reused:
        df = af.read_parquet(art.integrity)
        summary = af.parquet_meta(art.integrity)
        summary["decoded"] = 0
    else:
        inventory = af.read_parquet(art.inventory)
        folders = af.parquet_meta(art.inventory).get("class_folders", [])
        task = load_task_config(task_dir)
        multilabel = task.kind == "multilabel"
        df, summary = check_integrity(
            task_dir, inventory, config, _previous_integrity(art, config), folders, multilabel
        )
        schema = INTEGRITY_SCHEMA
        if multilabel:
            df, findings = attach_labels(df, task_dir, task.classes, summary["severity"])
            summary["kind"] = "multilabel"
            if findings is not None:  # labels.csv: its findings and its declared classes
                summary["task_findings"], summary["classes"] = findings, task.classes
            schema = schema.append(pa.field("labels", pa.list_(pa.string())))
        af.write_parquet(
            art.integrity,
            df,
            fp,
            meta={k: v for k, v in summary.items() if k != "decoded"},
            schema=schema,
        )
    md = integrity_metadata(df, summary)
    md.update(near_duplicate_preview(df, task_dir))
    md["path"] = str(art.integrity)
    record_elapsed(md, start, summary.get("decoded", 0), "decoded")
    return StageResult(fp, reused, md, integrity_checks(df, config, task_dir))


def _previous_integrity(art: TaskArtifacts, config: IntegrityConfig) -> pd.DataFrame | None:
    """The last integrity table, when its per-file findings were made under the same limits."""
    if not art.integrity.exists():
        return None
    if af.parquet_meta(art.integrity).get("limits") != asdict(Limits.of(config)):
        return None
    return af.read_parquet(art.integrity, columns=KEY_COLUMNS + PER_FILE_COLUMNS)


def integrity_metadata(df: pd.DataFrame, summary: dict[str, Any]) -> dict[str, Any]:
    """What the UI shows: counts per issue code, the first problem files, class x split."""
    severity = summary.get("severity") or DEFAULT_SEVERITY
    flagged = df[df["status"] != "ok"]
    codes = pd.Series([c for issues in flagged["issues"] for c in issues], dtype=object)
    counts = codes.value_counts().rename_axis("issue").rename("files").reset_index()
    counts.insert(1, "severity", counts["issue"].map(severity))
    counts["meaning"] = counts["issue"].map(lambda c: ISSUES[c][1] if c in ISSUES else "")
    counts = counts.sort_values(["severity", "files"], ascending=[True, False])
    problems = flagged.sort_values(["status", "relpath"])  # errors first
    problems = problems[["relpath", "class_name", "status", "issues", "detail"]].assign(
        issues=problems["issues"].map(", ".join)
    )
    usable = df["status"] != "error"
    by_split = df[usable].groupby(["class_name", "split_dir"]).size().unstack(fill_value=0)
    errors = df[~usable].groupby("class_name").size()
    class_table = by_split.reindex(sorted(df["class_name"].unique()), fill_value=0)
    class_table["errors"] = errors.reindex(class_table.index, fill_value=0)
    md: dict[str, Any] = {
        "files": len(df),
        "ok": int((df["status"] == "ok").sum()),
        "warn": int((df["status"] == "warn").sum()),
        "error": int((df["status"] == "error").sum()),
        "decoded": int(summary.get("decoded", 0)),
        "reused_findings": int(summary.get("reused", 0)),
        "issue_counts": counts.set_index("issue"),
        "problem_files": problems.head(25),
        "usable_by_class_and_split": class_table.rename_axis("class_name"),
    }
    findings = summary.get("task_findings", [])
    if findings:
        md["task_findings"] = pd.DataFrame(findings)
    return md


def near_duplicate_preview(
    df: pd.DataFrame, task_dir: Path, max_groups: int = 8, max_members: int = 5
) -> dict[str, Any]:
    """The near-duplicate groups as a count, a table and thumbnails (first groups only)."""
    members = df[df["near_duplicate_group"].notna()]
    if members.empty:
        return {"near_duplicate_groups": 0}
    members = members.sort_values(["near_duplicate_group", "relpath"])
    groups = members["near_duplicate_group"].unique()
    shown = members[members["near_duplicate_group"].isin(groups[:max_groups])]
    rows = [
        [
            (str(task_dir / r.relpath), f"{r.split_dir}/{r.class_name}\n{r.status}")
            for r in g.head(max_members).itertuples()
        ]
        for _, g in shown.groupby("near_duplicate_group")
    ]
    table = members[["near_duplicate_group", "relpath", "class_name", "status", "issues"]]
    return {
        "near_duplicate_groups": len(groups),
        "near_duplicate_files": len(members),
        "near_duplicate_table": table.assign(issues=table["issues"].map(", ".join)).head(50),
        "near_duplicate_thumbnails": Png(
            thumbnails_png(rows, f"near-duplicate groups (first {len(rows)} of {len(groups)})")
        ),
    }


def integrity_checks(
    df: pd.DataFrame, config: IntegrityConfig, task_dir: Path
) -> dict[str, CheckOutcome]:
    n = max(len(df), 1)
    errors = int((df["status"] == "error").sum())
    fraction = errors / n
    leaks = df[df["issues"].map(lambda c: "cross_split_leak" in c or "near_duplicate_leak" in c)]
    return {
        "error_fraction": CheckOutcome(
            fraction <= config.max_error_fraction,
            f"{task_dir}: {errors} of {len(df)} files ({fraction:.1%}) have errors; "
            f"allowed {config.max_error_fraction:.1%} (integrity.max_error_fraction)",
            "error",
            {"error_files": errors, "error_fraction": fraction},
        ),
        "no_split_leakage": CheckOutcome(
            leaks.empty,
            f"{len(leaks)} files have identical bytes or a near copy in an earlier split folder"
            + (" (they are excluded)" if len(leaks) else ""),
            "warn",
            {"leaking_files": leaks["relpath"].head(20).tolist()},
        ),
    }


def _splits_settings(path: Path) -> dict[str, Any] | None:
    return af.parquet_meta(path).get("split_config") if path.exists() else None


def run_splits(
    art: TaskArtifacts,
    config: SplitConfig,
    task_dir: Path | None = None,
    leader: TaskArtifacts | None = None,
) -> StageResult:
    """The split manifest of the usable images, after the task's ``review.csv`` (when
    ``task_dir`` is given) has dropped and relabelled the images it names.

    ``leader``: the first member of this task's shared group, whose splits this task takes
    for the images both have (its manifest's version is then an input of this stage).
    """
    start = time.perf_counter()
    listed = af.read_parquet(art.inventory, columns=["relpath", "class_name"])
    inventory_classes = sorted(listed["class_name"].unique())
    review = (
        read_review(task_dir, set(listed["relpath"]), inventory_classes) if task_dir else Review()
    )
    leader_version = (
        [upstream_fingerprint(leader.splits, f"{leader.task}/splits")] if leader else []
    )
    fp = stage_fingerprint(
        "splits",
        upstream_fingerprint(art.integrity, "integrity"),
        config.model_dump(),
        review.digest,
        *leader_version,
    )
    reused = stored_fingerprint(art.splits) == fp
    if reused:
        manifest, classes = read_manifest(art.splits)
        content = upstream_fingerprint(art.splits, "splits")
        changed = af.parquet_meta(art.splits).get("review", {})
    else:
        integrity = af.read_parquet(art.integrity)
        same_settings = _splits_settings(art.splits) == config.model_dump()
        previous = (
            af.read_parquet(art.splits, columns=["content_hash", "split", "fold"])
            if same_settings
            else None
        )
        leader_manifest = (
            af.read_parquet(leader.splits, columns=["content_hash", "split"]) if leader else None
        )
        usable, changed = apply_review(usable_rows(integrity), review)
        if "labels" in integrity.columns:
            declared = af.parquet_meta(art.integrity).get("classes")
            manifest, classes = make_multilabel_splits(
                usable, config, previous, art.task, declared, leader_manifest
            )
            schema = multilabel_schema(classes)
        else:
            manifest, classes = make_splits(usable, config, previous, art.task, leader_manifest)
            schema = splits_schema(classes)
        content = manifest_fingerprint(manifest, classes)
        af.write_parquet(
            art.splits,
            manifest,
            fp,
            meta={"split_config": config.model_dump(), "review": changed},
            schema=schema,
            data_version=content,
        )
    multilabel = is_multilabel(manifest)
    md: dict[str, Any] = {
        "images": len(manifest),
        "classes": len(classes),
        "by_split": manifest["split"].value_counts().to_dict(),
        "class_by_split": label_split_counts(manifest, classes)
        if multilabel
        else class_split_counts(manifest),
        "review_dropped": changed.get("dropped", 0),
        "review_relabelled": changed.get("relabelled", 0),
        "path": str(art.splits),
    }
    if review.findings:
        md["review_findings"] = pd.DataFrame(review.findings)
    record_elapsed(md, start)
    if multilabel:
        inventory_classes = classes  # labels, not folders, name the classes
    return StageResult(content, reused, md, splits_checks(manifest, classes, inventory_classes))


def splits_checks(
    manifest: pd.DataFrame, classes: list[str], inventory_classes: list[str]
) -> dict[str, CheckOutcome]:
    train = manifest[manifest["split"] == "train"]
    if is_multilabel(manifest):
        in_train = {classes[i] for ix in train["labels"] for i in ix}
    else:
        in_train = set(train["class_name"])
    missing = [c for c in inventory_classes if c not in in_train]
    leaks = leaking_hashes(manifest)
    return {
        "every_class_in_train": CheckOutcome(
            not missing,
            "every class folder has training images"
            if not missing
            else f"classes without usable training images (left out of the model): {missing}",
            "warn",
            {"missing_classes": missing},
        ),
        "no_hash_in_two_splits": CheckOutcome(
            len(leaks) == 0,
            f"{len(leaks)} identical images appear in more than one split",
            "error",
            {"leaking_hashes": [str(h) for h in leaks[:20]]},
        ),
    }


def run_sampling(art: TaskArtifacts, config: SamplingConfig) -> StageResult:
    start = time.perf_counter()
    fp = stage_fingerprint(
        "sampling_weights", upstream_fingerprint(art.splits, "splits"), config.model_dump()
    )
    reused = stored_fingerprint(art.sampling_weights) == fp
    if reused:
        table = af.read_parquet(art.class_weights)
    else:
        manifest, classes = read_manifest(art.splits)
        combine = multilabel_sampling_weights if is_multilabel(manifest) else sampling_weights
        weights, table = combine(manifest, classes, config)
        af.write_parquet(art.class_weights, table, fp)
        meta = {"strategy": config.strategy, "sampling": config.model_dump()}
        af.write_parquet(art.sampling_weights, weights, fp, meta=meta)
    shares = table.set_index("class_name")[["share_before", "expected_share"]]
    shares.columns = ["before (share of train images)", f"after ({config.strategy})"]
    md = {
        "strategy": config.strategy,
        "class_table": table,
        "class_shares_plot": Png(bar_png(shares, "class shares of training draws")),
        "path": str(art.sampling_weights),
    }
    record_elapsed(md, start)
    return StageResult(fp, reused, md)
