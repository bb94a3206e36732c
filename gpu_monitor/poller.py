"""A background thread that keeps the last GPU snapshot fresh.

It owns the NVML session: it initialises NVML lazily and retries quietly every
interval when that fails (no driver yet, or a driver that went away), so the
exporter keeps serving ``inferq_gpu_up 0`` instead of crash-looping. Logs only
on changes of state (one line when NVML is missing, one when it comes back, one
when a GPU starts or stops failing), never once per poll.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from gpu_monitor.nvml import GpuSample, NvmlModule, read_gpu

logger = logging.getLogger(__name__)

_NO_DRIVER_ERRORS = ("NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded")


@dataclass(frozen=True)
class Snapshot:
    """The result of the last poll, read as a whole by the collector and /health."""

    up: bool
    count: int
    gpus: tuple[GpuSample, ...]
    poll_errors: int


EMPTY = Snapshot(up=False, count=0, gpus=(), poll_errors=0)


class GpuPoller:
    """Polls an NVML-like module every ``interval`` seconds into ``snapshot``.

    ``up`` is true when NVML is initialised and the device list was read.
    ``poll_errors`` counts failed NVML reads once NVML is initialised: the device
    list (then NVML is re-initialised on the next poll), or one GPU (its series
    are left out of that snapshot while the others are reported). A missing
    driver is not an error here: it shows as ``up`` false.
    """

    def __init__(self, nvml: NvmlModule, interval: float):
        self.nvml = nvml
        self.interval = interval
        self.snapshot = EMPTY
        self.polls = 0
        self._initialised = False
        self._init_warned = False
        self._announced = False
        self._list_failing = False
        self._failing_gpus: set[int] = set()
        self._errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> Snapshot:
        """Run one poll, publish its snapshot and return it."""
        self.polls += 1
        gpus: list[GpuSample] = []
        count, up = 0, False
        if self._ensure_initialised():
            try:
                count = int(self.nvml.nvmlDeviceGetCount())
            except self.nvml.NVMLError as exc:
                self._list_failed(exc)
            else:
                up = True
                self._note_list_ok()
                gpus = self._read_all(count)
        self.snapshot = Snapshot(up=up, count=count, gpus=tuple(gpus), poll_errors=self._errors)
        return self.snapshot

    def start(self) -> None:
        """Start polling in a daemon thread (the first poll runs at once)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="gpu-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and release NVML."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval))
            self._thread = None
        self._shutdown()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:
                # A bug must not kill the thread: /metrics would serve a frozen snapshot.
                self._errors += 1
                logger.exception("GPU poll failed unexpectedly")
            self._stop.wait(self.interval)

    def _ensure_initialised(self) -> bool:
        if self._initialised:
            return True
        try:
            self.nvml.nvmlInit()
        except self.nvml.NVMLError as exc:
            self._init_failed(exc)
            return False
        self._initialised = True
        if self._init_warned or not self._announced:
            logger.info("NVML initialised: exporting GPU metrics every %gs", self.interval)
        self._init_warned = False
        self._announced = True
        return True

    def _init_failed(self, exc: BaseException) -> None:
        if self._init_warned:
            logger.debug("NVML init still failing: %s", exc)
            return
        self._init_warned = True
        no_driver = tuple(getattr(self.nvml, n) for n in _NO_DRIVER_ERRORS if hasattr(self.nvml, n))
        what = "no NVIDIA driver/GPU found" if isinstance(exc, no_driver) else "NVML initialisation failed"
        logger.warning("%s (%s): serving inferq_gpu_up 0, retrying quietly every %gs",
                       what, exc, self.interval)

    def _list_failed(self, exc: BaseException) -> None:
        self._errors += 1
        if not self._list_failing:
            logger.warning("NVML could not list GPUs (%s): serving inferq_gpu_up 0, re-initialising", exc)
        self._list_failing = True
        self._shutdown()

    def _note_list_ok(self) -> None:
        if self._list_failing:
            logger.info("NVML lists GPUs again")
        self._list_failing = False

    def _read_all(self, count: int) -> list[GpuSample]:
        gpus = []
        for index in range(count):
            try:
                gpus.append(read_gpu(self.nvml, index))
            except self.nvml.NVMLError as exc:
                self._errors += 1
                if index not in self._failing_gpus:
                    logger.warning("GPU %d: NVML read failed (%s): its series are left out until it recovers",
                                   index, exc)
                self._failing_gpus.add(index)
                continue
            if index in self._failing_gpus:
                logger.info("GPU %d: NVML reads work again", index)
            self._failing_gpus.discard(index)
        return gpus

    def _shutdown(self) -> None:
        if not self._initialised:
            return
        self._initialised = False
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError as exc:
            logger.debug("nvmlShutdown failed: %s", exc)
