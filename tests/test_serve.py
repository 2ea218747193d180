"""``mtmc serve`` as a real process on a free loopback port, with real HTTP and onnxruntime."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from mtmc_pipeline import artifacts as af
from mtmc_pipeline.serving.export import SIDECAR_FILE
from mtmc_pipeline.serving.predict import Predictor, expand_inputs

REPO = Path(__file__).resolve().parents[1]
MAX_BYTES = 200_000
MAX_PIXELS = 250_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server on its own copy of the artifacts (the hot-reload test swaps an export)."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(exported, root, dirs_exist_ok=True)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mtmc_pipeline.cli", "serve", "--artifacts", str(root)]
    cmd += ["--port", str(port), "--max-bytes", str(MAX_BYTES), "--max-pixels", str(MAX_PIXELS)]
    cmd += ["--reload-seconds", "0.2", "--max-wait-ms", "20", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # start-up imports torch: slow on a busy machine
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).json()["ok"]:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail(f"server did not start: {proc.communicate()[0].decode()[-2000:]}")
    yield url, root
    proc.terminate()
    proc.wait(10)


def _val_images(tiny_root: Path) -> list[Path]:
    return sorted(expand_inputs([tiny_root / "pattern" / "val"]))[:12]


def _train_images(tiny_root: Path) -> list[Path]:
    """Every 4th training file, with the planted unreadable ones. Not val images: the
    thresholds are val logits, where a last-bit difference can flip a level either way."""
    files = sorted(expand_inputs([tiny_root / "pattern" / "train"]))
    planted = [p for p in files if p.name in ("空文件.jpg", "truncated.jpg", "readme.jpg")]
    return sorted(set(files[::4] + planted))


def test_served_results_equal_mtmc_predict(
    server: tuple[str, Path], exported: Path, tiny_root: Path
) -> None:
    url, _ = server
    files = _train_images(tiny_root)
    expected = Predictor(exported / "pattern").predict(files, min_precision=0.5)
    assert expected["error"].notna().sum() >= 3
    fingerprint = af.read_json(exported / "pattern" / "model" / "model.json")["fingerprint"]
    for path, row in zip(files, expected.itertuples(), strict=True):
        raw = httpx.post(f"{url}/predict?min_precision=0.5", content=path.read_bytes())
        multipart = httpx.post(
            f"{url}/predict", params={"min_precision": 0.5}, files={"file": path.read_bytes()}
        )
        if isinstance(row.error, str):  # unreadable for predict: a 4xx with a reason here
            assert raw.status_code == multipart.status_code == 400, path
            continue
        assert raw.status_code == multipart.status_code == 200
        assert raw.json() == multipart.json()
        got = raw.json()["tasks"]["pattern"]
        assert got["label"] == row.label
        assert got["labels_at_min_precision"] == row.labels_at_min_precision
        assert got["unknown"] == row.unknown
        assert got["model_fingerprint"] == fingerprint
        for key in ("softmax_prob", "temperature_prob", "calibrated_confidence", "unknown_score"):
            assert got[key] == pytest.approx(getattr(row, key), abs=1e-5)

    tasks = httpx.get(f"{url}/tasks").json()
    assert tasks["pattern"]["class_names"] == ["条纹", "格子", "波点", "渐变色", "纯色"]
    assert tasks["pattern"]["model_fingerprint"] == fingerprint


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_inputs_get_a_4xx_with_a_reason_and_the_service_keeps_serving(
    server: tuple[str, Path], tiny_root: Path
) -> None:
    url, _ = server
    good = _val_images(tiny_root)[0].read_bytes()
    noise = np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    big = io.BytesIO()
    Image.fromarray(noise).save(big, "PNG")  # ~270 kB: over --max-bytes
    cases = {
        "not an image": (b"hello, not an image", 400),
        "truncated": (good[: len(good) // 3], 400),
        "decompression bomb": (_png((600, 600)), 413),  # 360 000 pixels > --max-pixels
        "max_bytes": (big.getvalue(), 413),
        "empty": (b"", 400),
    }
    for what, (body, status) in cases.items():
        r = httpx.post(f"{url}/predict", content=body)
        assert r.status_code == status, (what, r.text)
        assert what.split()[0] in r.json()["detail"], (what, r.text)
    assert httpx.post(f"{url}/predict?min_precision=1.5", content=good).status_code == 422
    assert httpx.post(f"{url}/predict", content=good).status_code == 200
    assert httpx.get(f"{url}/health").json()["rejected"] >= len(cases)


def test_concurrent_requests_are_batched(server: tuple[str, Path], tiny_root: Path) -> None:
    url, _ = server
    files = _val_images(tiny_root)
    before = httpx.get(f"{url}/health").json()
    statuses: list[int] = []

    def client(path: Path) -> None:
        with httpx.Client() as c:
            for _ in range(2):
                statuses.append(c.post(f"{url}/predict", content=path.read_bytes()).status_code)

    threads = [threading.Thread(target=client, args=(p,)) for p in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(f"{url}/health").json()
    assert statuses == [200] * 2 * len(files)
    assert after["batches"] - before["batches"] < 2 * len(files)
    assert after["largest_batch"] > 1


def test_a_hot_reload_under_load_loses_no_request(
    server: tuple[str, Path], tiny_root: Path
) -> None:
    url, root = server
    export = root / "pattern" / "export"
    old = af.read_json(export / SIDECAR_FILE)["model_fingerprint"]
    image = _val_images(tiny_root)[0].read_bytes()
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client() as c:
            while not stop.is_set():
                r = c.post(f"{url}/predict", content=image)
                fp = r.json()["tasks"]["pattern"]["model_fingerprint"] if r.is_success else ""
                seen.append((r.status_code, fp))

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(0.5)
    with af.atomic_dir(export) as tmp:  # how the export stage swaps a promoted model in
        for item in export.iterdir():
            shutil.copy2(item, tmp / item.name)
        sidecar = af.read_json(tmp / SIDECAR_FILE)
        af.write_json(tmp / SIDECAR_FILE, {**sidecar, "model_fingerprint": "new-model"})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (not seen or seen[-1][1] != "new-model"):
        time.sleep(0.1)
    time.sleep(0.3)
    stop.set()
    for w in workers:
        w.join()
    assert all(status == 200 for status, _ in seen)
    fingerprints = [fp for _, fp in seen]
    assert set(fingerprints) == {old, "new-model"}
    switch = fingerprints.index("new-model")
    assert old not in fingerprints[switch + 3 :]  # 3 requests may have been in flight
    assert httpx.get(f"{url}/tasks").json()["pattern"]["model_fingerprint"] == "new-model"
    assert httpx.get(f"{url}/health").json()["reloads"] >= 1
