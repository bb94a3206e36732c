"""benchmarks.thread_cpu names a process's threads by their Python names and counts each one's CPU."""

from __future__ import annotations

import os
import threading
import time

import pytest

from benchmarks.thread_cpu import ThreadWindow, python_names


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_busy_named_thread_is_counted_in_its_group_and_an_idle_one_is_not() -> None:
    if not python_names(os.getpid()):
        pytest.skip("py-spy cannot read this process here (ptrace permissions)")
    release = threading.Event()
    idle = threading.Thread(target=release.wait, name="idle-waiter-3", daemon=True)
    idle.start()
    window = ThreadWindow(os.getpid())
    window.open()
    busy = [threading.Thread(target=_spin, args=(0.15,), name=f"busy-spinner-{i}") for i in range(2)]
    for t in busy:
        t.start()
    for t in busy:
        t.join()  # ended before close: not counted (started and ended inside the window)
    keeper = threading.Thread(target=lambda: (_spin(0.2), release.wait()), name="busy-keeper-12", daemon=True)
    keeper.start()
    time.sleep(0.5)
    groups = window.close()
    release.set()
    assert groups["busy-keeper-*"] >= 0.15  # alive at close, named by py-spy, counted from its start
    assert groups["idle-waiter-*"] < 0.05
    assert "busy-spinner-*" not in groups
    assert groups["MainThread"] >= 0
