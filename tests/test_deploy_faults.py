"""Deploy failures against the real sshd stand-in (and a stub server for what sshd cannot do).

Each failure must be rejected with an error naming the host (and the command
when there is one), and must leave the board's `current` release as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

from stages import board_release
from stages.board_ssh import (
    AuthError,
    BoardConnection,
    BoardUnreachable,
    CommandTimeout,
    HostKeyError,
    HostKeyMismatch,
    PreflightError,
    RemoteCommandError,
    TransferError,
    UnknownHostKey,
    connect,
    upload_file,
)
from stages.deploy import deploy
from tests.board_plugin import (
    current_release,
    make_params,
    make_target,
    processes_matching,
    wait_until,
    write_script,
)
from tools import board_standin as standin_tool


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def _activate_first_release(conn: BoardConnection, remote_dir: Path, python: str, tmp_path: Path) -> str:
    """Publish and activate a small release, so a later failure has a `current` to keep."""
    config = tmp_path / "first" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text('{"release": "first"}')
    release = board_release.build_release({"model/config.json": config})
    board_release.publish(conn, str(remote_dir), python, release, progress=False)
    board_release.activate(conn, str(remote_dir), python, release.name, 1)
    return release.name


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2_vl"}')
    return folder


# --------------------------------------------------------------------------- host keys and login


def test_wrong_host_key_rejected(board_standin, tmp_path: Path) -> None:
    other = _keygen(tmp_path / "other_host_key")
    known_hosts = tmp_path / "known_hosts"
    key_type, key_b64 = other.with_suffix(".pub").read_text().split()[:2]
    known_hosts.write_text(f"[127.0.0.1]:{board_standin.port} {key_type} {key_b64}\n")

    for trust in (False, True):
        with pytest.raises(HostKeyMismatch) as raised:
            connect(make_target(board_standin, known_hosts=known_hosts, trust_new_host=trust))
        message = str(raised.value)
        assert f"127.0.0.1:{board_standin.port}" in message
        assert "host key mismatch" in message
        assert "ssh-keygen -R" in message
    assert known_hosts.read_text().count("\n") == 1


def test_unreadable_known_hosts_rejected(board_standin, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_bytes(b"garbage\n\x00\xff\n")

    with pytest.raises(HostKeyError) as raised:
        connect(make_target(board_standin, known_hosts=known_hosts))
    message = str(raised.value)
    assert str(known_hosts) in message
    assert "cannot read known_hosts file" in message


def test_unknown_host_rejected_unless_trusted(board_standin, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"

    with pytest.raises(UnknownHostKey) as raised:
        connect(make_target(board_standin, known_hosts=known_hosts))
    assert "ssh-keyscan" in str(raised.value)
    assert not known_hosts.exists()

    with connect(make_target(board_standin, known_hosts=known_hosts, trust_new_host=True)) as conn:
        assert conn.run("echo ok", 10).stdout == "ok\n"
    pinned = (Path(board_standin.known_hosts).read_text().split())[1:3]
    assert known_hosts.read_text().split()[1:3] == pinned
    with connect(make_target(board_standin, known_hosts=known_hosts)) as conn:
        assert conn.run("echo again", 10).stdout == "again\n"


def test_bad_client_key_rejected(board_standin, tmp_path: Path) -> None:
    stranger = _keygen(tmp_path / "stranger_key")

    with pytest.raises(AuthError) as raised:
        connect(make_target(board_standin, key_file=str(stranger)))

    assert "rejected every key" in str(raised.value)
    assert board_standin.user in str(raised.value)


def test_missing_key_file_rejected(board_standin, tmp_path: Path) -> None:
    with pytest.raises(AuthError) as raised:
        connect(make_target(board_standin, key_file=str(tmp_path / "no_such_key")))

    assert "not found" in str(raised.value)


def test_unreachable_board_names_fix(board_standin) -> None:
    with pytest.raises(BoardUnreachable) as raised:
        connect(make_target(board_standin, port=standin_tool.free_port()))

    assert "make board" in str(raised.value)


# --------------------------------------------------------------------------- preflight


def test_missing_board_python_rejected(board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    release = board_release.build_release({"infer.py": write_script(tmp_path / "infer.py", "")})

    with pytest.raises(PreflightError) as raised:
        board_release.publish(board_conn, str(remote_dir), "/nonexistent/bin/python", release, progress=False)

    assert "/nonexistent/bin/python not found" in str(raised.value)
    assert not remote_dir.exists()


def test_board_without_mindspore_rejected(board_conn: BoardConnection, remote_dir: Path, tmp_path: Path) -> None:
    plain = shutil.which("python3") or "/usr/bin/python3"
    check = subprocess.run(
        [plain, "-c", "import importlib.util as u; print(u.find_spec('mindnlp'))"], capture_output=True, text=True
    )
    if check.stdout.strip() != "None":
        pytest.skip(f"{plain} has MindNLP installed, so it cannot play a board without it")
    release = board_release.build_release({"infer.py": write_script(tmp_path / "infer.py", "")})

    with pytest.raises(PreflightError) as raised:
        board_release.publish(board_conn, str(remote_dir), plain, release, progress=False)

    message = str(raised.value)
    assert "MindSpore" in message
    assert "MindNLP" in message
    assert not (remote_dir / "objects").exists()


@pytest.fixture
def tiny_disk(remote_dir: Path) -> Iterator[Path]:
    """``remote_dir`` as a 2 MiB tmpfs, unmounted afterwards (mounting needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root; CI runs as root")
    remote_dir.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(remote_dir)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs failed here: {mounted.stderr.strip()}")
    try:
        yield remote_dir
    finally:
        subprocess.run(["umount", "-l", str(remote_dir)], check=True)


def test_small_disk_rejected_before_upload(
    board_conn: BoardConnection, tiny_disk: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    python = str(board_conn_python())
    monkeypatch.setattr(board_release, "DISK_MARGIN_BYTES", 0)
    first = _activate_first_release(board_conn, tiny_disk, python, tmp_path)
    big = tmp_path / "big" / "model.safetensors"
    big.parent.mkdir()
    big.write_bytes(os.urandom(3 << 20))
    release = board_release.build_release({"model/model.safetensors": big})

    with pytest.raises(PreflightError) as raised:
        board_release.publish(board_conn, str(tiny_disk), python, release, progress=False)

    message = str(raised.value)
    assert "not enough disk space" in message
    assert "3.1 MB" in message
    assert not list((tiny_disk / "objects").glob("*.part"))
    assert current_release(tiny_disk) == first


def board_conn_python() -> Path:
    from tests.board_plugin import BOARD_PYTHON

    return BOARD_PYTHON


# --------------------------------------------------------------------------- remote run


HANGING_INFER = """
import json, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "{marker}"])
print(json.dumps({{"type": "load", "device": "CPU", "load_s": 0.0}}), flush=True)
time.sleep(600)
"""

FAILING_INFER = """
import sys
sys.stderr.write("Traceback (most recent call last):\\n  RuntimeError: device memory exhausted {marker}\\n")
sys.exit(3)
"""

PARTLY_FAILING_INFER = """
import json, sys
print(json.dumps({"type": "load", "device": "CPU", "dtype": "float32", "load_s": 0.1, "import_s": 0.2,
                  "python": "3.9", "mindspore": "x", "mindnlp": "y", "error": None}), flush=True)
print(json.dumps({"type": "answer", "id": "0000", "output": "ok", "latency_s": 0.5, "new_tokens": 3,
                  "tokens_per_s": 6.0, "error": None}), flush=True)
print(json.dumps({"type": "answer", "id": "0001", "output": None, "latency_s": 0.1, "new_tokens": 0,
                  "tokens_per_s": None, "error": "ValueError: bad image"}), flush=True)
sys.exit(1)
"""


def test_hanging_inference_killed(board_standin, board_conn, remote_dir, fake_model, deploy_dataset_dir, tmp_path) -> None:
    marker = f"silu-hang-{uuid.uuid4().hex}"
    first = _activate_first_release(board_conn, remote_dir, board_standin.python, tmp_path)
    script = write_script(tmp_path / "infer.py", HANGING_INFER.format(marker=marker))
    params = make_params(board_standin, remote_dir, run_timeout=2.0)

    with pytest.raises(CommandTimeout) as raised:
        deploy(
            params, fake_model, deploy_dataset_dir, tmp_path / "out", tmp_path / "metrics.json", script, tmp_path / "none.json"
        )

    message = str(raised.value)
    assert "deploy.run_timeout = 2 s" in message
    assert "infer.py" in message
    assert wait_until(lambda: not processes_matching(marker), timeout=10), processes_matching(marker)
    assert current_release(remote_dir) == first


def test_host_side_timeout_kills_session(board_conn: BoardConnection) -> None:
    """Without a remote `timeout`, the host kills the whole remote session at the deadline."""
    marker = f"silu-sleep-{uuid.uuid4().hex}"
    python = board_conn_python()
    command = f"{python} -c 'import time; time.sleep(600)' {marker} & {python} -c 'import time; time.sleep(600)' {marker}"

    with pytest.raises(CommandTimeout) as raised:
        board_conn.run(command, timeout=2)

    assert "killed remote session" in str(raised.value)
    assert wait_until(lambda: not processes_matching(marker), timeout=10), processes_matching(marker)


def test_remote_nonzero_exit_reported(board_standin, board_conn, remote_dir, fake_model, deploy_dataset_dir, tmp_path) -> None:
    marker = f"silu-fail-{uuid.uuid4().hex}"
    first = _activate_first_release(board_conn, remote_dir, board_standin.python, tmp_path)
    script = write_script(tmp_path / "infer.py", FAILING_INFER.format(marker=marker))

    with pytest.raises(RemoteCommandError) as raised:
        deploy(make_params(board_standin, remote_dir), fake_model, deploy_dataset_dir, tmp_path / "out",
               tmp_path / "metrics.json", script, tmp_path / "none.json")  # fmt: skip

    message = str(raised.value)
    assert raised.value.exit_status == 3
    assert f"board {board_standin.user}@127.0.0.1:{board_standin.port}" in message
    assert "command: cd " in message
    assert f"device memory exhausted {marker}" in message
    assert current_release(remote_dir) == first


def test_failed_request_keeps_current(board_standin, board_conn, remote_dir, fake_model, deploy_dataset_dir, tmp_path) -> None:
    first = _activate_first_release(board_conn, remote_dir, board_standin.python, tmp_path)
    script = write_script(tmp_path / "infer.py", PARTLY_FAILING_INFER)
    out = tmp_path / "out"

    with pytest.raises(RemoteCommandError) as raised:
        deploy(make_params(board_standin, remote_dir), fake_model, deploy_dataset_dir, out, tmp_path / "metrics.json",
               script, tmp_path / "none.json")  # fmt: skip

    assert "1 of 2 requests failed" in str(raised.value)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [row["error"] for row in answers] == [None, "ValueError: bad image"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["failed"] == 1
    assert current_release(remote_dir) == first


def test_stalled_board_times_out(board_standin, remote_dir: Path, tmp_path: Path) -> None:
    """A board that stops reading (its sshd session is stopped) fails uploads and commands at their timeouts."""
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(16 << 20))
    remote_dir.mkdir(parents=True)
    before = set(standin_tool._children(board_standin.pid))
    with connect(make_target(board_standin, transfer_timeout=2.0, connect_timeout=2.0)) as conn:
        sftp = conn.open_sftp()
        sessions = [pid for pid in standin_tool._children(board_standin.pid) if pid not in before]
        assert sessions
        stopped = _stop_tree(sessions)
        try:
            with pytest.raises(TransferError) as upload_error:
                upload_file(conn, sftp, big, f"{remote_dir}/big.part", 0)
            with pytest.raises(RemoteCommandError) as command_error:
                conn.run("echo never", timeout=10)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)

    assert "stalled for 2 s" in str(upload_error.value)
    assert "deploy.transfer_timeout" in str(upload_error.value)
    assert "no reply within 2 s" in str(command_error.value)
    assert "echo never" in str(command_error.value)


def _stop_tree(pids: list[int]) -> list[int]:
    stopped = []
    for pid in pids:
        for child in [pid, *standin_tool._children(pid)]:
            os.kill(child, signal.SIGSTOP)
            stopped.append(child)
    return stopped


# --------------------------------------------------------------------------- stub server


class _NoExitStatusServer(paramiko.ServerInterface):
    """Accepts any public key and any command, then closes the channel without an exit status."""

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        def reply() -> None:
            # paramiko sends the exec reply only after this method returns. Closing the channel
            # before that would fail the client at exec time instead of at the exit status.
            time.sleep(0.5)
            channel.sendall(b"partial output\n")
            channel.sendall_stderr(b"board process crashed\n")
            channel.shutdown_write()
            channel.close()

        threading.Thread(target=reply, daemon=True).start()
        return True


@pytest.fixture
def stub_board(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A paramiko stub server on 127.0.0.1 port 0; yields its port and a known_hosts file pinning it."""
    host_key_path = _keygen(tmp_path / "stub_host_key")
    host_key = paramiko.Ed25519Key.from_private_key_file(str(host_key_path))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    known_hosts = tmp_path / "stub_known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.get_name()} {host_key.get_base64()}\n")
    transports = []

    def serve() -> None:
        try:
            sock, _ = listener.accept()
        except OSError:
            return
        transport = paramiko.Transport(sock)
        transport.add_server_key(host_key)
        transports.append(transport)
        transport.start_server(server=_NoExitStatusServer())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port, known_hosts
    listener.close()
    for transport in transports:
        transport.close()


def test_missing_exit_status_is_failure(board_standin, stub_board: tuple[int, Path]) -> None:
    port, known_hosts = stub_board
    target = make_target(board_standin, port=port, known_hosts=known_hosts)

    with connect(target) as conn, pytest.raises(RemoteCommandError) as raised:
        conn.run("python infer.py", timeout=10)

    assert raised.value.exit_status == -1
    message = str(raised.value)
    assert "without an exit status (-1)" in message
    assert "python infer.py" in message
    assert "board process crashed" in message
