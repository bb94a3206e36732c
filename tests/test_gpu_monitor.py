"""gpu_monitor: the exporter against a fake NVML, against the real pynvml on a GPU-less host,
and ``inferq gpu-monitor`` as a process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gpu_monitor import GpuExporter, GpuPoller
from tests.conftest import ROOT, free_port, wait_for

GIB = 1024**3
NO_DRIVER = "no NVIDIA driver/GPU found"
GPU_FAMILIES = [
    "inferq_gpu_utilization_percent",
    "inferq_gpu_memory_used_bytes",
    "inferq_gpu_memory_free_bytes",
    "inferq_gpu_memory_total_bytes",
    "inferq_gpu_power_watts",
    "inferq_gpu_temperature_celsius",
    "inferq_gpu_sm_clock_hertz",
    "inferq_gpu_ecc_uncorrected_errors",
]


@dataclass
class FakeGpu:
    """One GPU of the fake NVML, in NVML's own units (bytes, milliwatts, MHz)."""

    uuid: str
    name: str
    util: int
    mem_total: int
    mem_used: int
    power_mw: int
    temp_c: int
    sm_mhz: int
    ecc: int
    raises: dict[str, Exception] = field(default_factory=dict)


class FakeNvml:
    """Test double of the ``pynvml`` module: the functions, constants and error classes
    that gpu_monitor uses, serving GPUs from a list. ``FakeGpu.raises`` maps a function
    name to the error it raises for that GPU; ``init_failures`` makes the first nvmlInit
    calls fail as on a host without a driver; ``count_error`` fails the device list."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLError_LibraryNotFound = pynvml.NVMLError_LibraryNotFound
    NVMLError_DriverNotLoaded = pynvml.NVMLError_DriverNotLoaded
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC

    def __init__(self, gpus: list[FakeGpu], init_failures: int = 0):
        self.gpus = gpus
        self.init_failures = init_failures
        self.count_error: Exception | None = None
        self.init_calls = 0
        self.shutdown_calls = 0
        self.initialised = False

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_failures:
            self.init_failures -= 1
            raise pynvml.NVMLError_LibraryNotFound()
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        assert self.initialised
        if self.count_error is not None:
            raise self.count_error
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self._value(self.gpus[index], "nvmlDeviceGetHandleByIndex", self.gpus[index])

    def nvmlDeviceGetUUID(self, gpu: FakeGpu) -> str:
        return gpu.uuid

    def nvmlDeviceGetName(self, gpu: FakeGpu) -> bytes:
        return gpu.name.encode()  # pynvml 13 returns bytes

    def nvmlDeviceGetUtilizationRates(self, gpu: FakeGpu) -> Any:
        return self._value(gpu, "nvmlDeviceGetUtilizationRates", SimpleNamespace(gpu=gpu.util, memory=5))

    def nvmlDeviceGetMemoryInfo(self, gpu: FakeGpu) -> Any:
        info = SimpleNamespace(total=gpu.mem_total, used=gpu.mem_used, free=gpu.mem_total - gpu.mem_used)
        return self._value(gpu, "nvmlDeviceGetMemoryInfo", info)

    def nvmlDeviceGetPowerUsage(self, gpu: FakeGpu) -> int:
        return self._value(gpu, "nvmlDeviceGetPowerUsage", gpu.power_mw)

    def nvmlDeviceGetTemperature(self, gpu: FakeGpu, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._value(gpu, "nvmlDeviceGetTemperature", gpu.temp_c)

    def nvmlDeviceGetClockInfo(self, gpu: FakeGpu, clock: int) -> int:
        assert clock == pynvml.NVML_CLOCK_SM
        return self._value(gpu, "nvmlDeviceGetClockInfo", gpu.sm_mhz)

    def nvmlDeviceGetTotalEccErrors(self, gpu: FakeGpu, error_type: int, counter: int) -> int:
        assert (error_type, counter) == (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
        return self._value(gpu, "nvmlDeviceGetTotalEccErrors", gpu.ecc)

    def _value(self, gpu: FakeGpu, function: str, value: Any) -> Any:
        assert self.initialised
        if function in gpu.raises:
            raise gpu.raises[function]
        return value


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu(uuid="GPU-aaaa", name="NVIDIA A100-SXM4-80GB", util=37, mem_total=80 * GIB,
                mem_used=10 * GIB, power_mw=215_500, temp_c=61, sm_mhz=1410, ecc=0),
        FakeGpu(uuid="GPU-bbbb", name="NVIDIA H100 80GB HBM3", util=99, mem_total=80 * GIB,
                mem_used=70 * GIB, power_mw=650_250, temp_c=74, sm_mhz=1980, ecc=3),
    ]


@contextmanager
def serving(nvml: Any, interval: float = 0.05) -> Iterator[tuple[GpuPoller, str]]:
    poller = GpuPoller(nvml, interval)
    exporter = GpuExporter(poller, "127.0.0.1", free_port())
    exporter.start()
    try:
        yield poller, f"http://127.0.0.1:{exporter.port}"
    finally:
        exporter.close()


def scrape(base: str) -> tuple[str, dict[str, dict[tuple[tuple[str, str], ...], float]]]:
    """The /metrics text, and each sample name -> {sorted labels: value}."""
    resp = httpx.get(f"{base}/metrics", timeout=5)
    assert resp.status_code == 200
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return resp.text, samples


def labels(index: int, uuid: str, name: str) -> tuple[tuple[str, str], ...]:
    return (("gpu", str(index)), ("name", name), ("uuid", uuid))


def gpu_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("gpu_monitor") and r.levelno >= logging.WARNING]


def host_has_nvidia_driver() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


def test_two_fake_gpus_scraped_over_http() -> None:
    with serving(FakeNvml(two_gpus())) as (poller, base):
        wait_for(lambda: poller.snapshot.up, 5, "first poll")
        text, samples = scrape(base)
        health = httpx.get(f"{base}/health", timeout=5)
        assert httpx.get(f"{base}/other", timeout=5).status_code == 404

    for name in ["inferq_gpu_up", "inferq_gpu_count", "inferq_gpu_poll_errors_total", *GPU_FAMILIES]:
        assert f"\n{name}" in text, name
    assert "# TYPE inferq_gpu_poll_errors_total counter" in text
    assert samples["inferq_gpu_up"] == {(): 1.0}
    assert samples["inferq_gpu_count"] == {(): 2.0}
    assert samples["inferq_gpu_poll_errors_total"] == {(): 0.0}
    a100 = labels(0, "GPU-aaaa", "NVIDIA A100-SXM4-80GB")
    h100 = labels(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3")
    expected = {
        "inferq_gpu_utilization_percent": (37.0, 99.0),
        "inferq_gpu_memory_used_bytes": (10 * GIB, 70 * GIB),
        "inferq_gpu_memory_free_bytes": (70 * GIB, 10 * GIB),
        "inferq_gpu_memory_total_bytes": (80 * GIB, 80 * GIB),
        "inferq_gpu_power_watts": (215.5, 650.25),
        "inferq_gpu_temperature_celsius": (61.0, 74.0),
        "inferq_gpu_sm_clock_hertz": (1.41e9, 1.98e9),
        "inferq_gpu_ecc_uncorrected_errors": (0.0, 3.0),
    }
    for name, (first, second) in expected.items():
        assert samples[name] == {a100: first, h100: second}, name
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "nvml": True, "gpus": 2}


def test_unsupported_field_and_failing_gpu_keep_serving(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gpu_monitor")
    gpus = two_gpus()
    gpus[0].raises = {"nvmlDeviceGetTotalEccErrors": pynvml.NVMLError_NotSupported(),
                      "nvmlDeviceGetPowerUsage": pynvml.NVMLError_NotSupported()}
    gpus[1].raises = {"nvmlDeviceGetMemoryInfo": pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)}
    with serving(FakeNvml(gpus)) as (poller, base):
        wait_for(lambda: poller.snapshot.poll_errors >= 2, 5, "two failed polls of GPU 1")
        _, first = scrape(base)
        polls = poller.polls
        wait_for(lambda: poller.polls >= polls + 3, 5, "three more polls")
        _, later = scrape(base)
        assert httpx.get(f"{base}/health", timeout=5).json() == {"status": "ok", "nvml": True, "gpus": 2}

        gpus[1].raises = {}
        wait_for(lambda: len(poller.snapshot.gpus) == 2, 5, "GPU 1 recovered")
        _, healed = scrape(base)

    a100 = labels(0, "GPU-aaaa", "NVIDIA A100-SXM4-80GB")
    h100 = labels(1, "GPU-bbbb", "NVIDIA H100 80GB HBM3")
    errors = first["inferq_gpu_poll_errors_total"][()]
    assert errors >= 2
    assert later["inferq_gpu_poll_errors_total"][()] > errors
    assert first["inferq_gpu_up"] == {(): 1.0} and first["inferq_gpu_count"] == {(): 2.0}
    # GPU 0: ECC unsupported reads 0, power unsupported is absent, the rest reported.
    assert first["inferq_gpu_ecc_uncorrected_errors"] == {a100: 0.0}
    assert "inferq_gpu_power_watts" not in first
    assert first["inferq_gpu_temperature_celsius"] == {a100: 61.0}
    assert first["inferq_gpu_memory_used_bytes"] == {a100: 10 * GIB}
    # GPU 1 is left out while it fails, and back once it reads again.
    assert healed["inferq_gpu_memory_used_bytes"] == {a100: 10 * GIB, h100: 70 * GIB}
    assert healed["inferq_gpu_ecc_uncorrected_errors"] == {a100: 0.0, h100: 3.0}
    warnings = gpu_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith("GPU 1: NVML read failed"), warnings


def test_lost_device_list_reinitialises_nvml(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpu_monitor")
    fake = FakeNvml(two_gpus())
    poller = GpuPoller(fake, 1.0)
    assert poller.poll_once().up
    fake.count_error = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
    for expected_errors in (1, 2, 3):
        snap = poller.poll_once()
        assert (snap.up, snap.count, snap.gpus, snap.poll_errors) == (False, 0, (), expected_errors)
    # Each failure releases NVML; each following poll initialises it again.
    assert (fake.shutdown_calls, fake.init_calls) == (3, 3)
    fake.count_error = None
    snap = poller.poll_once()
    assert snap.up and len(snap.gpus) == 2 and snap.poll_errors == 3
    assert fake.init_calls == 4
    reported = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert [m.split(" ")[:3] for m in reported] == [["NVML", "initialised:", "exporting"],
                                                    ["NVML", "could", "not"], ["NVML", "lists", "GPUs"]]


def test_driver_appearing_later_is_picked_up(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeNvml(two_gpus(), init_failures=4)
    poller = GpuPoller(fake, 1.0)
    for _ in range(4):
        assert poller.poll_once() == poller.snapshot and not poller.snapshot.up
    snap = poller.poll_once()
    assert snap.up and snap.count == 2 and snap.poll_errors == 0
    warnings = gpu_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith(NO_DRIVER), warnings
    assert fake.init_calls == 5


def test_real_pynvml_without_gpu_serves_up_zero(caplog: pytest.LogCaptureFixture) -> None:
    if host_has_nvidia_driver():
        pytest.skip("this host has an NVIDIA driver: the no-GPU path cannot be observed")
    caplog.set_level(logging.DEBUG, logger="gpu_monitor")
    with serving(pynvml, interval=0.05) as (poller, base):
        wait_for(lambda: poller.polls >= 8, 5, "eight polls")
        text, samples = scrape(base)
        health = httpx.get(f"{base}/health", timeout=5)

    assert samples["inferq_gpu_up"] == {(): 0.0}
    assert samples["inferq_gpu_count"] == {(): 0.0}
    assert samples["inferq_gpu_poll_errors_total"] == {(): 0.0}
    assert not any(name in samples for name in GPU_FAMILIES)
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "nvml": False, "gpus": 0}
    reported = [r.getMessage() for r in caplog.records if r.name.startswith("gpu_monitor")
                and r.levelno >= logging.INFO]
    assert len(reported) == 1 and reported[0].startswith(NO_DRIVER), reported


def test_cli_serves_health_and_exits_0_on_sigterm() -> None:
    """``inferq gpu-monitor`` handles SIGTERM itself: it stops cleanly with exit code 0."""
    port = free_port()
    inferq = Path(sys.executable).with_name("inferq")
    env = {**os.environ, "LOG_LEVEL": "INFO"}
    proc = subprocess.Popen([str(inferq), "gpu-monitor", "--host", "127.0.0.1", "--port", str(port),
                             "--interval", "0.1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        health = f"http://127.0.0.1:{port}/health"
        wait_for(lambda: httpx.get(health, timeout=1).status_code == 200, 15, "gpu-monitor /health", proc)
        assert httpx.get(health, timeout=1).json()["status"] == "ok"
        time.sleep(0.6)  # several poll intervals
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = stderr.decode(errors="replace")
    assert proc.returncode == 0, log
    assert "GPU monitor stopped" in log
    if not host_has_nvidia_driver():
        assert log.count(NO_DRIVER) == 1, log
