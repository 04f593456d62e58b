"""Release transfer to the real sshd stand-in: skip, resume, verify by hash, atomic switch, rollback, prune."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from stages import board_release
from stages.board_ssh import BoardConnection, RemoteCommandError
from tests.board_plugin import REPO, current_release, read_json, wait_until


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _model(folder: Path, shard: bytes = b"weights-a" * 1000, config: bytes = b'{"hidden_size": 64}') -> dict[str, Path]:
    return {
        "model/model-00001.safetensors": _write(folder / "model-00001.safetensors", shard),
        "model/model-00002.safetensors": _write(folder / "model-00002.safetensors", b"weights-b" * 3000),
        "model/config.json": _write(folder / "config.json", config),
        "infer.py": _write(folder / "infer.py", b"print('board')\n"),
    }


def _publish(conn: BoardConnection, remote_dir: Path, entries: dict[str, Path], keep: int = 1):
    release = board_release.build_release(entries)
    report = board_release.publish(conn, str(remote_dir), conn_python(conn), release, progress=False)
    board_release.activate(conn, str(remote_dir), conn_python(conn), release.name, keep)
    return release, report


def conn_python(conn: BoardConnection) -> str:
    return str(REPO / ".venv-board" / "bin" / "python")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_first_deploy_uploads_and_switches(board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    entries = _model(tmp_path / "a")

    release, report = _publish(board_conn, remote_dir, entries)

    assert report.bytes_sent == release.total_bytes
    assert report.objects_uploaded == len(entries)
    assert current_release(remote_dir) == release.name
    live = remote_dir / "current"
    for rel, local in entries.items():
        assert (live / rel).read_bytes() == local.read_bytes(), rel
    manifest = read_json(live / "release.json")
    assert manifest["files"] == {f.path: f.sha256 for f in release.files}
    assert not list((remote_dir / "objects").glob("*.part"))


def test_no_change_redeploy_uploads_nothing(board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    entries = _model(tmp_path / "a")
    first, _ = _publish(board_conn, remote_dir, entries)

    second, report = _publish(board_conn, remote_dir, entries)

    assert second.name == first.name
    assert report.bytes_sent == 0
    assert report.objects_uploaded == 0
    assert report.objects_skipped == len(entries)
    assert current_release(remote_dir) == first.name


def test_changed_shard_only_reuploaded(board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    first, _ = _publish(board_conn, remote_dir, _model(tmp_path / "a"))
    changed = _model(tmp_path / "b", shard=b"weights-A" * 1500)

    second, report = _publish(board_conn, remote_dir, changed)

    assert second.name != first.name
    assert report.objects_uploaded == 1
    assert report.bytes_sent == changed["model/model-00001.safetensors"].stat().st_size
    assert current_release(remote_dir) == second.name
    assert (remote_dir / "previous").is_symlink()
    assert os.path.basename(os.readlink(remote_dir / "previous")) == first.name
    # Unchanged files are hard links to the same stored object, not copies.
    old = remote_dir / "releases" / first.name / "model" / "model-00002.safetensors"
    new = remote_dir / "releases" / second.name / "model" / "model-00002.safetensors"
    assert os.path.samefile(old, new)


def test_corrupt_object_on_board_reuploaded(board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    entries = _model(tmp_path / "a")
    release, _ = _publish(board_conn, remote_dir, entries)
    shard = remote_dir / "current" / "model" / "model-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))

    again, report = _publish(board_conn, remote_dir, entries)

    assert again.name == release.name
    assert report.corrupt_on_board == [_sha(entries["model/model-00002.safetensors"])]
    assert report.bytes_sent == entries["model/model-00002.safetensors"].stat().st_size
    assert shard.read_bytes() == entries["model/model-00002.safetensors"].read_bytes()


def test_failure_before_activate_keeps_current(board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    first, _ = _publish(board_conn, remote_dir, _model(tmp_path / "a"))
    second = board_release.build_release(_model(tmp_path / "b", config=b'{"hidden_size": 128}'))

    report = board_release.publish(board_conn, str(remote_dir), conn_python(board_conn), second, progress=False)

    assert report.release_dir.endswith(second.name)
    assert current_release(remote_dir) == first.name
    assert (remote_dir / "current" / "model" / "config.json").read_bytes() == b'{"hidden_size": 64}'


# The uploader runs in its own process, slowed to ~40 MB/s so the test can kill it halfway.
_SLOW_UPLOAD = r"""
import json, sys, time
from pathlib import Path
from stages import board_release, board_ssh
original = board_ssh.iter_chunks
def slow_chunks(path, offset):
    for chunk in original(path, offset):
        time.sleep(0.1)
        yield chunk
board_ssh.iter_chunks = slow_chunks
args = json.loads(sys.argv[1])
target = board_ssh.BoardTarget(args["host"], args["port"], args["user"], args["key_file"], Path(args["known_hosts"]))
release = board_release.build_release({"model/big.bin": Path(args["file"])})
with board_ssh.connect(target) as conn:
    board_release.publish(conn, args["remote_dir"], args["python"], release, progress=False)
"""


def test_killed_upload_resumes_remainder(board_standin, board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    big = _write(tmp_path / "big.bin", os.urandom(48 << 20))
    sha = _sha(big)
    part = remote_dir / "objects" / f"{sha}.part"
    args = {
        "host": board_standin.host,
        "port": board_standin.port,
        "user": board_standin.user,
        "key_file": board_standin.key_file,
        "known_hosts": board_standin.known_hosts,
        "remote_dir": str(remote_dir),
        "python": board_standin.python,
        "file": str(big),
    }
    import json

    uploader = subprocess.Popen([sys.executable, "-c", _SLOW_UPLOAD, json.dumps(args)], cwd=REPO)
    try:
        reached = wait_until(lambda: part.exists() and part.stat().st_size >= (12 << 20), timeout=60, interval=0.01)
    finally:
        uploader.send_signal(signal.SIGKILL)
        uploader.wait()
    assert reached, "the upload never reached 12 MiB"
    # sshd finishes writing what it already received before it notices the dead client.
    assert wait_until(lambda: _stable_size(part), timeout=10)
    done = part.stat().st_size
    assert 0 < done < big.stat().st_size

    release = board_release.build_release({"model/big.bin": big})
    report = board_release.publish(board_conn, str(remote_dir), conn_python(board_conn), release, progress=False)

    assert report.resumed_bytes == done
    assert report.bytes_sent == big.stat().st_size - done
    stored = remote_dir / "objects" / sha
    assert _sha(stored) == sha
    assert not part.exists()


def _stable_size(path: Path, samples: list[int] = []) -> bool:  # noqa: B006 - remembers the last size seen
    size = path.stat().st_size
    samples.append(size)
    return len(samples) > 3 and samples[-1] == samples[-2] == samples[-3]


def test_rollback_switches_back(board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    python = conn_python(board_conn)
    first, _ = _publish(board_conn, remote_dir, _model(tmp_path / "a"))
    second, _ = _publish(board_conn, remote_dir, _model(tmp_path / "b", config=b'{"hidden_size": 128}'))

    state = board_release.rollback(board_conn, str(remote_dir), python)

    assert state == {"current": first.name, "previous": second.name}
    assert current_release(remote_dir) == first.name
    assert (remote_dir / "current" / "model" / "config.json").read_bytes() == b'{"hidden_size": 64}'
    again = board_release.rollback(board_conn, str(remote_dir), python)
    assert again == {"current": second.name, "previous": first.name}


def test_rollback_without_previous_fails(board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    first, _ = _publish(board_conn, remote_dir, _model(tmp_path / "a"))

    with pytest.raises(RemoteCommandError) as raised:
        board_release.rollback(board_conn, str(remote_dir), conn_python(board_conn))

    assert "no previous release" in str(raised.value)
    assert board_conn.host in str(raised.value)
    assert current_release(remote_dir) == first.name


def test_prune_keeps_requested_releases(board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    names = []
    for i in range(4):
        release, report = _publish(board_conn, remote_dir, _model(tmp_path / str(i), config=b'{"v": %d}' % i), keep=1)
        names.append(release.name)

    kept = sorted(p.name for p in (remote_dir / "releases").iterdir())
    assert kept == sorted(names[-2:])
    assert current_release(remote_dir) == names[-1]
    assert os.path.basename(os.readlink(remote_dir / "previous")) == names[-2]
    # Objects no release links any more are deleted: only the two kept configs remain, plus shared files.
    objects = sorted(p.name for p in (remote_dir / "objects").iterdir())
    assert len(objects) == 3 + 2


def test_switch_is_atomic_under_reads(tmp_path: Path) -> None:
    """Readers resolving `current` during 300 switches always find a complete release."""
    sys.path.insert(0, str(REPO / "deploy"))
    import board_ops

    root = tmp_path / "root"
    objects = root / "objects"
    objects.mkdir(parents=True)
    names = []
    for i in range(2):
        data = f"release {i}".encode()
        sha = hashlib.sha256(data).hexdigest()
        (objects / sha).write_bytes(data)
        name = f"r{i}"
        board_ops.assemble({"remote_dir": str(root), "release": name, "files": {"model/config.json": sha}})
        names.append(name)
    failures = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                (root / "current" / "model" / "config.json").read_bytes()
            except OSError as exc:
                failures.append(exc)

    board_ops.activate({"remote_dir": str(root), "release": names[0], "keep": 5})
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(300):
            board_ops.activate({"remote_dir": str(root), "release": names[(i + 1) % 2], "keep": 5})
    finally:
        stop.set()
        reader.join()

    assert failures == []
