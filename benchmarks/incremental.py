"""Only stale pieces rerun: what a forced full run costs when nothing, or one task, changed.

Runs the CI command ``dagster asset materialize -m assets.definitions --select '*'`` on the
demo data in a fresh instance and artifact root:

1. the first run (everything computed);
2. the same command again with nothing changed (median of ``--repeats`` runs), interleaved
   with a no-op Dagster graph of the same shape through the same CLI and executor
   (``benchmarks/noop_graph.py``): the rerun's overhead is the ratio of the two;
3. after adding ``--images`` new images to one task, once per task.

Each run is timed as a whole process (start-up included, as a CI job sees it), and the
instance's records say which assets were recomputed and which reused their stored output.

    .venv/bin/python benchmarks/incremental.py            # the full demo (several minutes)
    .venv/bin/python benchmarks/incremental.py --small    # the tiny test data (a quick look)
    .venv/bin/python benchmarks/incremental.py --workdir W --overhead  # only step 2, on the
                                                    # data and artifacts an earlier run left in W
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import dagster as dg
from PIL import Image, UnidentifiedImageError

from assets.factory import task_key
from mtmc_pipeline.demo import write_demo

REPO = Path(__file__).resolve().parents[1]
DAGSTER = Path(sys.executable).with_name("dagster")


def add_images(task_dir: Path, count: int) -> list[Path]:
    """``count`` new images: mirrored copies of the task's first readable images."""
    added: list[Path] = []
    for src in sorted(p for p in task_dir.rglob("*") if p.suffix in {".png", ".jpg"}):
        if len(added) == count:
            break
        try:
            with Image.open(src) as img:
                mirrored = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                dst = src.with_name(f"new_{len(added)}_{src.name}")
                mirrored.save(dst)
        except (OSError, UnidentifiedImageError):
            continue  # the demo's planted broken files
        added.append(dst)
    return added


class Bench:
    def __init__(self, workdir: Path):
        self.data, self.artifacts, self.home = (workdir / n for n in ("data", "artifacts", "home"))
        self.home.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / ".dagster" / "dagster.yaml", self.home / "dagster.yaml")

    def materialize(
        self, module: str = "assets.definitions", run_config: Path | None = None
    ) -> tuple[float, dict[str, Step]]:
        """Wall seconds of the CI command, and what each asset's step did."""
        env = {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "MTMC_DATA_ROOT": str(self.data),
            "MTMC_ARTIFACTS": str(self.artifacts),
        }
        cmd = [str(DAGSTER), "asset", "materialize", "-m", module, "--select", "*"]
        if run_config is not None:
            cmd += ["--config", str(run_config)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return seconds, self.last_run() if module == "assets.definitions" else {}

    def last_run(self) -> dict[str, Step]:
        """From the instance's records: each materialisation's ``reused`` and ``elapsed_s``."""
        with dg.DagsterInstance.from_config(str(self.home)) as instance:
            [run] = instance.get_runs(limit=1)
            events = instance.all_logs(
                run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
            )
        out = {}
        for e in events:
            mat = e.asset_materialization
            md = mat.metadata
            elapsed = md["elapsed_s"].value if "elapsed_s" in md else 0.0
            out[mat.asset_key.to_user_string()] = Step(bool(md["reused"].value), float(elapsed))
        return out


class Step(NamedTuple):
    reused: bool
    elapsed_s: float


def recomputed(steps: dict[str, Step]) -> str:
    """Recomputed assets per group, e.g. ``digits 7, summary 1``."""
    groups = Counter(k.split("/")[0] for k, step in steps.items() if not step.reused)
    return ", ".join(f"{g} {n}" for g, n in sorted(groups.items())) or "none"


def compute_seconds(steps: dict[str, Step], group: str) -> float:
    return sum(s.elapsed_s for k, s in steps.items() if k.startswith(f"{group}/"))


def no_change_against_noop(bench: Bench, repeats: int) -> tuple[float, float]:
    """Medians of the no-change rerun and of the no-op graph, run alternately so that both
    see the same machine load."""
    reruns, noop = [], []
    for _ in range(repeats):
        seconds, steps = bench.materialize()
        assert recomputed(steps) == "none", f"unchanged assets were recomputed: {steps}"
        reruns.append(seconds)
        noop.append(bench.materialize("benchmarks.noop_graph")[0])
    print(
        "no-change reruns:",
        [round(s, 1) for s in reruns],
        "no-op graph:",
        [round(s, 1) for s in noop],
    )
    return statistics.median(reruns), statistics.median(noop)


def overhead(bench: Bench, repeats: int) -> None:
    rerun, noop = no_change_against_noop(bench, repeats)
    print(f"no change {rerun:.1f} s, no-op graph {noop:.1f} s: {rerun / noop:.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the tiny test data set")
    parser.add_argument("--images", type=int, default=5, help="images added to one task")
    parser.add_argument("--repeats", type=int, default=3, help="no-change runs (median)")
    parser.add_argument("--workdir", type=Path, help="keep data, artifacts and instance here")
    parser.add_argument(
        "--overhead", action="store_true", help="only the no-change reruns against the no-op graph"
    )
    args = parser.parse_args(argv)
    if args.overhead:
        overhead(Bench(args.workdir), args.repeats)
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        bench = Bench(workdir)
        tasks = sorted(write_demo(bench.data, small=args.small))
        rows = []
        first, steps = bench.materialize()
        rows.append(("first run", first, recomputed(steps)))
        shares = {t: compute_seconds(steps, t) for t in tasks}

        no_change, noop = no_change_against_noop(bench, args.repeats)
        rows.append(("no change", no_change, "none"))
        rows.append(("no-op graph, same shape", noop, "(does nothing)"))

        # a retrain on a few more images can score below the served export, whose promotion
        # check would then fail the run: promote every export (safe promotion is tested)
        forced = workdir / "promote.yaml"
        ops = {f"{task_key(t)}__export": {"config": {"promotion": {"force": True}}} for t in tasks}
        forced.write_text(json.dumps({"ops": ops}))  # JSON is YAML
        for task in tasks:
            add_images(bench.data / task, args.images)
            seconds, steps = bench.materialize(run_config=forced)
            rows.append((f"+{args.images} images in {task}", seconds, recomputed(steps)))

    print("| forced `--select '*'` | wall s | × first run | recomputed assets |")
    print("|---|---|---|---|")
    for name, seconds, what in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / first:.2f} | {what} |")
    print(f"\nNo-change rerun / no-op graph: {no_change / noop:.2f}x")
    total = sum(shares.values())
    print("\nThe first run's compute (the steps' own elapsed_s, start-up excluded):")
    print(", ".join(f"{t} {s:.0f} s ({s / total:.0%})" for t, s in shares.items()))


if __name__ == "__main__":
    main()
