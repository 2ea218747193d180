"""Peak memory of scan + integrity on a task of 100,000 tiny images, with and without the
near-duplicate search.

The images (``--kind``): ``solid``, the default, 16x16 PNGs of one colour with one pixel
changed (a hard case for the search: few distinct hashes); ``drawn``, the demo's noisy
textures (stripes, checks, dots, gradients, solids) at ``--side`` pixels, a more typical set.

The scan and integrity stages run as the pipeline runs them (``run_inventory`` then
``run_integrity``, Parquet written) in a child process. Reported: the peak of the summed
proportional set size (PSS, from /proc) of that process and its decode workers, sampled every
20 ms, which counts memory the forked workers share with their parent once; and the kernel's
max RSS of the main process and of the largest worker (``getrusage``), each of which counts
the shared pages in full. The process imports the whole pipeline (torch included), as the
Dagster code location does; ``after_imports_pss_gib`` is that floor. The measurement runs
twice, in two fresh processes: with ``integrity.near_duplicates`` off, then on (the default:
perceptual hashes and thumbnails in the decode pass, then the indexed search), and reports
the ratio of the two integrity times.

    .venv/bin/python benchmarks/scale.py --files 100000
    .venv/bin/python benchmarks/scale.py --files 100000 --kind drawn --side 32

The same figure from outside, with GNU time (largest single process):

    .venv/bin/python benchmarks/scale.py --files 100000 --keep /tmp/scale   # writes the data
    /usr/bin/time -v .venv/bin/python benchmarks/scale.py --measure /tmp/scale
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

GIB = 2**30


def _solid(i: int, rng: np.random.Generator, side: int) -> Image.Image:
    """One random colour with pixel ``i`` changed: distinct files, about 100 bytes at 16 px."""
    arr = np.full((side, side, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    arr[i % side, (i // side) % side] = (i >> 8) % 256, i % 256, (i >> 16) % 256
    return Image.fromarray(arr)


def _drawn(i: int, rng: np.random.Generator, side: int) -> Image.Image:
    """The demo's texture ``i % 5`` with its noise (about 3 KB at 32 px)."""
    from mtmc_pipeline.demo import _draw

    return _draw(i % 5, rng, side)


KINDS = {"solid": _solid, "drawn": _drawn}


def write_task(task: Path, files: int, classes: int, kind: str = "solid", side: int = 16) -> None:
    """``files`` distinct ``side`` x ``side`` PNGs of ``kind`` in ``classes`` folders."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (task / f"class_{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        buf = io.BytesIO()
        KINDS[kind](i, rng, side).save(buf, format="PNG")
        (task / f"class_{i % classes:03d}" / f"{i:06d}.png").write_bytes(buf.getvalue())


def _pss_bytes(pid: int) -> int:
    """Proportional set size: each page shared by n processes counts 1/n to each."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0  # the process has just exited
    return next(
        int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith("Pss:")
    )


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from /proc."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            with contextlib.suppress(OSError):  # the task has just exited
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


class PeakMemory(threading.Thread):
    """Samples the summed PSS of this process tree (main + decode workers) every 20 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, sum(_pss_bytes(p) for p in _tree(os.getpid())))

    def stop(self) -> int:
        self._done.set()
        self.join()
        return self.peak


def measure(workdir: Path, near_duplicates: bool = True) -> dict[str, float]:
    """Run scan + integrity on ``workdir/data/scale``; report time and peak memory."""
    from mtmc_pipeline import stages
    from mtmc_pipeline.artifacts import TaskArtifacts
    from mtmc_pipeline.config import IntegrityConfig, ScanConfig

    task = workdir / "data" / "scale"
    art = TaskArtifacts(workdir / "artifacts", "scale")
    shutil.rmtree(art.dir, ignore_errors=True)
    baseline = _pss_bytes(os.getpid())  # the interpreter and the pipeline's imports
    sampler = PeakMemory()
    sampler.start()
    start = time.perf_counter()
    inventory = stages.run_inventory(task, art, ScanConfig())
    scanned = time.perf_counter()
    checked = stages.run_integrity(task, art, IntegrityConfig(near_duplicates=near_duplicates))
    done = time.perf_counter()
    peak = sampler.stop()
    kib = 1024  # ru_maxrss is in KiB on Linux
    main = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib
    return {
        "files": inventory.metadata["files"],
        "decoded": checked.metadata["decoded"],
        "ok": checked.metadata["ok"],
        "near_duplicate_groups": checked.metadata.get("near_duplicate_groups", 0),
        "scan_s": scanned - start,
        "integrity_s": done - scanned,
        "after_imports_pss_gib": baseline / GIB,
        "peak_total_pss_gib": peak / GIB,
        "main_max_rss_gib": main / GIB,
        "largest_worker_max_rss_gib": worker / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--kind", choices=sorted(KINDS), default="solid", help="the images")
    parser.add_argument("--side", type=int, default=16, help="image side in pixels")
    parser.add_argument("--keep", type=Path, help="write the data here and keep it")
    parser.add_argument("--measure", type=Path, help="only measure data written with --keep")
    parser.add_argument(
        "--no-near-duplicates", action="store_true", help="with --measure: search turned off"
    )
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, not args.no_near_duplicates)))
        return
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="mtmc-scale-"))
    try:
        start = time.perf_counter()
        write_task(workdir / "data" / "scale", args.files, args.classes, args.kind, args.side)
        print(f"wrote {args.files} {args.kind} images in {time.perf_counter() - start:.0f} s")
        if args.keep:
            return
        runs = {}
        for label, flag in (("off", ["--no-near-duplicates"]), ("on", [])):
            child = subprocess.run(
                [sys.executable, __file__, "--measure", str(workdir), *flag],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[label] = json.loads(child.stdout.strip().splitlines()[-1])
        for key in runs["on"]:
            values = [runs[label][key] for label in ("off", "on")]
            cells = [f"{v:12.3f}" if isinstance(v, float) else f"{v:>12}" for v in values]
            print(f"{key:28s} {cells[0]} {cells[1]}   (near duplicates off, on)")
        ratio = runs["on"]["integrity_s"] / runs["off"]["integrity_s"]
        print(f"{'integrity time on / off':28s} {ratio:12.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
