"""Peak memory of scan + integrity on a task of 100,000 tiny images.

The scan and integrity stages run as the pipeline runs them (``run_inventory`` then
``run_integrity``, Parquet written) in a child process, and the kernel's own accounting
(``getrusage``) gives the peak resident memory of that process and of its largest decode
worker. Their sum bounds what the stages held at any one time.

    .venv/bin/python benchmarks/scale.py --files 100000

The same figure from outside, with GNU time (largest single process):

    .venv/bin/python benchmarks/scale.py --files 100000 --keep /tmp/scale   # writes the data
    /usr/bin/time -v .venv/bin/python benchmarks/scale.py --measure /tmp/scale
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

GIB = 2**30


def write_task(task: Path, files: int, classes: int) -> None:
    """``files`` distinct 16x16 PNGs (about 100 bytes each) in ``classes`` folders."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (task / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        arr = np.full((16, 16, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        arr[i % 16, (i // 16) % 16] = (i >> 8) % 256, i % 256, (i >> 16) % 256
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        (task / f"class_{i % classes:03d}" / f"{i:06d}.png").write_bytes(buf.getvalue())


def measure(workdir: Path) -> dict[str, float]:
    """Run scan + integrity on ``workdir/data/scale``; report time and peak memory."""
    from mtmc_pipeline import stages
    from mtmc_pipeline.artifacts import TaskArtifacts
    from mtmc_pipeline.config import IntegrityConfig, ScanConfig

    task = workdir / "data" / "scale"
    art = TaskArtifacts(workdir / "artifacts", "scale")
    shutil.rmtree(art.dir, ignore_errors=True)
    start = time.perf_counter()
    inventory = stages.run_inventory(task, art, ScanConfig())
    scanned = time.perf_counter()
    checked = stages.run_integrity(task, art, IntegrityConfig())
    done = time.perf_counter()
    kib = 1024  # ru_maxrss is in KiB on Linux
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib
    return {
        "files": inventory.metadata["files"],
        "decoded": checked.metadata["decoded"],
        "ok": checked.metadata["ok"],
        "scan_s": scanned - start,
        "integrity_s": done - scanned,
        "main_peak_gib": main / GIB,
        "largest_worker_peak_gib": worker / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--keep", type=Path, help="write the data here and keep it")
    parser.add_argument("--measure", type=Path, help="only measure data written with --keep")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="mtmc-scale-"))
    try:
        start = time.perf_counter()
        write_task(workdir / "data" / "scale", args.files, args.classes)
        print(f"wrote {args.files} images in {time.perf_counter() - start:.0f} s")
        if args.keep:
            return
        child = subprocess.run(
            [sys.executable, __file__, "--measure", str(workdir)],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(child.stdout.strip().splitlines()[-1])
        bound = result["main_peak_gib"] + result["largest_worker_peak_gib"]
        for key, value in result.items():
            print(f"{key:26s} {value:.3f}" if isinstance(value, float) else f"{key:26s} {value}")
        print(f"{'peak bound (sum) GiB':26s} {bound:.3f}   (limit 2 GiB)")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
