"""SSH to the board with paramiko: pinned host key, key or agent login, bounded commands, fast SFTP uploads.

Used by ``stages/deploy.py`` and ``stages/board_release.py``; not run on its own.

- Host key: checked against ``deploy.known_hosts`` (entries as ``[host]:port``
  for ports other than 22, hashed or plain, as ``ssh-keyscan`` writes them).
  An unknown host is rejected unless ``trust_new_host`` is set, which appends
  its key to the file and logs the SHA256 fingerprint. A host whose key
  differs from the pinned one, or that offers only key types other than the
  pinned ones, is always rejected.
- Login: the private key file, or every key in the SSH agent when the key file
  is empty. Passwords are never sent.
- Commands: :meth:`BoardConnection.run` reads stdout and stderr while the
  command runs (a full buffer would block it), waits for the exit status and
  treats a missing one (-1) as a failure. At its deadline it kills the
  command's whole session on the board with ``pkill -s``, because closing the
  channel leaves the remote process running.
- Uploads: :func:`upload_file` appends to a remote file from a given offset
  with pipelined 255 KiB SFTP writes (paramiko sends 32 KiB and waits for each
  reply by default). AES-GCM ciphers are preferred, because they cost less CPU
  than AES-CTR with a separate MAC.

Every error is a :class:`BoardError` whose message names the host, the
command and the tail of its stderr.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paramiko

log = logging.getLogger("stages.board_ssh")

# OpenSSH's sftp-server rejects messages over 256 KiB; 255 KiB leaves room for the header.
WRITE_REQUEST_BYTES = 255 * 1024
READ_CHUNK_BYTES = 4 << 20
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
STDERR_TAIL_LINES = 20
COMMAND_SHOWN_CHARS = 300
# Marker the command wrapper prints on stderr so a timeout can kill the remote session.
SESSION_MARKER = "__silu_session__"
KILL_TIMEOUT_S = 10.0
KEEPALIVE_S = 30


# --------------------------------------------------------------------------- errors


class BoardError(RuntimeError):
    """A failure on the board or on the way to it; ``str()`` names the host, and the command when there is one."""

    def __init__(self, host: str, message: str, command: str | None = None, stderr: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.message = message
        self.command = command
        self.stderr = stderr

    def __str__(self) -> str:
        text = f"board {self.host}: {self.message}"
        if self.command:
            text += f"\n  command: {shorten(self.command)}"
        tail = stderr_tail(self.stderr)
        if tail:
            text += "\n  stderr (last lines):\n    " + tail.replace("\n", "\n    ")
        return text


class BoardUnreachable(BoardError):
    """No TCP connection or SSH handshake with the board."""


class HostKeyError(BoardError):
    """The board's host key is not the pinned one."""


class UnknownHostKey(HostKeyError):
    """known_hosts has no key for the board and ``trust_new_host`` is off."""


class HostKeyMismatch(HostKeyError):
    """The board presented a key other than the one pinned in known_hosts; rejected even with ``trust_new_host``."""


class AuthError(BoardError):
    """The board rejected the login key(s), or no key was available."""


class PreflightError(BoardError):
    """The board lacks something the release needs: Python, MindSpore/MindNLP, tools, disk space."""


class RemoteCommandError(BoardError):
    """A remote command exited non-zero, or without an exit status (-1)."""

    def __init__(self, host: str, message: str, command: str | None = None, stderr: str = "", exit_status: int = -1):
        super().__init__(host, message, command, stderr)
        self.exit_status = exit_status


class CommandTimeout(RemoteCommandError):
    """A remote command ran past its deadline and was killed."""


class TransferError(BoardError):
    """An upload failed, stalled past the transfer timeout, or arrived with the wrong content."""


def shorten(text: str, limit: int = COMMAND_SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def stderr_tail(stderr: str, lines: int = STDERR_TAIL_LINES) -> str:
    kept = [line for line in stderr.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


# --------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class BoardTarget:
    """Login settings and timeouts for one board, built from the ``deploy`` params."""

    host: str
    port: int
    user: str
    key_file: str
    known_hosts: Path
    trust_new_host: bool = False
    connect_timeout: float = 10.0
    transfer_timeout: float = 60.0

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        """Host name as known_hosts writes it: bare for port 22, ``[host]:port`` otherwise."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


@dataclass(frozen=True)
class CommandResult:
    """Output of a finished remote command."""

    command: str
    exit_status: int
    stdout: str
    stderr: str
    seconds: float


def connect(target: BoardTarget) -> BoardConnection:
    """Open an SSH connection to the board, verify its host key and log in."""
    try:
        sock = socket.create_connection((target.host, target.port), timeout=target.connect_timeout)
    except TimeoutError:
        raise BoardUnreachable(
            target.label, f"TCP connect timed out after {target.connect_timeout:g} s; is the board on and reachable?"
        ) from None
    except OSError as exc:
        hint = (
            "start the stand-in with `make board`"
            if target.host in ("127.0.0.1", "localhost")
            else "check deploy.host and deploy.port"
        )
        raise BoardUnreachable(target.label, f"TCP connect failed: {exc.strerror or exc}; {hint}.") from None

    transport = paramiko.Transport(sock)
    transport.banner_timeout = target.connect_timeout
    transport.handshake_timeout = target.connect_timeout
    transport.auth_timeout = target.connect_timeout
    options = transport.get_security_options()
    supported = [cipher for cipher in PREFERRED_CIPHERS if cipher in options.ciphers]
    options.ciphers = tuple(supported) + tuple(c for c in options.ciphers if c not in supported)
    try:
        known = _pinned_keys(target)
        if known:
            # Ask for a pinned key type first, as OpenSSH does, so the check below compares like with like.
            options.key_types = tuple(t for t in known if t in options.key_types) + tuple(
                t for t in options.key_types if t not in known
            )
        try:
            transport.start_client(timeout=target.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise BoardUnreachable(target.label, f"SSH handshake failed: {exc or type(exc).__name__}") from None
        _check_host_key(target, transport.get_remote_server_key(), known)
        _login(target, transport)
    except BaseException:
        transport.close()
        raise
    transport.set_keepalive(KEEPALIVE_S)
    return BoardConnection(target, transport)


def _pinned_keys(target: BoardTarget) -> dict[str, paramiko.PKey]:
    path = Path(target.known_hosts)
    if not path.exists():
        return {}
    keys = paramiko.HostKeys()
    try:
        keys.load(str(path))
    except (OSError, paramiko.SSHException, ValueError) as exc:
        # ValueError covers UnicodeDecodeError: paramiko reads the file as UTF-8 text.
        raise HostKeyError(
            target.label, f"cannot read known_hosts file {path}: {exc}; fix or recreate it with ssh-keyscan"
        ) from None
    entry = keys.lookup(target.known_hosts_name)
    return dict(entry.items()) if entry else {}


def fingerprint(key: paramiko.PKey) -> str:
    """Return the OpenSSH-style ``SHA256:...`` fingerprint that ``ssh-keygen -lf`` prints."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _check_host_key(target: BoardTarget, key: paramiko.PKey, known: dict[str, paramiko.PKey]) -> None:
    offered = f"{key.get_name()} {fingerprint(key)}"
    if known:
        pinned = known.get(key.get_name())
        if pinned is not None and pinned == key:
            return
        pinned_text = ", ".join(f"{name} {fingerprint(k)}" for name, k in known.items())
        raise HostKeyMismatch(
            target.label,
            f"host key mismatch: the board offered {offered} but {target.known_hosts} pins {pinned_text} "
            f"for {target.known_hosts_name}. Either the board was reinstalled or someone is intercepting "
            "the connection. Check the fingerprint on the board's console (ssh-keygen -lf "
            "/etc/ssh/ssh_host_ed25519_key.pub), then delete the old line with "
            f"`ssh-keygen -R '{target.known_hosts_name}' -f {target.known_hosts}`.",
        )
    if not target.trust_new_host:
        raise UnknownHostKey(
            target.label,
            f"unknown host key: {target.known_hosts} has no entry for {target.known_hosts_name}; the board "
            f"offered {offered}. Compare it with `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the "
            f"board's console, then add it with `ssh-keyscan -p {target.port} {target.host} >> "
            f"{target.known_hosts}`, or set deploy.trust_new_host: true for one run.",
        )
    path = Path(target.known_hosts)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(f"{target.known_hosts_name} {key.get_name()} {key.get_base64()}\n")
    log.warning(
        "board %s: trusted a new host key %s (deploy.trust_new_host is true) and added it to %s",
        target.label,
        offered,
        path,
    )


def _login(target: BoardTarget, transport: paramiko.Transport) -> None:
    if target.key_file:
        path = Path(target.key_file).expanduser()
        try:
            keys = [paramiko.PKey.from_path(path)]
        except FileNotFoundError:
            raise AuthError(
                target.label, f"key file {path} not found; set deploy.key_file, or empty to use the SSH agent."
            ) from None
        except paramiko.PasswordRequiredException:
            raise AuthError(
                target.label,
                f"key file {path} is encrypted; add it to ssh-agent (ssh-add {path}) and set deploy.key_file "
                "to an empty string so the agent is used.",
            ) from None
        except (paramiko.SSHException, ValueError, OSError) as exc:
            raise AuthError(target.label, f"cannot load key file {path}: {exc}") from None
        source = f"key file {path}"
    else:
        agent = paramiko.Agent()
        keys = list(agent.get_keys())
        source = f"SSH agent (SSH_AUTH_SOCK={os.environ.get('SSH_AUTH_SOCK', 'unset')})"
        if not keys:
            raise AuthError(
                target.label, f"no keys in the {source}; start ssh-agent and ssh-add your key, or set deploy.key_file."
            )
    for key in keys:
        try:
            transport.auth_publickey(target.user, key)
        except paramiko.BadAuthenticationType as exc:
            raise AuthError(
                target.label, f"the board does not accept public keys (it offers {', '.join(exc.allowed_types)})."
            ) from None
        except paramiko.AuthenticationException:
            continue
        except (paramiko.SSHException, EOFError) as exc:
            raise AuthError(target.label, f"login failed: {exc}") from None
        if transport.is_authenticated():
            return
    raise AuthError(
        target.label,
        f"the board rejected every key from the {source} for user {target.user!r}; add the public key to "
        f"~{target.user}/.ssh/authorized_keys on the board (ssh-copy-id) or fix deploy.user.",
    )


# --------------------------------------------------------------------------- commands


class BoardConnection:
    """A logged-in SSH connection to the board."""

    def __init__(self, target: BoardTarget, transport: paramiko.Transport) -> None:
        self.target = target
        self.transport = transport

    @property
    def host(self) -> str:
        return self.target.label

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> BoardConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _watchdog(self, seconds: float) -> Iterator[threading.Event]:
        """Close the connection if the block takes longer than ``seconds``; the yielded event tells whether it did.

        paramiko waits without a timeout for a channel to open, for an exec or
        subsystem request to be answered and for the SFTP version reply, so a
        board that stops responding would hang those calls forever. Closing the
        transport makes them raise.
        """
        fired = threading.Event()

        def fire() -> None:
            fired.set()
            log.error("board %s: no reply within %g s; closing the connection", self.host, seconds)
            self.transport.close()

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        timer.start()
        try:
            yield fired
        finally:
            timer.cancel()

    def open_sftp(self) -> paramiko.SFTPClient:
        timeout = self.target.transfer_timeout
        with self._watchdog(timeout) as fired:
            try:
                sftp = paramiko.SFTPClient.from_transport(self.transport)
            except (paramiko.SSHException, EOFError, OSError) as exc:
                reason = f"no reply within {timeout:g} s (deploy.transfer_timeout)" if fired.is_set() else str(exc)
                raise TransferError(self.host, f"cannot open an SFTP session: {reason}") from None
        if sftp is None:
            raise TransferError(self.host, "cannot open an SFTP session: the board refused the channel.")
        # Applies to every request and reply: a stalled board raises socket.timeout instead of hanging.
        sftp.get_channel().settimeout(self.target.transfer_timeout)
        return sftp

    def run(
        self,
        command: str,
        timeout: float,
        stdin: bytes | None = None,
        on_line: Callable[[str], None] | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run ``command`` through the login shell; return its output, exit status and duration.

        ``on_line`` receives each stdout line as it arrives. After ``timeout``
        seconds the command's session is killed on the board and
        :class:`CommandTimeout` is raised. With ``check``, a non-zero or
        missing (-1) exit status raises :class:`RemoteCommandError`.
        """
        # OpenSSH starts each session command as a session leader, so $$ is the session id of
        # everything the command starts, including children that change their process group.
        wrapped = f"echo {SESSION_MARKER} $$ >&2; {command}"
        start = time.monotonic()
        setup_timeout = self.target.connect_timeout
        with self._watchdog(setup_timeout) as fired:
            try:
                channel = self.transport.open_session(timeout=setup_timeout)
                channel.exec_command(wrapped)
                if stdin:
                    channel.sendall(stdin)
                channel.shutdown_write()
            except (paramiko.SSHException, EOFError, OSError) as exc:
                reason = f"no reply within {setup_timeout:g} s (deploy.connect_timeout)" if fired.is_set() else str(exc)
                raise RemoteCommandError(self.host, f"cannot start the command: {reason}", command) from None

        out = _LineCollector(on_line)
        err = _LineCollector(None)
        deadline = start + timeout
        try:
            poll = channel.fileno()
            while True:
                drained = _drain(channel, out, err)
                if channel.eof_received and not drained and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
                if time.monotonic() > deadline:
                    session = _session_id(err.text)
                    killed = self._kill_session(session)
                    raise CommandTimeout(
                        self.host,
                        f"timed out after {timeout:g} s; "
                        + (f"killed remote session {session}" if killed else "could not kill the remote session"),
                        command,
                        _without_marker(err.text),
                    )
                if not drained:
                    select.select([poll], [], [], 0.05)
            # The exit status arrives with or just after EOF; -1 means the board closed the channel without one.
            status_deadline = time.monotonic() + min(10.0, max(deadline - time.monotonic(), 1.0))
            while not channel.exit_status_ready() and time.monotonic() < status_deadline:
                time.sleep(0.01)
            status = channel.exit_status if channel.exit_status_ready() else -1
        finally:
            channel.close()
        out.flush()
        result = CommandResult(command, status, out.text, _without_marker(err.text), time.monotonic() - start)
        if check and status != 0:
            what = "exited without an exit status (-1)" if status == -1 else f"exited with status {status}"
            raise RemoteCommandError(self.host, what, command, result.stderr, status)
        return result

    def _kill_session(self, session: int | None) -> bool:
        """Kill every process of the remote session ``session``; return True when the kill command ran."""
        if session is None:
            return False
        kill = f"pkill -KILL -s {session}; kill -KILL -- -{session} 2>/dev/null; true"
        try:
            with self._watchdog(KILL_TIMEOUT_S):
                channel = self.transport.open_session(timeout=KILL_TIMEOUT_S)
                channel.exec_command(kill)
                channel.recv_exit_status()
                channel.close()
        except (paramiko.SSHException, EOFError, OSError) as exc:
            log.error("board %s: could not kill remote session %s: %s", self.host, session, exc)
            return False
        return True


class _LineCollector:
    """Accumulate a byte stream; hand complete UTF-8 lines to a callback as they arrive."""

    def __init__(self, on_line: Callable[[str], None] | None) -> None:
        self.on_line = on_line
        self.chunks: list[bytes] = []
        self.pending = b""

    def feed(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.on_line is None:
            return
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            self.on_line(line.decode("utf-8", errors="replace"))

    def flush(self) -> None:
        if self.on_line is not None and self.pending:
            self.on_line(self.pending.decode("utf-8", errors="replace"))
            self.pending = b""

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", errors="replace")


def _drain(channel: paramiko.Channel, out: _LineCollector, err: _LineCollector) -> bool:
    drained = False
    while channel.recv_ready():
        out.feed(channel.recv(1 << 16))
        drained = True
    while channel.recv_stderr_ready():
        err.feed(channel.recv_stderr(1 << 16))
        drained = True
    return drained


def _session_id(stderr: str) -> int | None:
    for line in stderr.splitlines()[:5]:
        if line.startswith(SESSION_MARKER):
            try:
                return int(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def _without_marker(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith(SESSION_MARKER))


# --------------------------------------------------------------------------- uploads


def iter_chunks(path: Path, offset: int) -> Iterator[bytes]:
    with path.open("rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(READ_CHUNK_BYTES):
            yield chunk


def upload_file(
    conn: BoardConnection,
    sftp: paramiko.SFTPClient,
    local: Path,
    remote: str,
    offset: int,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Append ``local[offset:]`` to the remote file ``remote``; return the bytes sent.

    ``offset`` must equal the remote file's current size (0 creates or
    truncates it). Writes are pipelined: replies are checked in batches and
    all of them before this returns, so any failed write raises here.
    """
    sent = 0
    try:
        handle = sftp.open(remote, "ab" if offset else "wb")
        try:
            if offset and handle.stat().st_size != offset:
                raise TransferError(
                    conn.host,
                    f"{remote} is {handle.stat().st_size} bytes on the board, expected {offset} to resume; "
                    "rerun the deploy to start this file again.",
                )
            # Instance attribute: paramiko's class default of 32 KiB makes one round trip per 32 KiB.
            handle.MAX_REQUEST_SIZE = WRITE_REQUEST_BYTES
            handle.set_pipelined(True)
            for chunk in iter_chunks(local, offset):
                handle.write(chunk)
                sent += len(chunk)
                if on_bytes:
                    on_bytes(len(chunk))
        finally:
            handle.close()
    except TimeoutError:
        raise TransferError(
            conn.host,
            f"upload of {local} to {remote} stalled for {conn.target.transfer_timeout:g} s after {offset + sent} "
            "bytes (deploy.transfer_timeout); rerun to resume from there.",
        ) from None
    except OSError as exc:
        hint = ""
        if getattr(exc, "errno", None) == errno.ENOSPC or "Failure" in str(exc):
            hint = " The board's disk may be full; check `df -h` there."
        raise TransferError(
            conn.host, f"upload of {local} to {remote} failed after {offset + sent} bytes: {exc}.{hint}"
        ) from None
    except (paramiko.SSHException, EOFError) as exc:
        raise TransferError(
            conn.host, f"connection lost while uploading {local} to {remote} after {offset + sent} bytes: {exc}"
        ) from None
    return sent


def quote(value: str | Path) -> str:
    """Quote one argument for the board's POSIX shell."""
    return shlex.quote(str(value))
