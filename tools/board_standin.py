"""Start, stop or inspect the board stand-in: an OpenSSH ``sshd`` on 127.0.0.1 that plays the OrangePi AIpro.

The stand-in lets anyone without a board (and the tests, and CI) run the deploy
stage for real. ``sshd`` runs as the current user on a high port with its own
host key and its own client key. The board's Python is the local board venv
(``.venv-board``: Python 3.9, MindSpore 2.5 nightly, MindNLP 0.4.1) on the CPU.

Run from the repository root::

    python -m tools.board_standin start     # or: make board
    python -m tools.board_standin status
    python -m tools.board_standin stop      # or: make board-stop

``start`` writes everything into the state folder (default ``.board/``,
gitignored): ``ssh_host_ed25519_key`` (the stand-in's host key),
``client_key`` (the key the deploy stage logs in with), ``authorized_keys``,
``known_hosts`` (the host key, pinned for ``[127.0.0.1]:PORT``), ``root/``
(the board's release folder), ``sshd_config``, ``sshd.pid``, ``sshd.log`` and
``standin.json``. The deploy stage reads ``standin.json`` to fill the empty
``deploy.user``, ``deploy.remote_dir`` and ``deploy.python`` params.
``start`` is idempotent: a running stand-in on the same port is left as is.
``stop`` ends the ``sshd`` listener and its session processes by PID, and
only after checking that the PID still runs this stand-in's ``sshd_config``.

Limits: the stand-in is not a 310B. It runs MindSpore on the CPU, so it checks
the transfer, the release switch and the MindNLP code path, but nothing
Ascend-specific. As root, OpenSSH 9.x needs its privilege separation folder
``/run/sshd``; ``start`` creates it when missing, as the openssh-server
package does at boot. ``sshd`` only listens on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = REPO / ".board"
DEFAULT_BOARD_PYTHON = REPO / ".venv-board" / "bin" / "python"
HOST = "127.0.0.1"
# OpenSSH's compiled-in privilege separation folder on Debian and Ubuntu.
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT_S = 15.0


class StandinError(RuntimeError):
    """The stand-in could not be started or stopped; the message names the cause and the fix."""


@dataclass(frozen=True)
class Standin:
    """A running stand-in, as recorded in ``standin.json``."""

    host: str
    port: int
    user: str
    pid: int
    state_dir: str
    remote_dir: str
    python: str
    key_file: str
    known_hosts: str
    sshd_config: str
    log: str


# --------------------------------------------------------------------------- paths and keys


def _sshd_binary() -> Path:
    """Return the absolute path of ``sshd``, which it needs to re-execute itself per connection."""
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if not found:
        raise StandinError("sshd not found; install the openssh-server package (make sshd), then rerun.")
    return Path(found).resolve()


def _keygen(path: Path, comment: str) -> None:
    """Create an unencrypted ed25519 key pair at ``path`` unless it exists."""
    if path.exists() and path.with_suffix(".pub").exists():
        return
    path.unlink(missing_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    path.chmod(0o600)


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, replacing the file atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _sshd_config(state: Path, port: int, user: str) -> str:
    return "\n".join(
        [
            "# Board stand-in, written by tools/board_standin.py; regenerated on every start.",
            f"ListenAddress {HOST}:{port}",
            f"HostKey {state / 'ssh_host_ed25519_key'}",
            f"PidFile {state / 'sshd.pid'}",
            f"AuthorizedKeysFile {state / 'authorized_keys'}",
            f"AllowUsers {user}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            # Root may log in, but only with a key: CI and this container run as root.
            "PermitRootLogin prohibit-password",
            # PAM needs root and a system service file; key auth does not use it.
            "UsePAM no",
            # StrictModes rejects keys below world-writable folders such as /tmp,
            # where the tests keep their state; the key files themselves are 0600.
            "StrictModes no",
            "Subsystem sftp internal-sftp",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
            "PrintMotd no",
            "MaxSessions 32",
            "MaxStartups 64:30:128",
            "LogLevel VERBOSE",
            "",
        ]
    )


# --------------------------------------------------------------------------- process checks


def _pid_runs_config(pid: int, config: Path) -> bool:
    """Return True when ``pid`` is alive and is an sshd started with ``config``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # sshd rewrites its process title to "sshd: /usr/sbin/sshd -f CONFIG ... [listener] ...",
    # one string, so match the option as a substring of the space-joined command line.
    return f" -f {config} ".encode() in cmdline.replace(b"\0", b" ") + b" "


def _children(pid: int) -> list[int]:
    """Return the PIDs whose parent is ``pid`` (the sshd session processes of a listener)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent PID; the command name in field 2 may contain spaces.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    return not Path(f"/proc/{pid}").exists()


def _banner_ok(port: int, timeout: float = 2.0) -> bool:
    """Return True when a server on ``HOST:port`` sends an SSH banner."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- commands


def load(state_dir: Path = DEFAULT_STATE_DIR) -> Standin | None:
    """Return the recorded stand-in of ``state_dir`` when its sshd still runs, else None."""
    record = Path(state_dir) / "standin.json"
    try:
        data = json.loads(record.read_text(encoding="utf-8"))
        standin = Standin(**data)
    except (OSError, ValueError, TypeError):
        return None
    if not _pid_runs_config(standin.pid, Path(standin.sshd_config)):
        return None
    return standin


def start(
    state_dir: Path = DEFAULT_STATE_DIR,
    port: int | None = None,
    board_python: Path | None = None,
) -> Standin:
    """Start the stand-in's sshd on ``127.0.0.1:port`` (idempotent) and return its record.

    ``port`` defaults to ``deploy.port`` from params.yaml. ``board_python`` is
    the Python that plays the board's (default ``.venv-board/bin/python``).
    """
    state = Path(state_dir).resolve()
    if port is None:
        port = _params_port()
    python = Path(board_python) if board_python else DEFAULT_BOARD_PYTHON
    if not python.exists():
        raise StandinError(f"board Python {python} not found; build the board venv with `make install-board`.")

    running = load(state)
    if running and running.port == port and _banner_ok(port):
        return running
    if running:
        stop(state)

    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)
    user = getpass.getuser()
    _keygen(state / "ssh_host_ed25519_key", "silu-pipeline board stand-in host key")
    _keygen(state / "client_key", f"silu-pipeline deploy key for {user}")
    _write_private(state / "authorized_keys", (state / "client_key.pub").read_text(encoding="utf-8"))
    host_key = (state / "ssh_host_ed25519_key.pub").read_text(encoding="utf-8").split()
    # known_hosts names a non-22 port as [host]:port, like ssh-keyscan -p does.
    _write_private(state / "known_hosts", f"[{HOST}]:{port} {host_key[0]} {host_key[1]}\n")
    (state / "root").mkdir(exist_ok=True)
    config = state / "sshd_config"
    _write_private(config, _sshd_config(state, port, user))
    log = state / "sshd.log"
    (state / "sshd.pid").unlink(missing_ok=True)

    if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True)

    sshd = _sshd_binary()
    check = subprocess.run([str(sshd), "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode != 0:
        raise StandinError(f"`{sshd} -t -f {config}` rejected the config: {check.stderr.strip()}")
    # Without -D, sshd forks into the background after binding the port and writes its PID file.
    result = subprocess.run(
        [str(sshd), "-f", str(config), "-E", str(log)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise StandinError(f"`{sshd} -f {config}` exited {result.returncode}: {result.stderr.strip()} {_tail(log)}")

    pid = _wait_for_pid(state / "sshd.pid", config, port, log)
    standin = Standin(
        host=HOST,
        port=port,
        user=user,
        pid=pid,
        state_dir=str(state),
        remote_dir=str(state / "root"),
        python=str(python.absolute()),
        key_file=str(state / "client_key"),
        known_hosts=str(state / "known_hosts"),
        sshd_config=str(config),
        log=str(log),
    )
    _write_private(state / "standin.json", json.dumps(asdict(standin), indent=2) + "\n")
    return standin


def _wait_for_pid(pidfile: Path, config: Path, port: int, log: Path) -> int:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if _pid_runs_config(pid, config) and _banner_ok(port):
                return pid
        # The daemonized sshd exits after logging this, so there is nothing left to wait for.
        if "Cannot bind any address" in _tail(log):
            raise StandinError(f"sshd could not listen on {HOST}:{port}: the port is in use. {_tail(log)}")
        time.sleep(0.05)
    raise StandinError(
        f"sshd did not start listening on {HOST}:{port} within {START_TIMEOUT_S:.0f} s; is the port in use? {_tail(log)}"
    )


def _tail(log: Path, lines: int = 5) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "sshd log: " + " | ".join(text[-lines:]) if text else ""


def stop(state_dir: Path = DEFAULT_STATE_DIR) -> bool:
    """Stop the stand-in of ``state_dir``; return False when none was running."""
    state = Path(state_dir).resolve()
    config = state / "sshd_config"
    pids = set()
    for source in (state / "sshd.pid", state / "standin.json"):
        with contextlib.suppress(OSError, ValueError):
            text = source.read_text(encoding="utf-8")
            pids.add(json.loads(text)["pid"] if source.suffix == ".json" else int(text.strip()))
    stopped = False
    for pid in pids:
        if not _pid_runs_config(pid, config):
            continue
        # Session processes outlive their listener, so end them as well.
        for child in _children(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, 5.0):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5.0)
        stopped = True
    (state / "standin.json").unlink(missing_ok=True)
    return stopped


def _params_port() -> int:
    sys.path.insert(0, str(REPO))
    from stages.config import load_params

    return load_params(REPO / "params.yaml").deploy.port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.board_standin", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help="Stand-in state folder.")
    parser.add_argument("--port", type=int, default=None, help="Port on 127.0.0.1 (default: deploy.port).")
    parser.add_argument("--board-python", type=Path, default=None, help="Python that plays the board's (default: .venv-board).")
    args = parser.parse_args(argv)

    try:
        if args.command == "start":
            standin = start(args.state_dir, args.port, args.board_python)
            print(f"board stand-in listening on {standin.host}:{standin.port} as {standin.user} (pid {standin.pid})")
            print(f"board root {standin.remote_dir}, board python {standin.python}")
            return 0
        if args.command == "stop":
            print("board stand-in stopped" if stop(args.state_dir) else "board stand-in was not running")
            return 0
        standin = load(args.state_dir)
        if standin is None:
            print("board stand-in is not running; start it with `make board`")
            return 1
        print(json.dumps(asdict(standin), indent=2))
        return 0
    except (StandinError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
