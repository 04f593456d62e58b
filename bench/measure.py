"""Measurement helpers shared by the benchmarks: run a command and record its wall time and peak RSS.

Peak RSS is the maximum, over samples taken every ``interval`` seconds, of
the summed resident memory of a process and all its descendants. Pages
shared between processes (a forked parent's memory, shared libraries) are
counted once per process, so the sum overstates the real footprint of a
multi-process tool. A peak shorter than the interval can be missed.
CPU time is the user + system time of every process of the tree at its
last sample, so up to one interval per process is missed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PYTHON = ROOT / ".venv" / "bin" / "python"
MIB = 1024 * 1024


@dataclass
class RunResult:
    """Outcome of one measured command."""

    returncode: int
    seconds: float
    peak_rss: int  # bytes, process tree
    cpu_seconds: float  # user + system time of the process tree, as last sampled per process
    output: str  # stdout and stderr together, the last 4000 characters


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment without proxy variables, so every request goes straight to 127.0.0.1."""
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


def sample_tree(process: psutil.Process, cpu_by_pid: dict[int, float]) -> int:
    """Return the summed RSS of ``process`` and its descendants in bytes, and record each one's CPU seconds.

    ``cpu_by_pid`` keeps the last user + system time seen per process, so
    processes that have exited still count (up to their last sample).
    """
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        try:
            with member.oneshot():
                total += member.memory_info().rss
                times = member.cpu_times()
            cpu_by_pid[member.pid] = times.user + times.system
        except psutil.Error:
            pass  # exited between listing and reading
    return total


def run_measured(
    command: Sequence[str | Path],
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
    interval: float = 0.05,
) -> RunResult:
    """Run ``command`` to completion; kill its process group after ``timeout`` seconds.

    The command gets its own process group, so a timeout ends its children
    too and nothing else.
    """
    started = time.monotonic()
    child = subprocess.Popen(
        [str(part) for part in command],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    process = psutil.Process(child.pid)
    peak = 0
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: child.stdout.read(65536), b"")), daemon=True)
    reader.start()
    cpu_by_pid: dict[int, float] = {}
    while child.poll() is None:
        peak = max(peak, sample_tree(process, cpu_by_pid))
        if time.monotonic() - started > timeout:
            os.killpg(child.pid, 9)
            child.wait()
            break
        time.sleep(interval)
    seconds = time.monotonic() - started
    reader.join(timeout=5)
    output = b"".join(chunks).decode("utf-8", "replace")
    return RunResult(child.returncode, seconds, peak, sum(cpu_by_pid.values()), output[-4000:])



def folder_stats(path: Path) -> tuple[int, int]:
    """Return ``(files, bytes)`` under ``path``, counting regular files only."""
    files = size = 0
    for folder, _, names in os.walk(path):
        for name in names:
            stat = os.lstat(os.path.join(folder, name))
            files += 1
            size += stat.st_size
    return files, size


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def cpu_description() -> str:
    """Return a short description of the CPUs this process may use and the load on them."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{usable} usable CPU(s) {model}, load average {load:.2f} at start, Python {sys.version.split()[0]}"
