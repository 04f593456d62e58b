"""The board stand-in: sshd on 127.0.0.1 with its own keys, idempotent start, clean stop by PID."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.board_plugin import BOARD_PYTHON, make_target, require_board_python
from tools import board_standin


@pytest.fixture
def own_standin(tmp_path: Path):
    """A second stand-in, separate from the session one, so start/stop can be tested on it."""
    require_board_python()
    state = tmp_path / "board"
    yield state
    board_standin.stop(state)


def test_standin_start_writes_keys_and_record(own_standin: Path) -> None:
    port = board_standin.free_port()
    standin = board_standin.start(own_standin, port, BOARD_PYTHON)

    assert standin.port == port
    assert standin.host == "127.0.0.1"
    record = json.loads((own_standin / "standin.json").read_text())
    assert record["pid"] == standin.pid
    assert record["remote_dir"] == str(own_standin.resolve() / "root")
    assert Path(record["remote_dir"]).is_dir()
    assert record["python"] == str(BOARD_PYTHON)
    known_hosts = (own_standin / "known_hosts").read_text().split()
    assert known_hosts[0] == f"[127.0.0.1]:{port}"
    assert known_hosts[1] == "ssh-ed25519"
    for name in ("client_key", "ssh_host_ed25519_key", "known_hosts", "authorized_keys", "sshd_config"):
        mode = stat.S_IMODE((own_standin / name).stat().st_mode)
        assert mode == 0o600, f"{name} has mode {oct(mode)}"
    config = (own_standin / "sshd_config").read_text()
    assert f"ListenAddress 127.0.0.1:{port}" in config
    assert "PasswordAuthentication no" in config


def test_standin_accepts_openssh_client(own_standin: Path) -> None:
    standin = board_standin.start(own_standin, board_standin.free_port(), BOARD_PYTHON)

    result = subprocess.run(
        [
            "ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={standin.known_hosts}", "-i", standin.key_file,
            "-p", str(standin.port), f"{standin.user}@127.0.0.1", "echo board-ok",
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "board-ok"


def test_standin_start_is_idempotent(own_standin: Path) -> None:
    port = board_standin.free_port()
    first = board_standin.start(own_standin, port, BOARD_PYTHON)
    second = board_standin.start(own_standin, port, BOARD_PYTHON)

    assert second.pid == first.pid
    assert board_standin.load(own_standin) == first


def test_standin_stop_ends_listener_and_sessions(own_standin: Path) -> None:
    from stages.board_ssh import connect

    standin = board_standin.start(own_standin, board_standin.free_port(), BOARD_PYTHON)
    conn = connect(make_target(standin))
    sessions = board_standin._children(standin.pid)
    assert sessions, "an open connection should have an sshd session process"

    assert board_standin.stop(own_standin) is True

    conn.close()
    for pid in [standin.pid, *sessions]:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"pid {pid} still running"
    assert board_standin.load(own_standin) is None
    assert not (own_standin / "standin.json").exists()
    assert board_standin.stop(own_standin) is False


def test_standin_stop_ignores_reused_pid(own_standin: Path) -> None:
    """A PID file naming a process that is not this stand-in's sshd is never signalled."""
    own_standin.mkdir(parents=True)
    (own_standin / "sshd.pid").write_text(str(os.getpid()))

    assert board_standin.stop(own_standin) is False


def test_standin_restarts_on_new_port(own_standin: Path) -> None:
    first = board_standin.start(own_standin, board_standin.free_port(), BOARD_PYTHON)
    second_port = board_standin.free_port()
    second = board_standin.start(own_standin, second_port, BOARD_PYTHON)

    assert second.port == second_port
    assert not Path(f"/proc/{first.pid}").exists() or _is_zombie(first.pid)
    assert (own_standin / "known_hosts").read_text().startswith(f"[127.0.0.1]:{second_port} ")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return True


def test_standin_port_in_use_fails_fast(own_standin: Path) -> None:
    import socket
    import time

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        started = time.monotonic()

        with pytest.raises(board_standin.StandinError, match="the port is in use"):
            board_standin.start(own_standin, busy.getsockname()[1], BOARD_PYTHON)

    assert time.monotonic() - started < board_standin.START_TIMEOUT_S
    assert not (own_standin / "standin.json").exists()
