"""Versioned releases on the board: hash locally, upload what is missing, verify on the board, switch atomically.

Used by ``stages/deploy.py`` (deploy, ``--rollback``, ``--status``) and by
``bench/deploy_upload.py``.

A release is a set of files (relative path -> local file). Its name is the
first 16 hex digits of the SHA-256 of its manifest (``sha256 size path``
lines, sorted by path), so the same content always gets the same name.
:func:`publish` does, in order:

1. probe the board (``deploy/board_ops.py probe``): Python, MindSpore/MindNLP
   versions, ``timeout``/``pkill``, free space, which objects are stored;
2. in the same call, hash on the board every stored object the release
   needs, deleting any that no longer matches its name, so corruption there
   is re-uploaded;
3. check free space for what is left to send, before sending a byte;
4. upload each missing object to ``objects/<sha256>.part``, appending from
   the size already there (an interrupted upload resumes), with pipelined
   SFTP writes; then hash each ``.part`` on the board and rename it;
5. assemble ``releases/<name>`` from hard links (``current`` does not move).

:func:`activate` then switches ``previous`` to the old ``current`` and
``current`` to the new release, each by renaming a fresh symlink over the
old one, and prunes releases beyond ``keep`` besides ``current``. The deploy
stage test-runs the assembled release before activating it.

The switch is atomic: the board runs the old release until :func:`activate`
and the new one after it, and every failure before it leaves ``current`` as
it was. :func:`rollback` swaps ``current`` and ``previous`` the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.board_ssh import (
    BoardConnection,
    PreflightError,
    RemoteCommandError,
    TransferError,
    quote,
    upload_file,
)

log = logging.getLogger("stages.board_release")

BOARD_OPS = Path(__file__).resolve().parent.parent / "deploy" / "board_ops.py"
HASH_CHUNK = 1 << 20
RELEASE_NAME_CHARS = 16
# Space kept free beyond the upload itself: release manifests, links, the inference run's temp files.
DISK_MARGIN_BYTES = 64 << 20
# NOTE: an estimate of the slowest board-side hashing (SD card on the OrangePi), not a measurement.
# It only sizes the timeout of the probe and finish steps, so a slower board needs a larger
# deploy.transfer_timeout.
BOARD_HASH_BYTES_PER_S = 20e6
PROGRESS_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class ReleaseFile:
    """One file of a release: where it goes on the board and its content hash."""

    path: str
    local: Path
    size: int
    sha256: str


@dataclass(frozen=True)
class Release:
    """Files to publish together, named by their content."""

    files: tuple[ReleaseFile, ...]
    name: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def objects(self) -> dict[str, int]:
        """Return ``{sha256: size}`` of the distinct contents."""
        return {f.sha256: f.size for f in self.files}


@dataclass
class PublishReport:
    """Counts and timings of one publish, for logs and ``metrics/deploy.json``."""

    release: str
    remote_dir: str
    files: int
    bytes_total: int
    bytes_sent: int = 0
    resumed_bytes: int = 0
    objects_uploaded: int = 0
    objects_skipped: int = 0
    corrupt_on_board: list[str] = field(default_factory=list)
    upload_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    release_dir: str = ""
    board: dict[str, Any] = field(default_factory=dict)

    @property
    def upload_mb_per_s(self) -> float:
        return self.bytes_sent / 1e6 / self.upload_s if self.upload_s > 0 else 0.0


# --------------------------------------------------------------------------- local side


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(HASH_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def build_release(entries: Mapping[str, Path]) -> Release:
    """Hash ``entries`` (release path -> local file) and name the release by its manifest."""
    files = []
    for rel in sorted(entries):
        if rel.startswith("/") or any(part in ("", ".", "..") for part in rel.split("/")):
            raise ValueError(f"release path {rel!r} must be relative, without '..' or empty parts")
        local = Path(entries[rel])
        files.append(ReleaseFile(rel, local, local.stat().st_size, sha256_file(local)))
    manifest = "".join(f"{f.sha256} {f.size} {f.path}\n" for f in files)
    name = hashlib.sha256(manifest.encode("utf-8")).hexdigest()[:RELEASE_NAME_CHARS]
    return Release(tuple(files), name)


def directory_entries(folder: Path, prefix: str) -> dict[str, Path]:
    """Map every file under ``folder`` to ``prefix/<relative path>``; symlinks are followed."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            entries[f"{prefix}/{path.relative_to(folder).as_posix()}"] = path
    return entries


# --------------------------------------------------------------------------- board side


def board_op(conn: BoardConnection, python: str, op: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one ``deploy/board_ops.py`` operation with the board's Python; return its JSON result."""
    command = f"{quote(python)} - {quote(op)} {quote(json.dumps(args, sort_keys=True))}"
    try:
        result = conn.run(command, timeout, stdin=BOARD_OPS.read_bytes())
    except RemoteCommandError as exc:
        if exc.exit_status == 127:
            raise PreflightError(
                conn.host,
                f"Python {python} not found on the board (exit 127); set deploy.python to the board venv's "
                "python (see docs/board.md).",
                exc.command,
                exc.stderr,
            ) from None
        raise
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        raise RemoteCommandError(
            conn.host, f"board_ops {op} printed no JSON result: {result.stdout[-200:]!r}", command, result.stderr, 0
        ) from None


def check_board(conn: BoardConnection, probe: dict[str, Any], python: str) -> None:
    """Raise :class:`PreflightError` naming everything the board lacks to run a release."""
    missing = []
    if not probe.get("mindspore"):
        missing.append("MindSpore (pip package mindspore or mindspore-dev)")
    if not probe.get("mindnlp"):
        missing.append("MindNLP (pip package mindnlp==0.4.1)")
    for tool, path in sorted(probe.get("tools", {}).items()):
        if not path:
            missing.append(f"`{tool}` on PATH (coreutils/procps)")
    if not probe.get("writable"):
        missing.append(f"write permission for {probe['remote_dir']}")
    if missing:
        raise PreflightError(
            conn.host,
            f"the board's Python {python} ({probe.get('python')}) lacks: {'; '.join(missing)}. "
            "Install the board requirements (deploy/requirements-board.txt) as docs/board.md describes.",
        )
    if not str(probe.get("python", "")).startswith("3."):
        raise PreflightError(conn.host, f"{python} reports Python {probe.get('python')}; a Python 3.9+ is needed.")


def _check_space(conn: BoardConnection, probe: dict[str, Any], need: int) -> None:
    free = int(probe["free_bytes"])
    if free < need + DISK_MARGIN_BYTES:
        raise PreflightError(
            conn.host,
            f"not enough disk space: the release needs {need / 1e6:.1f} MB (+{DISK_MARGIN_BYTES >> 20} MiB margin) "
            f"under {probe['remote_dir']} but only {free / 1e6:.1f} MB are free on the filesystem of "
            f"{probe['free_path']}. Free space there (releases other than `current` under {probe['remote_dir']}/releases "
            "can go), or set deploy.remote_dir to a bigger disk.",
        )


class _Progress:
    """A tqdm bar with MB/s on a terminal; a log line every few seconds otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self.last_log = self.start
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc="upload", leave=False)

    def __call__(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
            return
        now = time.monotonic()
        if now - self.last_log >= PROGRESS_LOG_INTERVAL_S:
            self.last_log = now
            rate = self.done / 1e6 / max(now - self.start, 1e-9)
            log.info("upload: %.1f / %.1f MB, %.1f MB/s", self.done / 1e6, self.total / 1e6, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def publish(
    conn: BoardConnection,
    remote_dir: str,
    python: str,
    release: Release,
    progress: bool = True,
) -> PublishReport:
    """Upload ``release`` and assemble it as ``remote_dir/releases/<name>``; ``current`` does not move."""
    started = time.monotonic()
    timeout = conn.target.transfer_timeout
    objects = release.objects()

    # One round trip probes the board and hashes the objects it already stores.
    verify_start = time.monotonic()
    probe = board_op(
        conn,
        python,
        "probe",
        {"remote_dir": remote_dir, "objects": objects, "verify": True},
        timeout + release.total_bytes / BOARD_HASH_BYTES_PER_S,
    )
    check_board(conn, probe, python)
    root = probe["remote_dir"]
    report = PublishReport(release.name, root, len(release.files), release.total_bytes, board=probe)
    report.verify_s = time.monotonic() - verify_start
    report.corrupt_on_board = sorted(sha for sha, state in probe["objects"].items() if state["state"] == "corrupt")
    for sha in report.corrupt_on_board:
        log.warning("board %s: stored object %s did not match its hash; uploading it again", conn.host, sha[:16])
    log.info(
        "board %s: Python %s, MindSpore %s, MindNLP %s, %.1f GB free under %s; current release %s",
        conn.host,
        probe["python"],
        probe["mindspore"],
        probe["mindnlp"],
        probe["free_bytes"] / 1e9,
        root,
        probe["current"] or "none",
    )

    stored = {sha for sha in objects if probe["objects"][sha]["state"] == "complete"}
    offsets = {}
    for sha, size in objects.items():
        if sha in stored:
            report.objects_skipped += 1
            continue
        state = probe["objects"][sha]
        offset = state["size"] if state["state"] == "partial" and state["size"] <= size else 0
        offsets[sha] = offset
    need = sum(objects[sha] - offset for sha, offset in offsets.items())
    _check_space(conn, probe, need)

    if offsets:
        _upload(conn, root, release, offsets, report, progress)
        finish_start = time.monotonic()
        uploaded = {sha: objects[sha] for sha in offsets}
        finished = board_op(
            conn,
            python,
            "finish",
            {"remote_dir": root, "objects": uploaded},
            timeout + sum(uploaded.values()) / BOARD_HASH_BYTES_PER_S,
        )
        report.verify_s += time.monotonic() - finish_start
        if finished["mismatch"]:
            names = {f.sha256: f.path for f in release.files}
            bad = ", ".join(f"{names[sha]} (board: {info['size']} bytes)" for sha, info in finished["mismatch"].items())
            raise TransferError(
                conn.host,
                f"uploaded files arrived with the wrong content and were deleted on the board: {bad}. "
                "Rerun the deploy to upload them again.",
            )

    files = {f.path: f.sha256 for f in release.files}
    assembled = board_op(conn, python, "assemble", {"remote_dir": root, "release": release.name, "files": files}, timeout)
    if assembled["repaired"]:
        log.warning("board %s: repaired files in release %s: %s", conn.host, release.name, ", ".join(assembled["repaired"]))
    report.release_dir = assembled["release_dir"]
    report.total_s = time.monotonic() - started
    log.info(
        "board %s: release %s assembled; sent %.1f MB in %.2f s (%.1f MB/s), %d of %d objects already there",
        conn.host,
        release.name,
        report.bytes_sent / 1e6,
        report.upload_s,
        report.upload_mb_per_s,
        report.objects_skipped,
        len(objects),
    )
    return report


def activate(conn: BoardConnection, remote_dir: str, python: str, release: str, keep: int) -> dict[str, Any]:
    """Make ``release`` the board's ``current`` (the old one becomes ``previous``) and prune beyond ``keep``."""
    result = board_op(
        conn, python, "activate", {"remote_dir": remote_dir, "release": release, "keep": keep}, conn.target.transfer_timeout
    )
    log.info(
        "board %s: release %s is current (%s), previous %s, pruned %s",
        conn.host,
        release,
        "switched" if result["switched"] else "unchanged",
        result["previous"] or "none",
        ", ".join(result["pruned"]) or "nothing",
    )
    return result


def _upload(
    conn: BoardConnection,
    root: str,
    release: Release,
    offsets: dict[str, int],
    report: PublishReport,
    progress: bool,
) -> None:
    by_sha = {f.sha256: f for f in release.files}
    total = sum(by_sha[sha].size - offset for sha, offset in offsets.items())
    bar = _Progress(total, progress)
    sftp = conn.open_sftp()
    start = time.monotonic()
    try:
        _mkdirs(conn, sftp, f"{root}/objects")
        # Largest first: an interruption then most likely leaves a resumable part of the big shard.
        for sha in sorted(offsets, key=lambda s: -by_sha[s].size):
            entry = by_sha[sha]
            offset = offsets[sha]
            if offset:
                log.info("board %s: resuming %s at %.1f of %.1f MB", conn.host, entry.path, offset / 1e6, entry.size / 1e6)
                report.resumed_bytes += offset
            sent = upload_file(conn, sftp, entry.local, f"{root}/objects/{sha}.part", offset, bar)
            report.bytes_sent += sent
            report.objects_uploaded += 1
    finally:
        report.upload_s = time.monotonic() - start
        bar.close()
        sftp.close()


def _mkdirs(conn: BoardConnection, sftp: Any, path: str) -> None:
    parts = path.split("/")
    for i in range(2, len(parts) + 1):
        prefix = "/".join(parts[:i])
        try:
            sftp.stat(prefix)
        except FileNotFoundError:
            try:
                sftp.mkdir(prefix)
            except OSError as exc:
                raise TransferError(conn.host, f"cannot create folder {prefix} on the board: {exc}") from None


def rollback(conn: BoardConnection, remote_dir: str, python: str) -> dict[str, Any]:
    """Switch the board's ``current`` release back to ``previous``; return the new state."""
    return board_op(conn, python, "rollback", {"remote_dir": remote_dir}, conn.target.transfer_timeout)


def status(conn: BoardConnection, remote_dir: str, python: str) -> dict[str, Any]:
    """Return the board's ``current``, ``previous`` and stored releases."""
    return board_op(conn, python, "status", {"remote_dir": remote_dir}, conn.target.transfer_timeout)
