"""Speed of the data stages against the bare minimum each one must do, in one run.

Three ratios on one synthetic task (``--files`` small JPEGs in the flat layout):

- scan: a bare ``os.scandir`` + ``stat`` walk of the tree / ``scan_task`` (>= 0.5 wanted);
- integrity: a plain Pillow full decode of the same files on all cores (a process pool that
  only opens and loads each image) / the integrity stage, which also hashes every file,
  sniffs formats, runs the cross-file checks and writes ``integrity.parquet`` (>= 0.8 wanted);
- incremental: the integrity stage after 10 files are added / the full stage (<= 0.05 wanted).

Each measurement is repeated (``--repeats``) with the contenders back to back, and the median
of the pairwise ratios is reported, for wall time and for CPU time (this process and its
worker processes): on a shared machine the CPU ratio is the steadier of the two. The files
are read once beforehand so every contender finds them in the page cache.

    .venv/bin/python benchmarks/data_stages.py --files 20000
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

from mtmc_pipeline import stages
from mtmc_pipeline.artifacts import TaskArtifacts
from mtmc_pipeline.config import IntegrityConfig, ScanConfig
from mtmc_pipeline.data.layout import scan_task


def write_task(task: Path, files: int, classes: int, side: int, seed: int = 0) -> list[Path]:
    """``files`` distinct JPEGs of side x side pixels spread over ``classes`` folders."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 160, side, dtype=np.float32)
    paths = []
    for i in range(files):
        path = task / f"class_{i % classes:03d}" / f"img_{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        # a smooth gradient plus noise: about 4 KB per 64 px JPEG, and no two files alike
        noise = rng.normal(0, 24, (side, side, 3))
        arr = np.clip(ramp[None, :, None] + ramp[:, None, None] / 2 + noise, 0, 255)
        arr = arr.astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def bare_walk(root: str) -> int:
    """The least a listing can do: scandir every folder and stat every file."""
    count, stack = 0, [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir():
                    stack.append(entry.path)
                else:
                    entry.stat()
                    count += 1
    return count


def _decode(path: str) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()
        return img.size


def plain_pillow(paths: list[str], workers: int) -> None:
    """Full decode of every file on all cores, nothing else."""
    with Pool(workers) as pool:
        pool.map(_decode, paths, chunksize=max(1, len(paths) // (workers * 8)))


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the decode workers)."""
    own, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    fn()
    return time.perf_counter() - wall, _cpu_seconds() - cpu


def ratio(a: list[tuple[float, float]], b: list[tuple[float, float]], which: int) -> float:
    """Median of the pairwise ratios a/b (pairs measured back to back)."""
    return statistics.median(x[which] / y[which] for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--side", type=int, default=64, help="image width and height")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mtmc-bench-"))
    task, art = workdir / "data" / "bench", TaskArtifacts(workdir / "artifacts", "bench")
    workers = len(os.sched_getaffinity(0))
    try:
        shutil.rmtree(task, ignore_errors=True)
        paths = [str(p) for p in write_task(task, args.files, args.classes, args.side)]
        plain_pillow(paths, workers)  # warm the page cache for everyone
        config = IntegrityConfig()  # workers: one per core, as in the pipeline

        walk, scan = [], []
        for _ in range(args.repeats):
            walk.append(timed(lambda: bare_walk(str(task))))
            scan.append(timed(lambda: scan_task(task)))

        stages.run_inventory(task, art, ScanConfig())
        pillow, full = [], []
        for _ in range(args.repeats):
            pillow.append(timed(lambda: plain_pillow(paths, workers)))
            art.integrity.unlink(missing_ok=True)
            full.append(timed(lambda: stages.run_integrity(task, art, config)))

        write_task(task / "class_000" / "added", 10, 1, args.side, seed=1)
        stages.run_inventory(task, art, ScanConfig())
        baseline = art.integrity.read_bytes()
        incremental, results = [], []
        for _ in range(args.repeats):
            art.integrity.write_bytes(baseline)  # the state before the 10 files were seen
            incremental.append(
                timed(lambda: results.append(stages.run_integrity(task, art, config)))
            )
        assert all(r.metadata["decoded"] == 10 for r in results)

        med = statistics.median
        print(f"files {args.files}, {args.side}x{args.side} JPEG, {workers} worker processes")
        print("                           wall s    CPU s   ratio (wall)  ratio (CPU)")
        rows = [
            ("bare scandir+stat walk", walk, None),
            ("scan_task", scan, (walk, scan)),
            ("plain Pillow full decode", pillow, None),
            ("integrity stage (full)", full, (pillow, full)),
            ("integrity after 10 new", incremental, (incremental, full)),
        ]
        for name, times, pair in rows:
            line = f"{name:25s} {med(t[0] for t in times):8.3f} {med(t[1] for t in times):8.3f}"
            if pair:
                line += f"   {ratio(*pair, 0):11.4f}  {ratio(*pair, 1):11.4f}"
            print(line)
        print("scan and integrity: speed ratios (baseline time / ours), higher is better;")
        print("incremental: time ratio (after 10 new / full), lower is better")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
