"""A `gpu` pool limit of N gives N different GPUs: each training leases its own."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from assets.resources import TorchDevice
from mtmc_pipeline.runtime import DeviceSettings, lease_gpu


def test_concurrent_leases_get_different_gpus(tmp_path: Path) -> None:
    with lease_gpu(3, tmp_path) as a, lease_gpu(3, tmp_path) as b, lease_gpu(3, tmp_path) as c:
        assert sorted([a, b, c]) == [0, 1, 2]
    with lease_gpu(3, tmp_path) as again:
        assert again == 0  # all were released


def test_a_lease_held_by_another_process_is_skipped(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from mtmc_pipeline.runtime import lease_gpu\n"
            f"with lease_gpu(2, Path({str(tmp_path)!r})) as i:\n"
            "    print(i, flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "0"
        with lease_gpu(2, tmp_path) as mine:
            assert mine == 1
    finally:
        holder.communicate("")
    with lease_gpu(2, tmp_path) as freed:  # the holder exited: its lock is gone
        assert freed == 0


def test_more_trainings_than_gpus_wait_for_a_free_one(tmp_path: Path) -> None:
    got: list[int] = []

    def train() -> None:
        with lease_gpu(1, tmp_path, poll_s=0.05) as index:
            got.append(index)

    with lease_gpu(1, tmp_path) as first:
        waiter = threading.Thread(target=train)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive() and not got  # still waiting
    waiter.join(5)
    assert first == 0 and got == [0]


def test_the_resource_passes_the_lease_directory_unresolved(tmp_path: Path) -> None:
    settings = TorchDevice(device="auto", num_workers=2).settings(tmp_path / "gpu-leases")
    assert settings == DeviceSettings("auto", "auto", False, 2, tmp_path / "gpu-leases")
    assert TorchDevice(device="cpu").settings().resolve().describe() == "cpu, fp32"
