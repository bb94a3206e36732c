"""py-spy for the benchmarks: record processes while a block runs, and read the collapsed
stacks it writes into the heaviest functions (own time, per file, and inferq's own
functions by inclusive time)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table


def py_spy() -> str:
    """The py-spy binary beside this Python, else on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise click.ClickException("py-spy is not installed (pip install py-spy), or run with --no-profile")
    return found


@contextmanager
def profiled(targets: dict[str, int], out_dir: Path, prefix: str,
             rate: int = 200) -> Iterator[dict[str, Path]]:
    """py-spy records each ``name -> pid`` (and its children) while the block runs; yields the
    paths of the collapsed-stack files it writes in ``out_dir`` when the block ends."""
    out_dir.mkdir(exist_ok=True)
    paths = {name: out_dir / f"{prefix}-{name}.txt" for name in targets}
    spies = [subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
                               "--format", "raw", "--rate", str(rate), "-o", str(paths[name])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, pid in targets.items()]
    time.sleep(1.0)  # attached before the load starts
    try:
        yield paths
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy in spies:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()


_LINE = re.compile(r":\d+\)$")


def _function(frame: str) -> str:
    """``name (path:line)`` -> ``name (short path)``: one entry per function, not per line."""
    name, sep, path = _LINE.sub(")", frame).rpartition(" (")
    if not sep:
        return frame
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    elif "/lib/python3" in path:
        path = path.split("/lib/python3", 1)[1].partition("/")[2]
    return f"{name} ({path.replace(str(Path.cwd()) + '/', '')}"


OUR_PACKAGES = ("api/", "queueing/", "workers/", "config/")


@dataclass(frozen=True)
class Profile:
    """What one py-spy file says: samples, and the heaviest functions (name -> samples)."""

    samples: int
    own: list[tuple[str, int]]  # functions by own time (leaf frames)
    files: list[tuple[str, int]]  # source files by own time
    ours: list[tuple[str, int]]  # inferq's own functions by inclusive time

    def share(self, count: int) -> str:
        return f"{count / max(self.samples, 1) * 100:.1f} %"


def read_profile(collapsed: str, n: int = 15) -> Profile:
    """Parse py-spy's collapsed stacks (``frame;frame;... count`` per line)."""
    own: Counter[str] = Counter()
    files: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_function(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        files[frames[-1].partition(" (")[2].rstrip(")") or frames[-1]] += samples
        for frame in set(frames):
            if frame.partition(" (")[2].startswith(OUR_PACKAGES):
                ours[frame] += samples
    return Profile(total, own.most_common(n), files.most_common(n), ours.most_common(n))


def print_profile(console: Console, name: str, path: Path) -> dict[str, Any]:
    """Print and return the top functions of one py-spy file: own time, by file, and ours inclusive."""
    profile = read_profile(path.read_text() if path.exists() else "")
    for title, rows in ((f"{name}: top functions by own time ({profile.samples} samples, {path.name})",
                         profile.own),
                        (f"{name}: inferq's own functions by inclusive time", profile.ours)):
        table = Table(title=title)
        table.add_column("share", justify="right")
        table.add_column("function (file)")
        for function, count in rows:
            table.add_row(profile.share(count), function)
        console.print(table)
    console.print(f"{name}: own time by file: "
                  + ", ".join(f"{f} {profile.share(c)}" for f, c in profile.files[:8]))

    def shares(rows: list[tuple[str, int]]) -> dict[str, float]:
        return {f: round(c / max(profile.samples, 1) * 100, 1) for f, c in rows}

    return {"samples": profile.samples, "own": shares(profile.own), "files": shares(profile.files),
            "ours_inclusive": shares(profile.ours)}
