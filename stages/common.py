"""Helpers shared by all stages: logging, atomic writes, metrics and drop accounting."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def get_logger(name: str) -> logging.Logger:
    """Return a module logger; the level comes from ``SILU_LOG_LEVEL`` (default INFO)."""
    root = logging.getLogger("stages")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("SILU_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    if name == "__main__":
        # Under `python -m stages.filter` the module is `__main__`; log it under its real name.
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        name = spec.name if spec is not None else "main"
    return logging.getLogger(name if name.startswith("stages") else f"stages.{name}")


class StageError(RuntimeError):
    """A systemic failure that stops a stage; the message names the file and the fix."""


def output_write_failed(path: str | Path, exc: OSError) -> StageError:
    """Return the StageError for a failed write of the output file ``path``, with the fix for a full disk.

    A path inside an :func:`atomic_path` temporary is shown as the output path it will become.
    """
    shown = _TEMPORARY.sub(r"\1", str(path))
    # pyarrow sets errno but puts its own text in strerror.
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk is full; free space or move the output folder to a larger disk, then rerun"
    elif exc.errno == errno.EFBIG:
        hint = "the file size limit was reached (`ulimit -f` or the file system's maximum); raise it, then rerun"
    else:
        hint = "check that the output folder is writable, then rerun"
    return StageError(f"cannot write {shown}: {reason}; {hint}. No partial output was kept.")


# `.NAME.RANDOM.tmp/out/` as atomic_path creates it, for NAME/ in messages.
_TEMPORARY = re.compile(r"\.([^/]+)\.[^./]+\.tmp/out(?=/|$)")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` and rename it over ``path`` only on success.

    Works for files and folders. On an exception the temporary is removed, so
    readers see the old content or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / "out"
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            old = tmp / "old"
            path.rename(old)
        elif path.exists() or path.is_symlink():
            path.unlink()
        target.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted UTF-8 JSON, atomically."""
    with atomic_path(path) as tmp:
        try:
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise output_write_failed(path, exc) from exc


class DropCounter:
    """Count every record of a stage as kept or dropped with a short fixed reason."""

    def __init__(self) -> None:
        self.kept = 0
        self.dropped: Counter[str] = Counter()

    def keep(self) -> None:
        self.kept += 1

    def drop(self, reason: str) -> None:
        self.dropped[reason] += 1

    @property
    def total(self) -> int:
        return self.kept + sum(self.dropped.values())

    def metrics(self) -> dict[str, Any]:
        """Return the counts in the shape of a stage metrics file."""
        total = self.total
        return {
            "records": total,
            "kept": self.kept,
            "dropped": sum(self.dropped.values()),
            "drop_rate": round(sum(self.dropped.values()) / total, 6) if total else 0.0,
            "dropped_by_reason": dict(sorted(self.dropped.items())),
        }

    def check_error_rate(self, limit: float, stage: str, manifest: str | Path) -> None:
        """Raise :class:`StageError` when the drop rate exceeds ``limit``."""
        total = self.total
        if total and limit < 1.0:
            rate = sum(self.dropped.values()) / total
            if rate > limit:
                top = ", ".join(f"{r}: {n}" for r, n in self.dropped.most_common(3))
                raise StageError(
                    f"{stage}: {rate:.1%} of {total} records dropped, above `{stage}.max_error_rate` "
                    f"= {limit:.1%} (most common: {top}). See {manifest} for each record; raise the "
                    "limit if this loss is expected."
                )


class RateLogger:
    """Log a progress line with rate and counts at most every ``interval`` seconds."""

    def __init__(self, logger: logging.Logger, what: str, total: int | None = None, interval: float = 10.0):
        self.logger = logger
        self.what = what
        self.total = total
        self.interval = interval
        self.start = time.monotonic()
        self.last = self.start

    def update(self, done: int, counter: DropCounter, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        of_total = f"/{self.total}" if self.total else ""
        self.logger.info(
            "%s: %d%s done, %.1f/s, kept %d, dropped %d",
            self.what,
            done,
            of_total,
            done / elapsed,
            counter.kept,
            sum(counter.dropped.values()),
        )


# Trainer fields that record wall-clock time. Two runs of one config would hash
# differently because of them, so the train and evaluate stages drop them from
# their outputs. DVCLive still logs the training run time to the DVC metrics.
WALL_CLOCK_KEYS = frozenset(
    {
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "predict_runtime",
        "predict_samples_per_second",
        "predict_steps_per_second",
        "elapsed_time",
        "remaining_time",
    }
)


def _without_wall_clock(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key not in WALL_CLOCK_KEYS}


def drop_wall_clock(out_dir: Path) -> None:
    """Remove wall-clock fields from the HF Trainer's result and log files, so equal runs give equal bytes."""
    for name in ("all_results.json", "train_results.json", "predict_results.json"):
        path = out_dir / name
        if path.is_file():
            results = _without_wall_clock(json.loads(path.read_text(encoding="utf-8")))
            path.write_text(json.dumps(results, indent=4, sort_keys=True) + "\n", encoding="utf-8")

    state_path = out_dir / "trainer_state.json"
    if state_path.is_file():
        state = json.loads(state_path.read_text(encoding="utf-8"))
        state["log_history"] = [_without_wall_clock(entry) for entry in state.get("log_history", [])]
        state_path.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    log_path = out_dir / "trainer_log.jsonl"
    if log_path.is_file():
        entries = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        lines = [json.dumps(_without_wall_clock(entry), ensure_ascii=False) + "\n" for entry in entries]
        log_path.write_text("".join(lines), encoding="utf-8")
