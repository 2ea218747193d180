"""Load test of ``mtmc serve``: concurrent clients on loopback against a bare onnxruntime loop.

Starts ``mtmc serve`` as its own process on a free port and sends ``--requests`` requests from
``--clients`` concurrent clients, every ``--bad-every``-th one a bad input (not an image,
truncated, over ``--max-bytes``). Halfway through, a new export is swapped into the task's
``export/`` directory the way the export stage does it (one ``atomic_dir`` swap). Checks that
every good request got 200, every bad one a 4xx, and that the reload was picked up; reports
throughput and p50 / p99 latency of the good requests, and the images/s of a bare onnxruntime
loop (decode, resize, run) on the same images, one image at a time and in batches of 32.

Serves a copy of the exports of an artifact root (``--artifacts``, e.g. after ``make demo``),
with images from the task's data folder (``--data``).

    .venv/bin/python benchmarks/serve.py --artifacts artifacts --data data/demo/pattern
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.serving.export import SIDECAR_FILE, OnnxModel
from mtmc_pipeline.serving.predict import decode_image, expand_inputs

REPO = Path(__file__).resolve().parents[1]


def bare_loop(model: OnnxModel, paths: list[Path], batch: int) -> float:
    """Images/s of decode + resize + onnxruntime, ``batch`` images per run."""
    pre = model.preprocess
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        pixels = [decode_image(p, pre) for p in paths[i : i + batch]]
        model.logits(np.stack([p for p in pixels if not isinstance(p, str)]))
    return len(paths) / (time.perf_counter() - start)


def swap_in_new_export(export: Path, fingerprint: str) -> None:
    with af.atomic_dir(export) as tmp:
        for item in export.iterdir():
            shutil.copy2(item, tmp / item.name)
        sidecar = af.read_json(tmp / SIDECAR_FILE)
        af.write_json(tmp / SIDECAR_FILE, {**sidecar, "model_fingerprint": fingerprint})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifacts", default="artifacts", help="artifact root with exports")
    parser.add_argument("--data", default="data/demo/pattern", help="the task's data folder")
    parser.add_argument("--task", default="pattern")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--bad-every", type=int, default=10)
    parser.add_argument("--max-bytes", type=int, default=100_000)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    try:
        src, task_dir = Path(args.artifacts), Path(args.data)
        root = tmp / "served"  # a copy: the reload below rewrites an export
        shutil.copytree(src, root, ignore=shutil.ignore_patterns(".work"))
        export = root / args.task / "export"
        model = OnnxModel.load(export)
        paths = [
            p
            for p in sorted(expand_inputs([task_dir]))
            if not isinstance(decode_image(p, model.preprocess), str)
        ][:256]
        images = [p.read_bytes() for p in paths]
        bad = [b"not an image", images[0][: len(images[0]) // 3], b"\xff" * (args.max_bytes + 1)]
        loop_1 = bare_loop(model, paths, 1)
        loop_32 = bare_loop(model, paths, 32)

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "mtmc_pipeline.cli", "serve", "--artifacts", str(root)]
        cmd += ["--port", str(port), "--max-bytes", str(args.max_bytes), "--reload-seconds", "0.5"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).json()["ok"]:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        old_fp = httpx.get(f"{url}/tasks").json()[args.task]["model_fingerprint"]

        lock = threading.Lock()
        counter = iter(range(args.requests))
        latencies: list[float] = []
        outcomes = {"good_ok": 0, "good_failed": 0, "bad_4xx": 0, "bad_other": 0}
        fingerprints: set[str] = set()

        def client() -> None:
            with httpx.Client(timeout=60) as c:
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    is_bad = args.bad_every and i % args.bad_every == args.bad_every - 1
                    body = bad[i % len(bad)] if is_bad else images[i % len(images)]
                    t = time.perf_counter()
                    try:
                        r = c.post(f"{url}/predict", content=body)
                        status = r.status_code
                    except httpx.HTTPError:
                        status = 0
                    elapsed = time.perf_counter() - t
                    with lock:
                        if is_bad:
                            outcomes["bad_4xx" if 400 <= status < 500 else "bad_other"] += 1
                        elif status == 200:
                            outcomes["good_ok"] += 1
                            latencies.append(elapsed)
                            fingerprints.add(r.json()["tasks"][args.task]["model_fingerprint"])
                        else:
                            outcomes["good_failed"] += 1

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        while len(latencies) < args.requests // 2 and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        swap_in_new_export(export, "reloaded-model")
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        health = httpx.get(f"{url}/health").json()
        server.terminate()
        server.wait(10)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lat = np.array(latencies) * 1000
    print(
        f"task {args.task}: {len(images)} distinct images, {args.clients} clients, "
        f"{args.requests} requests (every {args.bad_every}th bad), {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("\n| measure | value |\n|---|---|")
    print(
        f"| good requests answered 200 | {outcomes['good_ok']} of "
        f"{outcomes['good_ok'] + outcomes['good_failed']} |"
    )
    print(
        f"| bad requests answered 4xx | {outcomes['bad_4xx']} of "
        f"{outcomes['bad_4xx'] + outcomes['bad_other']} |"
    )
    print(f"| served throughput, good requests/s | {outcomes['good_ok'] / wall:.1f} |")
    print(
        f"| latency p50 / p99, ms | {np.percentile(lat, 50):.1f} / {np.percentile(lat, 99):.1f} |"
    )
    print(f"| batches / largest batch | {health['batches']} / {health['largest_batch']} |")
    print(f"| hot reload: fingerprints answered | {sorted(fingerprints)} (was {old_fp}) |")
    print(f"| bare onnxruntime loop, images/s, batch 1 | {loop_1:.1f} |")
    print(f"| bare onnxruntime loop, images/s, batch 32 | {loop_32:.1f} |")


if __name__ == "__main__":
    main()
