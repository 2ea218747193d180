"""The ``mtmc`` command: demo data, calibrated prediction, and a summary of the latest results."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pandas as pd

from mtmc_pipeline.artifacts import TaskArtifacts, leaderboard_path, write_parquet, write_text


def default_artifacts() -> Path:
    return Path(os.environ.get("MTMC_ARTIFACTS", "artifacts"))


def cmd_demo_data(args: argparse.Namespace) -> int:
    from mtmc_pipeline.demo import write_demo

    written = write_demo(Path(args.dir), small=args.small)
    for task, n in written.items():
        print(f"{task}: {n} files written (unchanged files left as they were)")
    print(f"demo data in {args.dir}")
    return 0


def write_table(df: pd.DataFrame, out: Path) -> None:
    """Parquet keeps list columns as lists; CSV writes them as JSON arrays (UTF-8)."""
    if out.suffix == ".parquet":
        write_parquet(out, df)
        return
    as_text = df.copy()
    for col in as_text.columns:
        if as_text[col].map(lambda v: isinstance(v, list)).any():
            as_text[col] = as_text[col].map(
                lambda v: json.dumps(v, ensure_ascii=False) if isinstance(v, list) else v
            )
    write_text(out, as_text.to_csv(index=False))


def cmd_predict(args: argparse.Namespace) -> int:
    from mtmc_pipeline.evaluation.calibrate import CALIBRATOR_FILE
    from mtmc_pipeline.runtime import resolve_runtime
    from mtmc_pipeline.serving.predict import Predictor, expand_inputs
    from mtmc_pipeline.training.models import MODEL_FILE

    if args.group:
        return _predict_group(args)
    art = TaskArtifacts(Path(args.artifacts), args.task)
    out = Path(args.out)
    problem = None
    if out.suffix not in (".csv", ".parquet"):
        problem = f"--out {out}: use a .csv or .parquet file name"
    elif not (art.model_dir / MODEL_FILE).is_file():
        problem = f"no trained model for task {args.task!r} under {art.dir}"
    elif not (art.calibration_dir / CALIBRATOR_FILE).is_file():
        problem = f"task {args.task!r} has no calibrator under {art.dir}"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(
            art.dir,
            resolve_runtime(args.device),
            unknown_score=args.unknown_score,
            false_reject_rate=args.false_reject_rate,
        )
        df = predictor.predict(
            expand_inputs(args.inputs), args.min_precision, args.batch_size, args.use_lower_bound
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_table(df, out)
    errors = int(df["error"].notna().sum())
    confident = int(
        df["labels_at_min_precision"].map(lambda v: isinstance(v, list) and len(v) > 0).sum()
    )
    print(
        f"{len(df)} predictions written to {out}: {confident} with a class at precision "
        f"{'lower bound ' if args.use_lower_bound else ''}>= {args.min_precision}, "
        f"{errors} unreadable files"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from mtmc_pipeline.serving.serve import ServeSettings, serve

    settings = ServeSettings(
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        reload_seconds=args.reload_seconds,
        threads=args.threads,
    )
    print(f"serving the exports under {args.artifacts} on http://{args.host}:{args.port}")
    serve(Path(args.artifacts), args.host, args.port, settings)
    return 0


def _predict_group(args: argparse.Namespace) -> int:
    """``--group``: every member task of a shared-backbone group, one forward pass per batch."""
    from mtmc_pipeline.artifacts import UnsafePathError, group_dir
    from mtmc_pipeline.runtime import resolve_runtime
    from mtmc_pipeline.serving.group_predict import GroupPredictor
    from mtmc_pipeline.serving.predict import expand_inputs

    out = Path(args.out)
    try:
        if out.suffix not in (".csv", ".parquet"):
            raise ValueError(f"--out {out}: use a .csv or .parquet file name")
        joint = group_dir(Path(args.artifacts), args.group) / "model" / "model.json"
        if not joint.is_file():
            raise ValueError(f"no trained shared model for group {args.group!r} at {joint.parent}")
        predictor = GroupPredictor(Path(args.artifacts), args.group, resolve_runtime(args.device))
        df = predictor.predict(expand_inputs(args.inputs), args.min_precision, args.batch_size)
    except (ValueError, UnsafePathError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_table(df, out)
    images = df["path"].nunique()
    print(
        f"{len(df)} predictions ({images} images x {len(predictor.tasks)} tasks: "
        f"{', '.join(predictor.tasks)}) written to {out}"
    )
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    root = Path(args.artifacts)
    path = leaderboard_path(root)
    if not path.is_file():
        print(f"no leaderboard at {path} yet: materialize the pipeline first", file=sys.stderr)
        return 1
    board = pd.read_parquet(path)
    for row in board.itertuples():
        art = TaskArtifacts(root, row.task)
        print(f"\n== {row.task}: {row.classes} classes, {row.usable_images}/{row.images} usable")
        print(
            f"   model {row.model}; on {row.split}: accuracy {row.accuracy:.4f}, "
            f"macro F1 {row.macro_f1:.4f}, mAP {row.mAP:.4f}"
        )
        scaling = (  # multi-label tasks: one Platt scaling per class, no temperature
            "per-class Platt" if pd.isna(row.temperature) else f"temperature {row.temperature:.3f}"
        )
        print(
            f"   calibration: {scaling}, "
            f"ECE on {row.split} {row.ece_before:.4f} -> {row.ece_after:.4f}"
        )
        print(f"   report:      {art.evaluation_dir / 'report.md'}")
        print(f"   thresholds:  {art.calibration_dir / 'report.md'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """The model stage of one task, from its splits and sampling weights; torchrun launches
    it once per process (``torchrun --nproc-per-node N -m mtmc_pipeline.cli train ...``)."""
    import yaml

    from mtmc_pipeline.config import ConfigError, load_task_config
    from mtmc_pipeline.data.splits import TaskDataError
    from mtmc_pipeline.errors import DeviceError, PretrainedUnavailableError
    from mtmc_pipeline.stages.training import run_training_process

    task_dir = Path(args.task_dir)
    art = TaskArtifacts(Path(args.artifacts), task_dir.name)
    overrides: dict[str, object] = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set {item!r}: use NAME=VALUE, e.g. epochs=3", file=sys.stderr)
            return 2
        overrides[name.removeprefix("train.")] = yaml.safe_load(value)
    missing = [p for p in (art.splits, art.sampling_weights) if not p.is_file()]
    if missing:
        print(
            f"error: {missing[0]} is missing: materialise the task's splits and "
            "sampling_weights first",
            file=sys.stderr,
        )
        return 2
    device = {"device": args.device, "precision": args.precision}
    try:
        config = load_task_config(task_dir, {"train": overrides}).train
        result = run_training_process(task_dir, art, config, device)
    except (ConfigError, TaskDataError, DeviceError, PretrainedUnavailableError) as e:
        print(f"error: {task_dir}: {e}", file=sys.stderr)
        return 2
    if result is not None:
        state = "reused" if result.reused else "written"
        print(f"model bundle {state}: {art.model_dir}")
    return 0


def cmd_config_reference(args: argparse.Namespace) -> int:
    from mtmc_pipeline.config import reference_markdown

    print(reference_markdown(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtmc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the deterministic demo data set")
    p.add_argument("dir", help="where to write it, e.g. data/demo")
    p.add_argument("--small", action="store_true", help="a tiny version for tests")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("predict", help="classify images with calibrated confidences")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="task name (folder under the artifact root)")
    which.add_argument(
        "--group", help="shared-backbone group (mtmc.yaml): all its tasks in one pass per image"
    )
    p.add_argument("--out", required=True, help="output .csv or .parquet")
    p.add_argument(
        "--min-precision",
        type=float,
        default=0.9,
        help="list every class whose calibrated confidence reaches this precision level",
    )
    p.add_argument(
        "--use-lower-bound",
        action="store_true",
        help="require the 95%% lower bound of the precision (precision_lower), not the estimate",
    )
    p.add_argument("--artifacts", default=str(default_artifacts()), help="artifact root")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument(
        "--batch-size", type=int, help="images per forward pass (default 8 on CPU, 128 on GPU)"
    )
    p.add_argument(
        "--unknown-score",
        choices=("energy", "max_logit"),
        default="energy",
        help="open-set score (export.unknown_score)",
    )
    p.add_argument(
        "--false-reject-rate",
        type=float,
        default=0.05,
        help="share of known val images the unknown threshold rejects (export.false_reject_rate)",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve", help="serve every exported task over HTTP (POST /predict)")
    p.add_argument("--artifacts", default=str(default_artifacts()), help="artifact root")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="most requests in one batch")
    p.add_argument(
        "--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests"
    )
    p.add_argument(
        "--max-bytes", type=int, default=20 * 1024 * 1024, help="largest upload accepted"
    )
    p.add_argument(
        "--max-pixels", type=int, default=89_478_485, help="larger images are decompression bombs"
    )
    p.add_argument(
        "--reload-seconds", type=float, default=2.0, help="how often new exports are looked for"
    )
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: per core)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("summary", help="print each task's metrics and where its reports are")
    p.add_argument("--artifacts", default=str(default_artifacts()), help="artifact root")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "train", help="train one task's model (alone or as one of torchrun's processes)"
    )
    p.add_argument("task_dir", help="the task folder, e.g. data/demo/pattern")
    p.add_argument("--artifacts", default=str(default_artifacts()), help="artifact root")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a train setting over task.yaml, e.g. --set epochs=3 (repeatable)",
    )
    p.add_argument(
        "--device", default="auto", help="auto (torchrun: one GPU per process), cpu, cuda:N"
    )
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("config-reference", help="print every setting as Markdown")
    p.set_defaults(func=cmd_config_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
