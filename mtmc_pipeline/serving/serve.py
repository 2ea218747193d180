"""``mtmc serve``: every exported task of an artifact root behind one HTTP endpoint.

FastAPI on uvicorn: an ASGI server is what lets one process hold many requests open at once,
which dynamic batching needs, and FastAPI gives typed query parameters and an OpenAPI page for
free. Batching is a small asyncio queue (LitServe would add a framework for what is 40 lines
here, and it batches per model, not across the tasks of one image).

- ``POST /predict``: one image, as the raw request body or as the ``file`` field of a
  multipart form; ``?min_precision=0.9``. Returns, per task, the fields of ``mtmc predict``
  plus the model fingerprint.
- ``GET /tasks``: class names, calibrated levels, fingerprints, open-set threshold.
- ``GET /health``: ``ok``, the tasks served, requests and batches so far.

Requests wait in one queue; a worker takes up to ``max_batch`` of them (waiting at most
``max_wait_ms`` for more after the first) and runs every task's ONNX model once on the batch.
Each task's ``export/`` directory is polled every ``reload_seconds``: a new export is loaded in
full (its ONNX bytes checked against the SHA-256 in its sidecar) before it replaces the old one
in a single assignment, so a batch always sees one complete set of models.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from PIL import Image

from mtmc_pipeline.evaluation.calibrate import Calibrator
from mtmc_pipeline.evaluation.openset import OpenSet
from mtmc_pipeline.serving.export import SIDECAR_FILE, ExportError, OnnxModel
from mtmc_pipeline.serving.predict import describe
from mtmc_pipeline.training.loader import fit_square, load_rgb

EXPORT_DIR = "export"


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 89_478_485  # integrity.max_pixels' default (Pillow's own limit)
    reload_seconds: float = 2.0
    threads: int = 0  # onnxruntime intra-op threads per model; 0: one per core


@dataclass(frozen=True)
class ServedTask:
    """One task's export, loaded in full."""

    name: str
    model: OnnxModel
    calibrator: Calibrator
    openset: OpenSet
    stamp: tuple[int, int]  # the sidecar's (mtime_ns, inode) when it was read

    @property
    def fingerprint(self) -> str:
        return self.model.info["model_fingerprint"]

    def describe(self) -> dict[str, Any]:
        return {
            "class_names": self.model.info["class_names"],
            "levels": self.calibrator.levels,
            "model_fingerprint": self.fingerprint,
            "export_fingerprint": self.model.info["fingerprint"],
            "arch": self.model.info["arch"],
            "preprocessing": self.model.info["preprocessing"],
            "temperature": self.calibrator.temperature,
            "openset": self.openset.to_json(),
        }


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ino


def load_task(name: str, directory: Path, threads: int) -> ServedTask:
    stamp = _stamp(directory / SIDECAR_FILE)
    model = OnnxModel.load(directory, threads)
    source = str(directory / SIDECAR_FILE)
    try:
        calibrator = Calibrator.from_json(model.info["calibrator"], source)
        openset = OpenSet.from_json(model.info["openset"], source)
    except KeyError as e:
        raise ExportError(f"{source}: missing {e}") from e
    return ServedTask(name, model, calibrator, openset, stamp or (0, 0))


class Registry:
    """The tasks being served; replaced as a whole, never changed in place."""

    def __init__(self, root: Path, threads: int = 0) -> None:
        self.root = root
        self.threads = threads
        self.tasks: dict[str, ServedTask] = {}
        self.problems: dict[str, str] = {}
        self.reloads = 0

    def refresh(self) -> None:
        """Load exports that appeared or changed. A task whose export cannot be read right now
        (caught between the two renames of a swap, or mid-write) keeps its loaded model and is
        retried at the next poll."""
        current = dict(self.tasks)
        for sidecar in sorted(self.root.glob(f"*/{EXPORT_DIR}/{SIDECAR_FILE}")):
            name = sidecar.parent.parent.name
            old = current.get(name)
            if old is not None and _stamp(sidecar) == old.stamp:
                continue
            try:
                current[name] = load_task(name, sidecar.parent, self.threads)
                self.problems.pop(name, None)
                self.reloads += old is not None
            except (ExportError, ValueError) as e:
                self.problems[name] = str(e)
        self.tasks = current  # one assignment: a batch sees the old set or the new one


class BadImage(HTTPException):
    pass


def _why(error: Exception, otherwise: str) -> str:
    return "truncated image" if "truncat" in str(error).lower() else otherwise


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The upload as upright RGB, or a 4xx that says why not."""
    if not data:
        raise BadImage(400, "empty body: send the image bytes, or a multipart field 'file'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(413, f"decompression bomb: {e}") from None
    except Exception as e:
        raise BadImage(400, f"{_why(e, 'not an image')} ({type(e).__name__}: {e})") from None
    if w * h > max_pixels:
        raise BadImage(413, f"decompression bomb: {w} x {h} pixels, over max_pixels {max_pixels}")
    try:
        return load_rgb(io.BytesIO(data))
    except Exception as e:
        raise BadImage(400, f"{_why(e, 'corrupt image')} ({type(e).__name__}: {e})") from None


@dataclass
class _Job:
    image: Image.Image
    min_precision: float
    future: asyncio.Future[dict[str, Any]]


@dataclass
class Stats:
    requests: int = 0
    batches: int = 0
    rejected: int = 0
    largest_batch: int = 0
    started: float = field(default_factory=time.time)


def run_batch(tasks: dict[str, ServedTask], jobs: list[_Job]) -> list[dict[str, Any]]:
    """Every task's model once on the batch; one result per job."""
    results: list[dict[str, Any]] = [{} for _ in jobs]
    for name, task in tasks.items():
        pre = task.model.preprocess
        pixels = np.stack([fit_square(j.image, pre.img_size, pre.interpolation) for j in jobs])
        logits = task.model.logits(pixels)
        names = task.model.info["class_names"]
        for i, job in enumerate(jobs):
            p = job.min_precision
            row = describe(logits[i : i + 1], names, task.calibrator, task.openset, p)[0]
            results[i][name] = {**row, "model_fingerprint": task.fingerprint}
    return results


class Batcher:
    def __init__(self, registry: Registry, settings: ServeSettings, stats: Stats) -> None:
        self.registry = registry
        self.settings = settings
        self.stats = stats
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()

    async def submit(self, image: Image.Image, min_precision: float) -> dict[str, Any]:
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(image, min_precision, future))
        return await future

    async def run(self) -> None:
        wait = self.settings.max_wait_ms / 1000
        while True:
            jobs = [await self.queue.get()]
            deadline = time.monotonic() + wait
            while len(jobs) < self.settings.max_batch:
                left = deadline - time.monotonic()
                try:
                    jobs.append(await asyncio.wait_for(self.queue.get(), max(left, 0)))
                except TimeoutError:
                    break
            tasks = self.registry.tasks  # this batch's consistent set of models
            try:
                results = await asyncio.to_thread(run_batch, tasks, jobs)
            except Exception as e:  # never lose the waiting requests: answer each one
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(jobs))
            for job, result in zip(jobs, results, strict=True):
                if not job.future.done():
                    job.future.set_result(result)


def _check_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise BadImage(413, f"body of {declared} bytes is over max_bytes {limit}")


async def _upload(request: Request, limit: int) -> bytes:
    """The image bytes: the raw body, or the multipart field ``file``; 413 past ``limit``.

    A raw body is read chunk by chunk and refused as soon as it passes the limit. A multipart
    body must declare its length (the server never reads past it) before Starlette parses it.
    """
    _check_length(request, limit)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        if not request.headers.get("content-length", "").isdigit():
            raise BadImage(411, "multipart uploads need a Content-Length")
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadImage(400, "multipart form has no file field named 'file'")
        return await upload.read()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadImage(413, f"body over max_bytes {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(root: Path, settings: ServeSettings | None = None) -> FastAPI:
    settings = settings or ServeSettings()
    registry = Registry(root, settings.threads)
    stats = Stats()
    batcher = Batcher(registry, settings, stats)

    async def reload_loop() -> None:
        while True:
            await asyncio.sleep(settings.reload_seconds)
            await asyncio.to_thread(registry.refresh)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.refresh()
        workers = [asyncio.create_task(batcher.run()), asyncio.create_task(reload_loop())]
        try:
            yield
        finally:
            for worker in workers:
                worker.cancel()

    app = FastAPI(title="mtmc serve", lifespan=lifespan)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "ok": bool(registry.tasks),
            "tasks": sorted(registry.tasks),
            "problems": registry.problems,
            "requests": stats.requests,
            "rejected": stats.rejected,
            "batches": stats.batches,
            "largest_batch": stats.largest_batch,
            "reloads": registry.reloads,
            "uptime_s": round(time.time() - stats.started, 1),
        }

    @app.get("/tasks")
    async def tasks() -> dict[str, Any]:
        return {name: task.describe() for name, task in registry.tasks.items()}

    @app.post("/predict")
    async def predict(
        request: Request,
        min_precision: float = Query(0.9, gt=0, lt=1, description="Calibrated precision level"),
    ) -> dict[str, Any]:
        stats.requests += 1
        served = registry.tasks
        if not served:
            raise HTTPException(503, f"no exported task under {root} yet")
        top = min(max(t.calibrator.levels) for t in served.values())
        if min_precision > top:
            raise HTTPException(
                422, f"min_precision {min_precision}: above {top}, the highest calibrated level"
            )
        try:
            data = await _upload(request, settings.max_bytes)
            image = await asyncio.to_thread(open_image, data, settings.max_pixels)
        except BadImage:
            stats.rejected += 1
            raise
        results = await batcher.submit(image, min_precision)
        return {"min_precision": min_precision, "tasks": results}

    return app


def serve(root: Path, host: str, port: int, settings: ServeSettings) -> None:
    import uvicorn

    uvicorn.run(create_app(root, settings), host=host, port=port, log_level="warning")
