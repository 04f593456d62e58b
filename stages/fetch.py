"""Fetch one image: from an http(s) URL through a shared session, or from a file under the image root.

Used by the download stage (stages/download.py), which schedules fetches on
worker threads, retries the ones marked ``retryable`` and writes the shards.

- :func:`resolve_target` decides where ``image.path`` is read from. Only
  http(s) URLs and regular files inside the image root are allowed; other
  schemes, absolute paths, ``..`` and symlinks that leave the root are dropped.
- Unless ``download.allow_private_hosts`` is set, a URL or redirect whose host
  is, or resolves to, a non-public address is dropped as ``blocked address``.
  The check runs when each connection is opened, after DNS resolution.
- :class:`Fetcher` makes one attempt per call, redirects included, and
  never sleeps. All threads share one ``requests.Session`` with a connection
  pool per host. Each request has connect and read timeouts, and the whole
  fetch has a deadline. The deadline is enforced by shutting the socket down
  when it passes, so a server that sends one byte a second is cut too.
- The body is streamed to a file named by its SHA-256. It is kept when its
  first bytes are an image signature (:func:`sniff_image`), whatever the
  Content-Type says, and dropped once it exceeds ``download.max_bytes``.

Every failure becomes a :class:`FetchResult` with one of :data:`FETCH_REASONS`;
only a failed write to the output folder raises (:class:`StageError`).

Not covered: robots.txt, per-host rate limits, SOCKS proxies with the
deadline (the socket is not watched there, so only the timeouts apply), and
checks that need decoding (truncated or tiny images pass).
"""

from __future__ import annotations

import errno
import hashlib
import heapq
import http.client
import ipaddress
import os
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlsplit
from urllib.request import getproxies

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NameResolutionError, NewConnectionError

from stages.common import StageError
from stages.config import DownloadParams

# --------------------------------------------------------------------------- drop reasons

# Record-level reasons (blank line, invalid json, ...) are in
# stages.records.DROP_REASONS. docs/data.md explains each one.
HTTP_403 = "http 403"
HTTP_404 = "http 404"
HTTP_410 = "http 410"
HTTP_429 = "http 429"
HTTP_4XX = "http 4xx"  # any other 4xx
HTTP_5XX = "http 5xx"
HTTP_OTHER = "http status"  # 1xx, or 3xx without a Location header
TIMEOUT = "timeout"
TOO_LARGE = "too large"
NOT_AN_IMAGE = "not an image"
EMPTY_BODY = "empty body"
INCOMPLETE_BODY = "incomplete body"
INVALID_ENCODING = "invalid encoding"
INVALID_RESPONSE = "invalid response"
CONNECTION_ERROR = "connection error"
DNS_ERROR = "dns error"
TLS_ERROR = "tls error"
REDIRECT_LOOP = "redirect loop"
TOO_MANY_REDIRECTS = "too many redirects"
UNSUPPORTED_SCHEME = "unsupported scheme"
INVALID_URL = "invalid url"
BLOCKED_ADDRESS = "blocked address"
PATH_OUTSIDE_ROOT = "path outside image_root"
NO_IMAGE_ROOT = "no image_root"
FILE_NOT_FOUND = "file not found"
FILE_NOT_READABLE = "file not readable"
UNEXPECTED_ERROR = "unexpected error"

FETCH_REASONS = (
    HTTP_403, HTTP_404, HTTP_410, HTTP_429, HTTP_4XX, HTTP_5XX, HTTP_OTHER, TIMEOUT, TOO_LARGE,
    NOT_AN_IMAGE, EMPTY_BODY, INCOMPLETE_BODY, INVALID_ENCODING, INVALID_RESPONSE, CONNECTION_ERROR,
    DNS_ERROR, TLS_ERROR, REDIRECT_LOOP, TOO_MANY_REDIRECTS, UNSUPPORTED_SCHEME, INVALID_URL, BLOCKED_ADDRESS,
    PATH_OUTSIDE_ROOT, NO_IMAGE_ROOT, FILE_NOT_FOUND, FILE_NOT_READABLE, UNEXPECTED_ERROR,
)

# --------------------------------------------------------------------------- constants

CHUNK_BYTES = 64 * 1024
SNIFF_BYTES = 16  # enough for every signature in sniff_image
DRAIN_BYTES = 64 * 1024  # error and redirect bodies up to this size are read to keep the connection
# An extension tried when a local `image.path` is a bare id without one.
LOCAL_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FetchResult:
    """The outcome of fetching one image: kept with its bytes' hash, or dropped with a reason.

    ``retryable`` and ``retry_after`` steer the scheduler and are not stored.
    """

    status: str  # "ok" or "dropped"
    reason: str | None = None
    detail: str | None = None
    sha256: str | None = None
    size: int | None = None  # bytes, after Content-Encoding is decoded
    content_type: str | None = None  # as the server sent it; None for local files
    retryable: bool = False
    retry_after: float | None = None  # seconds, from a Retry-After header

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def kept(cls, sha256: str, size: int, content_type: str | None) -> FetchResult:
        return cls("ok", sha256=sha256, size=size, content_type=clean_text(content_type))

    @classmethod
    def dropped(cls, reason: str, detail: str | None = None, **kwargs: Any) -> FetchResult:
        return cls("dropped", reason=reason, detail=clean_text(detail), **kwargs)


# A URL's scheme and authority up to the last "@", the end of its userinfo.
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")
# C0 and C1 controls (CR and LF included), bidi overrides and isolates.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def redact_url(text: str) -> str:
    """Replace the userinfo (``user:password@``) of every URL in ``text`` with ``***@``; host, path and query stay."""
    return _USERINFO.sub(r"\1***@", text)


def clean_text(text: str | None) -> str | None:
    """Make server or exception text safe for one manifest field or log line.

    Userinfo in URLs is redacted, control and bidi characters are escaped
    (``\\r``, ``\\x1b``, ``\\u202e``), and a lone surrogate becomes an escape.
    """
    if text is None:
        return None
    text = _UNPRINTABLE.sub(lambda match: ascii(match.group())[1:-1], redact_url(text.strip()))
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class Target:
    """The source of one image: an http(s) URL or a file under the image root."""

    url: str | None = None
    path: Path | None = None
    key: str = ""  # identity for the journal and for fetching a URL once per shard
    fingerprint: str = ""  # part of the shard fingerprint; the same on every machine


# --------------------------------------------------------------------------- targets


def sniff_image(head: bytes) -> str | None:
    """Return the image format that the first bytes announce, or None when they are no image signature."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return "heif"
    return None


def resolve_target(image_path: str, image_root: Path | None) -> Target | FetchResult:
    """Turn ``image.path`` into a :class:`Target`, or a dropped result saying why it cannot be read.

    ``image_root`` must already be resolved (absolute, without symlinks), or
    None when relative paths are not allowed.
    """
    match = _SCHEME.match(image_path)
    if match:
        scheme = match.group(1).lower()
        if scheme not in ("http", "https"):
            return FetchResult.dropped(UNSUPPORTED_SCHEME, f"{scheme}: URLs are not fetched")
        try:
            host = urlsplit(image_path).hostname
        except ValueError as exc:
            return FetchResult.dropped(INVALID_URL, str(exc))
        if not host:
            return FetchResult.dropped(INVALID_URL, "no host name")
        return Target(url=image_path, key=image_path, fingerprint=image_path)
    return _resolve_local(image_path, image_root)


def _resolve_local(image_path: str, image_root: Path | None) -> Target | FetchResult:
    if "\x00" in image_path:
        return FetchResult.dropped(PATH_OUTSIDE_ROOT, "path contains a NUL byte")
    pure = PurePosixPath(image_path.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", image_path):
        return FetchResult.dropped(PATH_OUTSIDE_ROOT, "absolute path")
    if image_root is None:
        return FetchResult.dropped(NO_IMAGE_ROOT, "a relative path, but `data.image_root` is empty")

    # resolve() follows symlinks, so a link inside the root that points
    # outside it is caught by the same check as `..`.
    candidates = [image_root / pure]
    if not pure.suffix:
        candidates += [image_root / pure.with_name(pure.name + suffix) for suffix in LOCAL_SUFFIXES]
    for candidate in candidates:
        resolved = candidate.resolve()
        if not resolved.is_relative_to(image_root):
            return FetchResult.dropped(PATH_OUTSIDE_ROOT, "resolves outside the image root")
        try:
            stat = resolved.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            return FetchResult.dropped(FILE_NOT_READABLE, f"{type(exc).__name__}: {exc.strerror}")
        if not resolved.is_file():
            return FetchResult.dropped(FILE_NOT_FOUND, "not a regular file")
        relative = resolved.relative_to(image_root).as_posix()
        return Target(
            path=resolved,
            key=f"file:{relative}:{stat.st_size}:{stat.st_mtime_ns}",
            # NOTE: a local file replaced by one of exactly the same size is
            # not noticed by the fingerprint; delete the shard to refetch it.
            fingerprint=f"file:{relative}:{stat.st_size}",
        )
    return FetchResult.dropped(FILE_NOT_FOUND, "no such file under the image root")


# --------------------------------------------------------------------------- body sink


class _BodySink:
    """Stream one body into a file named by its SHA-256, checking size and signature on the way."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = folder
        self.max_bytes = max_bytes
        self.size = 0
        self.hasher = hashlib.sha256()
        self.head = bytearray()  # bytes held back until the signature is known
        self.sniffed = False
        self.tmp: Path | None = None
        self.file: Any = None

    def write(self, chunk: bytes, content_type: str | None) -> FetchResult | None:
        """Add a chunk; return a dropped result when the body is too large or no image."""
        if not chunk:
            return None
        self.size += len(chunk)
        if self.size > self.max_bytes:
            return FetchResult.dropped(TOO_LARGE, f"body exceeds download.max_bytes = {self.max_bytes}")
        self.hasher.update(chunk)
        if self.sniffed:
            self._write_file(chunk)
            return None
        self.head += chunk
        if len(self.head) < SNIFF_BYTES:
            return None
        return self._sniff(content_type)

    def finish(self, content_type: str | None) -> FetchResult:
        """Close the file and move it to its final name; return the result."""
        if not self.sniffed:
            if not self.head:
                return FetchResult.dropped(EMPTY_BODY, "0 bytes")
            dropped = self._sniff(content_type)
            if dropped is not None:
                return dropped
        self._close()
        digest = self.hasher.hexdigest()
        final = self.folder / digest
        assert self.tmp is not None
        try:
            if final.exists():
                self.tmp.unlink()
            else:
                os.replace(self.tmp, final)
        except OSError as exc:
            raise write_failed(final, exc) from exc
        self.tmp = None
        return FetchResult.kept(digest, self.size, content_type)

    def discard(self) -> None:
        self._close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None

    def _sniff(self, content_type: str | None) -> FetchResult | None:
        head = bytes(self.head)
        if sniff_image(head) is None:
            return FetchResult.dropped(
                NOT_AN_IMAGE, f"Content-Type {content_type or 'missing'}, body starts with {head[:SNIFF_BYTES]!r}"
            )
        self.sniffed = True
        self.tmp = self.folder / f"tmp-{uuid.uuid4().hex}"
        try:
            self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish() or discard()
        except OSError as exc:
            raise write_failed(self.tmp, exc) from exc
        self._write_file(head)
        self.head = bytearray()
        return None

    def _write_file(self, data: bytes) -> None:
        try:
            self.file.write(data)
        except OSError as exc:
            raise write_failed(self.tmp, exc) from exc

    def _close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                raise write_failed(self.tmp, exc) from exc
            finally:
                self.file = None


def write_failed(path: Path | None, exc: OSError) -> StageError:
    """Return the StageError for a failed write of ``path``, with the fix for a full disk."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "the disk is full; free space or move the output folder to a larger disk, then rerun"
    else:
        hint = "check that the output folder is writable, then rerun"
    return StageError(f"cannot write {path}: {exc.strerror or exc}; {hint} (fetched images are kept).")


# --------------------------------------------------------------------------- deadline watchdog


class _DeadlineWatchdog:
    """Shut down the socket of a fetch that passed its deadline, so a blocked read returns at once.

    Timeouts bound each read, not the whole response: a server that sends one
    byte every few seconds never trips them. Worker threads set their deadline,
    and every connection registers its socket when it waits for a response.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._owner: dict[socket.socket, int] = {}  # socket -> sequence number of its current registration
        self._sequence = 0
        self._local = threading.local()
        self._thread: threading.Thread | None = None

    def begin(self, deadline: float) -> None:
        """Set the monotonic deadline of the calling thread's next requests."""
        self._local.deadline = deadline
        self._local.sockets = []

    def end(self) -> None:
        """Forget the calling thread's registrations; call before the thread starts another fetch."""
        with self._lock:
            for sock, sequence in getattr(self._local, "sockets", []):
                # The connection may be back in the pool and registered by
                # another thread since; leave that registration alone.
                if self._owner.get(sock) == sequence:
                    del self._owner[sock]
        self._local.deadline = None
        self._local.sockets = []

    def watch(self, sock: socket.socket | None) -> None:
        deadline = getattr(self._local, "deadline", None)
        if sock is None or deadline is None:
            return
        with self._lock:
            self._sequence += 1
            # A pooled connection moves between threads: the newest
            # registration replaces the previous owner's deadline.
            self._owner[sock] = self._sequence
            heapq.heappush(self._heap, (deadline, self._sequence, sock))
            self._local.sockets.append((sock, self._sequence))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="download-deadline", daemon=True)
                self._thread.start()
            self._lock.notify()

    def expire_all(self) -> None:
        """Shut down every watched socket now, so in-flight fetches end without waiting for their deadline."""
        with self._lock:
            sockets = list(self._owner)
            self._owner.clear()
            self._heap.clear()
        for sock in sockets:
            _shutdown(sock)

    def _run(self) -> None:
        with self._lock:
            while True:
                while self._heap and self._owner.get(self._heap[0][2]) != self._heap[0][1]:
                    heapq.heappop(self._heap)  # finished or re-registered
                if not self._heap:
                    self._lock.wait()
                    continue
                deadline, _, sock = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._lock.wait(delay)
                    continue
                heapq.heappop(self._heap)
                del self._owner[sock]
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        # socket.socket.shutdown, not SSLSocket.shutdown, which would clear
        # TLS state under the reading thread.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


_WATCHDOG = _DeadlineWatchdog()


def cut_in_flight() -> None:
    """End every fetch that is waiting on the network now (for an aborted run)."""
    _WATCHDOG.expire_all()


class _WatchedHTTPConnection(HTTPConnection):
    def getresponse(self) -> Any:  # type: ignore[override]
        _WATCHDOG.watch(self.sock)
        return super().getresponse()


class _WatchedHTTPSConnection(HTTPSConnection):
    def getresponse(self) -> Any:  # type: ignore[override]
        _WATCHDOG.watch(self.sock)
        return super().getresponse()


# --------------------------------------------------------------------------- address rule


class BlockedAddressError(urllib3.exceptions.HTTPError):
    """A host resolves only to addresses that ``download.allow_private_hosts`` rules out."""


def is_blocked_address(address: str) -> bool:
    """Return True for an IP address that is not public: loopback, private, link-local, multicast, reserved, unspecified.

    An IPv4-mapped IPv6 address is judged by its IPv4 address.
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        not ip.is_global  # also covers shared (100.64/10) and documentation ranges
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast  # 224/4 counts as global in Python 3.11
        or ip.is_reserved
        or ip.is_unspecified
    )


def _blocked_literal(url: str) -> str | None:
    """Return why ``url`` is blocked when its host is a literal IP address that is not public, else None."""
    host = urlsplit(url).hostname or ""
    try:
        blocked = is_blocked_address(host)
    except ValueError:
        return None  # a host name: checked after resolution, when connecting
    return f"{host} is not a public address" if blocked else None


class _AddressRuleMixin:
    """Connect only to public addresses, checked after DNS resolution, so a rebinding name cannot pass.

    NOTE: through an HTTP proxy the connection goes to the proxy, which
    resolves the target itself, so only literal IP targets are checked there.
    """

    host: str
    port: int
    proxy: Any
    _dns_host: str

    def _new_conn(self) -> socket.socket:
        if self.proxy is not None:
            return super()._new_conn()  # type: ignore[misc]
        try:
            infos = socket.getaddrinfo(self._dns_host, self.port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        allowed = [address for address in addresses if not is_blocked_address(address)]
        if not allowed:
            raise BlockedAddressError(f"{self.host} resolves to {', '.join(addresses)}, no public address")
        name = self._dns_host
        error: NewConnectionError | None = None
        try:
            for address in allowed:
                # urllib3 connects to _dns_host; a literal address needs no second lookup.
                self._dns_host = address
                try:
                    return super()._new_conn()  # type: ignore[misc]
                except NewConnectionError as exc:
                    error = exc
        finally:
            self._dns_host = name
        assert error is not None
        raise error


class _GuardedHTTPConnection(_AddressRuleMixin, _WatchedHTTPConnection):
    pass


class _GuardedHTTPSConnection(_AddressRuleMixin, _WatchedHTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}
_GUARDED_POOLS = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}


class _WatchedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections register with the deadline watchdog and, unless allowed, skip private hosts."""

    def __init__(self, *args: Any, allow_private_hosts: bool = False, **kwargs: Any) -> None:
        # Set before super().__init__, which calls init_poolmanager.
        self.pool_classes = _WATCHED_POOLS if allow_private_hosts else _GUARDED_POOLS
        super().__init__(*args, **kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(self.pool_classes)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = dict(self.pool_classes)
        return manager


# --------------------------------------------------------------------------- fetching


class Fetcher:
    """Fetch one image per call: a URL through the shared session, or a local file.

    Thread-safe. A call makes one attempt (redirects included) and never
    sleeps; the caller schedules retries for results marked ``retryable``.
    """

    def __init__(self, params: DownloadParams):
        self.params = params
        self.session = requests.Session()
        adapter = _WatchedAdapter(
            pool_connections=max(16, params.workers * 2),  # hosts whose pools stay open
            pool_maxsize=params.workers,  # connections kept per host
            max_retries=0,
            allow_private_hosts=params.allow_private_hosts,
        )
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update(
            {
                "User-Agent": params.user_agent,
                "Accept": "image/avif,image/webp,image/*;q=0.9,*/*;q=0.5",
                "Accept-Encoding": "gzip, deflate",
            }
        )
        # Cookies set by one site must not travel with other requests.
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
        _read_environment_once(self.session)

    def close(self) -> None:
        self.session.close()

    def fetch(self, target: Target, deadline: float, folder: Path) -> FetchResult:
        """Fetch ``target`` into ``folder`` (file named by SHA-256) before the monotonic ``deadline``."""
        sink = _BodySink(folder, self.params.max_bytes)
        try:
            if target.path is not None:
                return self._read_file(target.path, sink)
            assert target.url is not None
            _WATCHDOG.begin(deadline)
            try:
                return self._fetch_url(target.url, deadline, sink)
            finally:
                _WATCHDOG.end()
        finally:
            sink.discard()

    def _read_file(self, path: Path, sink: _BodySink) -> FetchResult:
        try:
            handle = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return FetchResult.dropped(FILE_NOT_FOUND, "removed while the stage ran")
        except OSError as exc:
            return FetchResult.dropped(FILE_NOT_READABLE, f"{type(exc).__name__}: {exc.strerror}")
        with handle:
            while True:
                try:
                    chunk = handle.read(CHUNK_BYTES)
                except OSError as exc:
                    return FetchResult.dropped(FILE_NOT_READABLE, f"{type(exc).__name__}: {exc.strerror}")
                if not chunk:
                    break
                dropped = sink.write(chunk, None)
                if dropped is not None:
                    return dropped
        return sink.finish(None)

    def _fetch_url(self, url: str, deadline: float, sink: _BodySink) -> FetchResult:
        visited = {url}
        for hop in range(self.params.max_redirects + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _deadline_exceeded(self.params)
            blocked = None if self.params.allow_private_hosts else _blocked_literal(url)
            if blocked is not None:
                return FetchResult.dropped(BLOCKED_ADDRESS, blocked)
            timeout = (min(self.params.connect_timeout, remaining), min(self.params.read_timeout, remaining))
            try:
                response = self.session.get(url, stream=True, allow_redirects=False, timeout=timeout)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, http.client.HTTPException,
                    ValueError) as exc:
                return classify_error(exc, deadline, self.params)
            with response:
                if not response.is_redirect:
                    return self._read_body(response, deadline, sink)
                _drain(response)
                location = self.session.get_redirect_target(response) or ""
                next_url = urljoin(response.url, location)
                scheme = urlsplit(next_url).scheme.lower()
                if scheme not in ("http", "https"):
                    return FetchResult.dropped(UNSUPPORTED_SCHEME, f"redirect to {_shorten(next_url)}")
                if next_url in visited:
                    return FetchResult.dropped(REDIRECT_LOOP, f"redirect back to {_shorten(next_url)}")
                if hop == self.params.max_redirects:
                    return FetchResult.dropped(
                        TOO_MANY_REDIRECTS, f"more than download.max_redirects = {self.params.max_redirects}"
                    )
                visited.add(next_url)
                url = next_url
        raise AssertionError("unreachable: the loop returns on its last hop")

    def _read_body(self, response: requests.Response, deadline: float, sink: _BodySink) -> FetchResult:
        code = response.status_code
        if not 200 <= code < 300:
            _drain(response)
            return _status_result(response)
        content_type = response.headers.get("Content-Type")
        length = _content_length(response)
        if length is not None and length > self.params.max_bytes:
            return FetchResult.dropped(
                TOO_LARGE, f"Content-Length {length} exceeds download.max_bytes = {self.params.max_bytes}"
            )
        try:
            for chunk in response.raw.stream(CHUNK_BYTES, decode_content=True):
                dropped = sink.write(chunk, content_type)
                if dropped is not None:
                    return dropped
                if time.monotonic() >= deadline:
                    return _deadline_exceeded(self.params)
        except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException) as exc:
            return classify_error(exc, deadline, self.params)
        if time.monotonic() >= deadline:
            return _deadline_exceeded(self.params)
        return sink.finish(content_type)


def _read_environment_once(session: requests.Session) -> None:
    """Take proxies and the CA bundle from the environment once, instead of on every request.

    With ``trust_env`` on, requests 2.34 scans the environment and ~/.netrc
    on every request: 0.13 ms of CPU per request on the 2-core test machine,
    about 17% of the client's cost for a 404. NO_PROXY needs a per-URL
    decision, so with it set the per-request lookup stays.
    """
    if any(name.lower() == "no_proxy" for name in os.environ):
        return
    session.trust_env = False
    session.proxies.update({scheme: url for scheme, url in getproxies().items() if scheme in ("http", "https", "all")})
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle


def _drain(response: requests.Response) -> None:
    """Read a small unwanted body (error page, redirect) so the connection returns to the pool."""
    length = _content_length(response)
    if length is None or length > DRAIN_BYTES:
        return  # closing is cheaper than reading an unknown amount
    try:
        response.raw.read(length + 1, decode_content=False)
    except (urllib3.exceptions.HTTPError, OSError, http.client.HTTPException):
        pass  # the connection is closed instead


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length", "")
    try:
        length = int(value)
    except ValueError:
        return None
    return length if length >= 0 else None


def _status_result(response: requests.Response) -> FetchResult:
    code = response.status_code
    detail = f"HTTP {code} {response.reason or ''}".rstrip()
    if code in (403, 404, 410, 429):
        reason = f"http {code}"
    elif 400 <= code < 500:
        reason = HTTP_4XX
    elif 500 <= code < 600:
        reason = HTTP_5XX
    else:
        reason = HTTP_OTHER
    retry_after = None
    header = response.headers.get("Retry-After", "")
    if header.strip().isdigit():
        retry_after = float(header.strip())
    retryable = code == 429 or 500 <= code < 600
    return FetchResult.dropped(reason, detail, retryable=retryable, retry_after=retry_after)


def _deadline_exceeded(params: DownloadParams) -> FetchResult:
    return FetchResult.dropped(TIMEOUT, f"download.deadline of {params.deadline:g} s exceeded")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """Yield ``exc`` and every exception it wraps (causes, contexts, urllib3 reasons, arguments)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        linked += [arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)]
        stack.extend(item for item in linked if isinstance(item, BaseException))


def classify_error(exc: BaseException, deadline: float, params: DownloadParams) -> FetchResult:
    """Map a requests, urllib3 or socket exception to a fixed reason; connection errors and timeouts retry."""
    if time.monotonic() >= deadline:
        return _deadline_exceeded(params)
    causes = list(_causes(exc))
    blocked = next((cause for cause in causes if isinstance(cause, BlockedAddressError)), None)
    if blocked is not None:
        return FetchResult.dropped(BLOCKED_ADDRESS, str(blocked))

    def has(*kinds: type) -> BaseException | None:
        return next((cause for cause in causes if isinstance(cause, kinds)), None)

    # urllib3's NewConnectionError (refused, unresolvable) subclasses its
    # ConnectTimeoutError, so it is set aside before looking for timeouts.
    timeouts = [cause for cause in causes if not isinstance(cause, urllib3.exceptions.NewConnectionError)]
    if any(isinstance(cause, (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError))
           for cause in timeouts):
        return FetchResult.dropped(TIMEOUT, "connect timed out", retryable=True)
    if any(isinstance(cause, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError))
           for cause in timeouts):
        return FetchResult.dropped(TIMEOUT, "read timed out", retryable=True)
    resolution = has(socket.gaierror)
    if resolution is not None or has(urllib3.exceptions.NameResolutionError):
        # EAI_AGAIN is a temporary resolver failure; NXDOMAIN will not heal.
        temporary = isinstance(resolution, socket.gaierror) and resolution.errno == socket.EAI_AGAIN
        return FetchResult.dropped(DNS_ERROR, describe_exception(resolution or exc), retryable=temporary)
    if has(ssl.SSLError, requests.exceptions.SSLError, urllib3.exceptions.SSLError):
        return FetchResult.dropped(TLS_ERROR, describe_exception(has(ssl.SSLError) or exc))
    if has(requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema,
           urllib3.exceptions.LocationParseError, UnicodeError):
        return FetchResult.dropped(INVALID_URL, describe_exception(exc))
    incomplete = has(http.client.IncompleteRead, urllib3.exceptions.IncompleteRead)
    if incomplete is not None:
        return FetchResult.dropped(INCOMPLETE_BODY, _describe_incomplete(incomplete))
    if has(urllib3.exceptions.DecodeError, requests.exceptions.ContentDecodingError):
        return FetchResult.dropped(INVALID_ENCODING, "the Content-Encoding could not be decoded")
    if has(ConnectionError):  # refused, reset, remote closed (http.client.RemoteDisconnected)
        return FetchResult.dropped(CONNECTION_ERROR, describe_exception(has(ConnectionError) or exc), retryable=True)
    # requests' own exceptions subclass OSError, so only a socket-level one
    # means that the connection failed rather than the server's response.
    socket_errors = [cause for cause in causes
                     if isinstance(cause, OSError) and not isinstance(cause, requests.RequestException)]
    if has(http.client.HTTPException) and not socket_errors:
        return FetchResult.dropped(INVALID_RESPONSE, describe_exception(has(http.client.HTTPException) or exc))
    if socket_errors or has(requests.exceptions.ConnectionError, urllib3.exceptions.ProtocolError):
        cause = socket_errors[0] if socket_errors else exc
        return FetchResult.dropped(CONNECTION_ERROR, describe_exception(cause), retryable=True)
    raise exc


def _describe_incomplete(exc: BaseException) -> str:
    received = getattr(exc, "partial", None)
    if isinstance(received, (bytes, bytearray)):
        received = len(received)
    expected = getattr(exc, "expected", None)
    if isinstance(received, int) and isinstance(expected, int):
        return f"connection closed after {received} bytes, {expected} more expected"
    return describe_exception(exc)


def describe_exception(exc: BaseException) -> str:
    """Return a short, stable text for an exception: no object addresses."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{type(exc).__name__}: {exc.strerror}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return _shorten(_ADDRESS.sub("", text), 200)


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
