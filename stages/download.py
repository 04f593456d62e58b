"""Download stage: fetch every image of a SiLu JSONL file into tar shards with a manifest.

Run from the repository root (``dvc repro download`` runs the same)::

    python -m stages.download data/sample/ko_sample.jsonl data/downloaded

Input line ``n`` (1-based) belongs to shard ``(n - 1) // download.shard_size``.
Each shard becomes two files (layout in docs/architecture.md):

- ``OUT_DIR/shard-NNNNN.tar``, one member per distinct image, named by the
  SHA-256 of its bytes;
- ``OUT_DIR/shard-NNNNN.jsonl``, one line per input line in input order, kept
  or dropped with a fixed reason.

Counts go to ``metrics/download.json``.

Lines are read by stages/records.py and fetched by stages/fetch.py on
``download.workers`` threads. At most ``2 * workers`` fetches are queued at
once, and fetches of up to MAX_OPEN_SHARDS shards overlap, so a slow image at
the end of one shard does not idle the workers. Retries of transient
failures (connection errors, timeouts, 429, 5xx) are scheduled with
exponential backoff within the per-image deadline, without holding a thread.
Within a shard each distinct URL is fetched once.

Resuming: a shard being built keeps its fetched files and a journal of
finished fetches in ``OUT_DIR/.shard-NNNNN.partial/``; a rerun after a kill
fetches only what the journal lacks. A finished shard stores a fingerprint of
its input lines and fetch params in the tar's global PAX header (also when
the tar has no member, because every line was dropped), and a rerun
skips a shard whose fingerprint matches without fetching anything. A shard
whose input changed reuses the URLs its previous version fetched. Shards past
the end of the current input are deleted.

The stage fails (exit 1) only for systemic problems: the source or image root
is missing, the source is corrupt, a write fails (disk full), or the drop rate
exceeds ``download.max_error_rate``. It exits 2 for an invalid params.yaml,
and 130 after Ctrl-C, with one line that says how many shards are done.

Not covered: URL deduplication across shards, and the per-host limits and
robots.txt handling of a polite crawler.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import math
import queue
import re
import shutil
import sys
import tarfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonlines
from tqdm import tqdm

from stages.common import DropCounter, RateLogger, StageError, atomic_path, get_logger, write_json
from stages.config import DownloadParams, Params, ParamsError, load_params
from stages.fetch import (
    FETCH_REASONS,
    UNEXPECTED_ERROR,
    Fetcher,
    FetchResult,
    Target,
    cut_in_flight,
    describe_exception,
    redact_url,
    resolve_target,
    write_failed,
)
from stages.records import LineResult, SiluRecord, SourceError, count_lines, iter_lines

logger = get_logger(__name__)

# Bumped when the shard format or the meaning of a fingerprint changes, so
# shards written by an older version are rebuilt.
FORMAT_VERSION = 1
PAX_SHARD_KEY = "SILU.shard_key"
PAX_PARAMS_KEY = "SILU.params_key"
JOURNAL = "journal.jsonl"
# Shards whose fetches may be in flight at once: the oldest can still wait
# for a slow image while the next ones keep the workers busy. A shard stays
# open until its slowest URL ends, so URLs that hang until the deadline cap
# throughput near (MAX_OPEN_SHARDS - 1) * shard_size lines per deadline (an
# estimate). Each open shard keeps about 2 KB per line in memory.
MAX_OPEN_SHARDS = 8


# --------------------------------------------------------------------------- results


class DownloadInterrupted(Exception):
    """The run was stopped by Ctrl-C (SIGINT); finished shards and journaled fetches are kept for a rerun."""

    def __init__(self, done: int, total: int):
        super().__init__(f"interrupted; rerun to resume: {done} of {total} shards done")
        self.done = done
        self.total = total


@dataclass
class DownloadSummary:
    """Counts of one run beside the metrics: work done over the network, and work reused or skipped."""

    metrics: dict[str, Any]
    shards: int = 0
    skipped_shards: int = 0  # complete and unchanged, not touched
    finished_shards: int = 0  # written in this run
    fetched: int = 0  # fetches finished in this run (URLs or local files), retries not counted
    attempts: int = 0  # requests made, retries included
    reused: int = 0  # results taken from a journal or an earlier shard
    seconds: float = 0.0


# --------------------------------------------------------------------------- shards


@dataclass
class _Line:
    """One input line of a shard while it is built."""

    result: LineResult
    target: Target | None = None
    outcome: FetchResult | None = None


@dataclass
class _Task:
    """One distinct target of a shard: fetched once, its result shared by every line that names it."""

    shard: _ShardBuild
    target: Target
    lines: list[_Line]
    attempts: int = 0
    deadline: float | None = None  # monotonic; set when the first attempt starts


@dataclass
class _ShardBuild:
    index: int
    lines: list[_Line]
    key: str
    partial: Path
    pending: int = 0  # lines without an outcome yet
    journal: Any = None  # jsonlines.Writer over the open journal file
    journal_file: Any = None


def shard_name(index: int, suffix: str) -> str:
    return f"shard-{index:05d}{suffix}"


def _fetch_params_key(params: DownloadParams) -> str:
    """Fingerprint of the params that change what a fetch returns (not workers or shard_size)."""
    fields = {
        name: getattr(params, name)
        for name in ("connect_timeout", "read_timeout", "deadline", "max_bytes", "max_redirects", "retries",
                     "backoff", "user_agent", "allow_private_hosts")
    }
    text = json.dumps({"version": FORMAT_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _shard_key(lines: list[_Line], params_key: str) -> str:
    """Fingerprint of a shard's input: each raw line, its record-level outcome and its target, plus params."""
    digest = hashlib.sha256(params_key.encode())
    for line in lines:
        result = line.result
        entry = [
            result.line,
            hashlib.sha256(result.raw).hexdigest(),
            result.reason,
            line.target.fingerprint if line.target else None,
            line.outcome.reason if line.outcome else None,
        ]
        digest.update(json.dumps(entry, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


_PAX_RECORD = re.compile(rb"(\d+) ([^=\n]+)=")


def _read_pax(tar_path: Path) -> dict[str, str]:
    """Return the global PAX header of a shard tar, or {} when the tar is missing or has none.

    The header is read directly, because tarfile.open rejects a tar that
    contains a global header and no member ("end of file header"). A shard
    where every line was dropped is such a tar.
    """
    try:
        with open(tar_path, "rb") as handle:
            info = tarfile.TarInfo.frombuf(handle.read(tarfile.BLOCKSIZE), "utf-8", "strict")
            if info.type != tarfile.XGLTYPE:
                return {}
            payload = handle.read(info.size)
    except (OSError, tarfile.TarError):
        return {}
    if len(payload) != info.size:
        return {}
    # Each record is "LENGTH KEY=VALUE\n", where LENGTH counts the whole record.
    headers: dict[str, str] = {}
    position = 0
    while position < len(payload):
        match = _PAX_RECORD.match(payload, position)
        if match is None:
            return {}
        end = position + int(match.group(1))
        if end > len(payload) or payload[end - 1:end] != b"\n" or end <= match.end():
            return {}
        try:
            headers[match.group(2).decode("utf-8")] = payload[match.end():end - 1].decode("utf-8")
        except UnicodeDecodeError:
            return {}
        position = end
    return headers


def _read_manifest(path: Path) -> list[dict[str, Any]] | None:
    try:
        with jsonlines.open(path) as reader:
            return [entry for entry in reader.iter(type=dict)]
    except (OSError, jsonlines.InvalidLineError):
        return None


def _manifest_entry(line: _Line) -> dict[str, Any]:
    """Build one manifest line in the layout of docs/architecture.md."""
    result = line.result
    record: SiluRecord | None = result.record
    outcome = line.outcome
    assert outcome is not None
    return {
        "line": result.line,
        "img_id": result.img_id,
        "url": redact_url(result.image_path) if result.image_path else None,
        "status": outcome.status,
        "reason": outcome.reason,
        "detail": outcome.detail,
        "member": outcome.sha256,
        "sha256": outcome.sha256,
        "bytes": outcome.size,
        "content_type": outcome.content_type,
        "caption": record.caption if record else None,
        "lang": record.lang if record else None,
        "resolution": list(record.resolution) if record and record.resolution else None,
        "categories": record.categories if record else None,
    }


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------- the run


class _Downloader:
    """Plan, fetch and write shards; fetches of up to MAX_OPEN_SHARDS shards overlap."""

    def __init__(self, params: Params, out_dir: Path, total_lines: int):
        self.params = params
        self.download = params.download
        self.out_dir = out_dir
        self.params_key = _fetch_params_key(params.download)
        root = params.data.image_root
        self.image_root = Path(root).resolve() if root else None
        self.counter = DropCounter()
        self.summary = DownloadSummary(metrics={})
        self.fetcher = Fetcher(params.download)
        self.pool = ThreadPoolExecutor(max_workers=self.download.workers, thread_name_prefix="download")
        self.window = self.download.workers * 2  # tasks submitted to the pool at once
        self.queue: deque[_Task] = deque()  # tasks waiting for a slot
        self.retries: list[tuple[float, int, _Task]] = []  # (monotonic due time, sequence, task)
        self.retry_sequence = 0
        self.in_flight = 0
        self.done: queue.Queue[tuple[_Task, Future[FetchResult]]] = queue.Queue()
        self.open: dict[int, _ShardBuild] = {}
        self.unexpected = 0
        self.progress = tqdm(total=total_lines, unit="line", desc="download", disable=None, file=sys.stderr)
        self.rate = RateLogger(logger, "download", total=total_lines)
        self.resolved = 0

    # ---- shard planning

    def add_shard(self, index: int, results: list[LineResult]) -> None:
        """Skip the shard when it is complete and unchanged; otherwise start building it."""
        lines = [self._plan_line(result) for result in results]
        key = _shard_key(lines, self.params_key)
        self.summary.shards += 1
        if self._count_complete(index, key, len(lines)):
            self.summary.skipped_shards += 1
            shutil.rmtree(self.out_dir / f".{shard_name(index, '.partial')}", ignore_errors=True)
            return

        build = _ShardBuild(index=index, lines=lines, key=key, partial=self.out_dir / f".{shard_name(index, '.partial')}")
        reusable = self._load_journal(build)
        self._open_journal(build)
        for target, outcome in self._reuse_previous_shard(build, reusable).items():
            self._write_journal(build, target, outcome)
            reusable[target] = outcome
        tasks: dict[str, _Task] = {}
        for line in lines:
            if line.outcome is not None:
                self._resolve_line(line)
                continue
            assert line.target is not None
            known = reusable.get(line.target.key)
            if known is not None:
                line.outcome = known
                self.summary.reused += 1
                self._resolve_line(line)
                continue
            task = tasks.get(line.target.key)
            if task is None:
                task = tasks[line.target.key] = _Task(shard=build, target=line.target, lines=[])
                self.queue.append(task)
            task.lines.append(line)
            build.pending += 1

        self.open[index] = build
        if build.pending == 0:
            self._finish_shard(build)
        while len(self.queue) > self.window or len(self.open) > MAX_OPEN_SHARDS:
            self._pump()

    def _plan_line(self, result: LineResult) -> _Line:
        if result.record is None:
            assert result.reason is not None
            return _Line(result, outcome=FetchResult.dropped(result.reason, result.detail))
        target = resolve_target(result.record.image_path, self.image_root)
        if isinstance(target, FetchResult):
            return _Line(result, outcome=target)
        return _Line(result, target=target)

    def _count_complete(self, index: int, key: str, line_count: int) -> bool:
        """Count a complete shard whose fingerprint is ``key`` into the metrics; return False to rebuild it."""
        tar_path = self.out_dir / shard_name(index, ".tar")
        if _read_pax(tar_path).get(PAX_SHARD_KEY) != key:
            return False
        entries = _read_manifest(self.out_dir / shard_name(index, ".jsonl"))
        if entries is None or len(entries) != line_count:
            return False
        for entry in entries:
            if entry.get("status") == "ok":
                self.counter.keep()
            else:
                self.counter.drop(str(entry.get("reason")))
        self._advance(line_count)
        return True

    def _load_journal(self, build: _ShardBuild) -> dict[str, FetchResult]:
        """Return the results that an interrupted build of this shard journaled, by target key.

        Kept images are reused whatever the params (when they fit max_bytes),
        drops only when the fetch params are unchanged.
        """
        found: dict[str, FetchResult] = {}
        wanted = {line.target.key for line in build.lines if line.target is not None}
        journal = build.partial / JOURNAL
        if journal.exists():
            with open(journal, "rb") as handle:
                for raw in handle:
                    try:
                        entry = json.loads(raw)
                    except ValueError:
                        continue  # the last line of a killed run may be cut short
                    outcome = self._reusable_outcome(entry, entry.get("params_key"))
                    if outcome is not None and entry.get("target") in wanted:
                        if outcome.ok and not (build.partial / outcome.sha256).is_file():
                            continue
                        found[entry["target"]] = outcome
        return found

    def _reuse_previous_shard(self, build: _ShardBuild, found: dict[str, FetchResult]) -> dict[str, FetchResult]:
        """Return the URL results of the shard's previous complete version that ``found`` lacks.

        Their images are copied into the partial folder first, because the old
        tar is replaced when the shard is finished.
        """
        # Manifests store URLs with their userinfo redacted; a redacted URL
        # that stands for two different URLs is fetched again.
        keys_by_url: dict[str, set[str]] = {}
        for line in build.lines:
            if line.target is not None and line.target.url:
                keys_by_url.setdefault(redact_url(line.target.key), set()).add(line.target.key)
        wanted = {url: next(iter(keys)) for url, keys in keys_by_url.items() if len(keys) == 1}
        tar_path = self.out_dir / shard_name(build.index, ".tar")
        pax = _read_pax(tar_path)
        entries = _read_manifest(self.out_dir / shard_name(build.index, ".jsonl")) if pax else None
        if not entries:
            return {}
        previous: dict[str, FetchResult] = {}
        for entry in entries:
            url = entry.get("url")
            key = wanted.get(url) if isinstance(url, str) else None
            if key is None or key in found:
                continue
            outcome = self._reusable_outcome(entry, pax.get(PAX_PARAMS_KEY))
            if outcome is not None:
                previous[key] = outcome
        if not previous:
            return {}
        needed = {outcome.sha256 for outcome in previous.values() if outcome.ok}
        if not needed:
            return previous  # only drops; a tar without members cannot be opened by tarfile
        try:
            with tarfile.open(tar_path, "r:") as tar:
                for member in tar:
                    if member.name in needed and member.isfile():
                        source = tar.extractfile(member)
                        assert source is not None
                        with source, open(build.partial / member.name, "wb") as target:
                            shutil.copyfileobj(source, target)
        except tarfile.TarError as exc:
            logger.warning("%s: unreadable (%s); fetching its images again", tar_path, exc)
            return {}
        except OSError as exc:
            raise write_failed(build.partial, exc) from exc
        return {
            url: outcome
            for url, outcome in previous.items()
            if not outcome.ok or (build.partial / str(outcome.sha256)).is_file()
        }

    def _reusable_outcome(self, entry: dict[str, Any], params_key: str | None) -> FetchResult | None:
        status = entry.get("status")
        if status == "ok":
            size = entry.get("bytes")
            sha = entry.get("sha256")
            if not isinstance(size, int) or size > self.download.max_bytes or not isinstance(sha, str):
                return None
            return FetchResult.kept(sha, size, entry.get("content_type"))
        reason = entry.get("reason")
        if status != "dropped" or reason not in FETCH_REASONS or reason == UNEXPECTED_ERROR:
            return None
        if params_key != self.params_key:
            return None
        return FetchResult.dropped(reason, entry.get("detail"))

    def _write_journal(self, build: _ShardBuild, target: str, result: FetchResult) -> None:
        entry = {
            "target": target,
            "params_key": self.params_key,
            "status": result.status,
            "reason": result.reason,
            "detail": result.detail,
            "sha256": result.sha256,
            "bytes": result.size,
            "content_type": result.content_type,
        }
        try:
            build.journal.write(entry)
        except OSError as exc:
            raise write_failed(build.partial / JOURNAL, exc) from exc

    def _open_journal(self, build: _ShardBuild) -> None:
        try:
            build.partial.mkdir(parents=True, exist_ok=True)
            build.journal_file = open(build.partial / JOURNAL, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise write_failed(build.partial / JOURNAL, exc) from exc
        build.journal = jsonlines.Writer(build.journal_file, dumps=_dumps, flush=True)

    # ---- fetching

    def _pump(self) -> None:
        """Submit due work, then wait for one result (or the next due retry) and record it.

        Callers loop on it while shards are open; every open shard has a task
        queued, in flight or due for retry, so each call makes progress.
        """
        now = time.monotonic()
        while self.retries and self.retries[0][0] <= now:
            self.queue.appendleft(heapq.heappop(self.retries)[2])
        while self.queue and self.in_flight < self.window:
            task = self.queue.popleft()
            future = self.pool.submit(self._attempt, task)
            future.add_done_callback(lambda done, task=task: self.done.put((task, done)))
            self.in_flight += 1
        if self.in_flight == 0 and not self.retries:
            raise AssertionError(f"download scheduler stalled with shards {sorted(self.open)} open")
        wait = max(0.0, self.retries[0][0] - time.monotonic()) if self.retries else None
        try:
            task, future = self.done.get(timeout=wait)
        except queue.Empty:
            return
        self.in_flight -= 1
        self._record(task, future.result())  # re-raises StageError from a worker

    def _attempt(self, task: _Task) -> FetchResult:
        if task.deadline is None:
            task.deadline = time.monotonic() + self.download.deadline
        task.attempts += 1
        try:
            return self.fetcher.fetch(task.target, task.deadline, task.shard.partial)
        except StageError:
            raise
        except Exception as exc:  # noqa: BLE001 - one odd URL must not stop a run of 500k
            logger.debug("unexpected error fetching %s", redact_url(task.target.key), exc_info=True)
            return FetchResult.dropped(UNEXPECTED_ERROR, describe_exception(exc))

    def _record(self, task: _Task, result: FetchResult) -> None:
        self.summary.attempts += 1
        if result.reason == UNEXPECTED_ERROR:
            self.unexpected += 1
            if self.unexpected <= 10:
                logger.warning("unexpected error fetching %s: %s", redact_url(task.target.key), result.detail)
        if result.retryable and task.attempts <= self.download.retries and task.deadline is not None:
            delay = self.download.backoff * 2 ** (task.attempts - 1)
            if result.retry_after is not None:
                delay = max(delay, result.retry_after)
            due = time.monotonic() + delay
            if due < task.deadline:
                logger.debug(
                    "retry %d/%d of %s in %.2f s: %s", task.attempts, self.download.retries, redact_url(task.target.key),
                    delay, result.detail,
                )
                self.retry_sequence += 1
                heapq.heappush(self.retries, (due, self.retry_sequence, task))
                return
        if not result.ok and task.attempts > 1:
            result = FetchResult.dropped(result.reason or "", f"{result.detail} (after {task.attempts} attempts)")
        self.summary.fetched += 1
        build = task.shard
        self._write_journal(build, task.target.key, result)
        for line in task.lines:
            line.outcome = result
            build.pending -= 1
            self._resolve_line(line)
        if build.pending == 0:
            self._finish_shard(build)

    def _resolve_line(self, line: _Line) -> None:
        assert line.outcome is not None
        if line.outcome.ok:
            self.counter.keep()
        else:
            self.counter.drop(line.outcome.reason or "")
        self._advance(1)

    def _advance(self, lines: int) -> None:
        self.resolved += lines
        self.progress.update(lines)
        self.rate.update(self.resolved, self.counter)

    # ---- writing

    def _finish_shard(self, build: _ShardBuild) -> None:
        """Write the manifest, then the tar (whose fingerprint marks the shard complete), then drop the partial."""
        build.journal.close()
        build.journal_file.close()
        manifest = self.out_dir / shard_name(build.index, ".jsonl")
        tar_path = self.out_dir / shard_name(build.index, ".tar")
        members: list[str] = []
        seen: set[str] = set()
        for line in build.lines:
            sha = line.outcome.sha256 if line.outcome else None
            if sha and sha not in seen:
                seen.add(sha)
                members.append(sha)
        try:
            with atomic_path(manifest) as tmp, open(tmp, "w", encoding="utf-8") as handle:
                with jsonlines.Writer(handle, dumps=_dumps) as writer:
                    writer.write_all(_manifest_entry(line) for line in build.lines)
            with atomic_path(tar_path) as tmp:
                headers = {PAX_SHARD_KEY: build.key, PAX_PARAMS_KEY: self.params_key}
                with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT, pax_headers=headers) as tar:
                    for sha in members:
                        _add_member(tar, build.partial / sha, sha)
        except OSError as exc:
            raise write_failed(Path(exc.filename) if exc.filename else tar_path, exc) from exc
        shutil.rmtree(build.partial, ignore_errors=True)
        del self.open[build.index]
        self.summary.finished_shards += 1

    def finish(self) -> None:
        """Wait for every open shard, then remove shards beyond the input and leftovers of killed runs."""
        while self.open:
            self._pump()
        self.progress.close()
        self.rate.update(self.resolved, self.counter, force=True)
        for path in self.out_dir.iterdir():
            match = re.fullmatch(r"\.?shard-(\d{5,})\.(tar|jsonl|partial)", path.name)
            if match and int(match.group(1)) >= self.summary.shards:
                logger.info("removing %s: the input now has %d shards", path, self.summary.shards)
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def close(self, aborted: bool) -> None:
        """Stop the workers; when the run is aborted, cut in-flight fetches instead of waiting for them."""
        if aborted:
            cut_in_flight()
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.fetcher.close()
        for build in self.open.values():
            if build.journal_file is not None:
                build.journal_file.close()


def _add_member(tar: tarfile.TarFile, source: Path, name: str) -> None:
    # Fixed metadata, so the same images give the same tar bytes.
    info = tarfile.TarInfo(name)
    info.size = source.stat().st_size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with open(source, "rb") as handle:
        tar.addfile(info, handle)


def _shards(results: Iterable[LineResult], shard_size: int) -> Iterator[list[LineResult]]:
    chunk: list[LineResult] = []
    for result in results:
        chunk.append(result)
        if len(chunk) == shard_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_inputs(source: Path, params: Params) -> None:
    if source.is_dir():
        raise StageError(
            f"{source}: is a folder, not a file. Set `data.source` in params.yaml to the SiLu JSONL file inside it "
            "(for example data/ko_image_caption.jsonl)."
        )
    if not source.is_file():
        raise StageError(
            f"{source}: source file not found. Run `dvc pull {source}`, or download it and `dvc add` it "
            "(docs/data.md), or set `data.source` in params.yaml to an existing JSONL file."
        )
    root = params.data.image_root
    if root and not Path(root).is_dir():
        kind = "a file" if Path(root).exists() else "not found"
        raise StageError(
            f"`data.image_root` is {root!r}, which is {kind}, not a folder. Set it to the folder that relative "
            "`image.path` values resolve against, or to an empty string when every path is a URL."
        )


def _remove_leftovers(out_dir: Path) -> None:
    """Delete temporaries of an atomic write that a killed run left behind."""
    for path in out_dir.glob(".shard-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)


def run(
    source: str | Path,
    out_dir: str | Path,
    params: Params,
    metrics_path: str | Path = "metrics/download.json",
) -> DownloadSummary:
    """Download every image of ``source`` into ``out_dir`` and write the metrics.

    Raises :class:`StageError` for systemic failures, after writing the
    metrics when the drop rate is the cause.
    """
    started = time.monotonic()
    source = Path(source)
    out_dir = Path(out_dir)
    _check_inputs(source, params)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        total = count_lines(source, params.data.limit)
    except SourceError as exc:
        raise StageError(str(exc)) from exc
    except OSError as exc:
        raise StageError(f"{exc.filename or source}: {exc.strerror or exc}; check the path and its permissions.") from exc
    if total == 0:
        raise StageError(f"{source}: no lines to read; point `data.source` at a SiLu JSONL file with records.")
    _remove_leftovers(out_dir)
    logger.info(
        "download: %d lines from %s into %s (%d per shard, %d workers)",
        total, source, out_dir, params.download.shard_size, params.download.workers,
    )

    downloader = _Downloader(params, out_dir, total)
    completed = False
    try:
        lines = iter_lines(source, params.data.lang, params.data.limit)
        for index, results in enumerate(_shards(lines, params.download.shard_size)):
            downloader.add_shard(index, results)
        downloader.finish()
        completed = True
    except SourceError as exc:
        raise StageError(str(exc)) from exc
    except KeyboardInterrupt:
        done = downloader.summary.skipped_shards + downloader.summary.finished_shards
        raise DownloadInterrupted(done, math.ceil(total / params.download.shard_size)) from None
    finally:
        downloader.close(aborted=not completed)

    summary = downloader.summary
    summary.metrics = downloader.counter.metrics()
    summary.seconds = time.monotonic() - started
    write_json(metrics_path, summary.metrics)
    logger.info(
        "download: kept %d of %d lines; fetched %d (%d requests), reused %d, skipped %d of %d shards, %.1f s",
        summary.metrics["kept"], summary.metrics["records"], summary.fetched, summary.attempts, summary.reused,
        summary.skipped_shards, summary.shards, summary.seconds,
    )
    if summary.metrics["records"] != total:
        raise StageError(f"{source}: counted {total} lines but accounted for {summary.metrics['records']}; "
                         "the file changed while the stage ran, so rerun it.")
    downloader.counter.check_error_rate(params.download.max_error_rate, "download", out_dir / "shard-*.jsonl")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.download", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="SiLu JSONL or .jsonl.gz (normally data.source)")
    parser.add_argument("out_dir", help="output folder for shard-NNNNN.tar and shard-NNNNN.jsonl")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--metrics", default="metrics/download.json", help="metrics file to write")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        run(args.source, args.out_dir, params, args.metrics)
    except ParamsError as exc:
        logger.error("%s", exc)
        return 2
    except StageError as exc:
        logger.error("%s", exc)
        return 1
    except DownloadInterrupted as exc:
        logger.error("%s", exc)
        return 130  # the shell's code for SIGINT
    except KeyboardInterrupt:
        # Before the shards are planned, or a second Ctrl-C while the workers stop.
        logger.error("interrupted; rerun to resume")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
