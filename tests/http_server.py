"""A loopback HTTP server that serves images and the faults a downloader meets on the web.

Runs ``http.server.ThreadingHTTPServer`` on 127.0.0.1 and a free port, in a
daemon thread, with HTTP/1.1 keep-alive, plain or with a self-signed
certificate (``make_certificate``). Every request is logged (path with
query, and the time), so tests can assert how often a URL was fetched.

Routes (``KEY`` is any text that names an independent counter):

- ``/img/NAME`` a registered image (``add_image``); the query string is ignored
- ``/status/CODE`` that status with a short text body
- ``/flaky/N/KEY`` 503 for the first N requests of KEY, then a JPEG
- ``/retry-after/KEY`` 429 with ``Retry-After: 0`` once, then a JPEG
- ``/html`` 200 with an HTML page and ``Content-Type: image/jpeg``
- ``/slow-headers?delay=S`` waits S seconds before the status line
- ``/drip?interval=S`` JPEG headers, then one byte every S seconds, forever
- ``/endless`` a JPEG signature, then zeros as fast as possible, no Content-Length
- ``/big?size=N&length=1`` N bytes of JPEG; ``length=0`` omits Content-Length (closes instead)
- ``/short`` Content-Length 5000 but 100 bytes, then close
- ``/reset`` resets the connection (RST) without a response
- ``/redirect/N?to=PATH`` N redirects, then PATH (default ``/img/target.jpg``)
- ``/loop/a`` and ``/loop/b`` redirect to each other
- ``/redirect-ftp`` redirects to an ftp: URL
- ``/wrong-type`` a PNG sent as ``text/plain``
- ``/gzip`` a JPEG with ``Content-Encoding: gzip``
- ``/empty`` 200 with an empty body
- ``/bad-gzip`` ``Content-Encoding: gzip`` over bytes that are not gzip
- ``/garbage`` a reply that is not HTTP
- ``/delay/S/NAME`` a registered image after S seconds
- ``/dead/...`` 404 (for many-URL benchmarks)
"""

from __future__ import annotations

import datetime
import gzip
import io
import ipaddress
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from PIL import Image


def make_image(width: int = 64, height: int = 48, color: tuple[int, int, int] = (200, 30, 30),
               image_format: str = "JPEG") -> bytes:
    """Return the bytes of a small solid-colour image."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, image_format)
    return buffer.getvalue()


JPEG = make_image()
PNG = make_image(32, 32, (20, 120, 200), "PNG")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, each
    # keep-alive response waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # the request log below replaces stderr lines

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.owner.log(self.path)
        parts = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        segments = [segment for segment in parts.path.split("/") if segment]
        route = segments[0] if segments else ""
        handler = getattr(self, f"route_{route.replace('-', '_')}", None)
        if handler is None:
            self.send_body(404, b"no such route", "text/plain")
            return
        try:
            handler(segments[1:], query)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: expected for drip, endless and big bodies

    # ---- helpers

    def send_body(self, code: int, body: bytes, content_type: str = "image/jpeg",
                  headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def start_close_delimited(self) -> None:
        """Send 200 JPEG headers without Content-Length: the body ends when the connection closes."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()

    def redirect(self, location: str, code: int = 302) -> None:
        self.send_response(code)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    # ---- routes

    def route_img(self, rest: list[str], query: dict[str, str]) -> None:
        name = "/".join(rest)
        data = self.server.owner.images.get(name)
        if data is None:
            self.send_body(404, b"not found", "text/plain")
        else:
            self.send_body(200, data)

    def route_dead(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(404, b"not found", "text/plain")

    def route_delay(self, rest: list[str], query: dict[str, str]) -> None:
        time.sleep(float(rest[0]))
        self.route_img(rest[1:], query)

    def route_status(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(int(rest[0]), f"status {rest[0]}".encode(), "text/plain")

    def route_flaky(self, rest: list[str], query: dict[str, str]) -> None:
        failures, key = int(rest[0]), "/".join(rest[1:])
        if self.server.owner.bump(f"flaky/{key}") <= failures:
            self.send_body(503, b"try later", "text/plain")
        else:
            self.send_body(200, JPEG)

    def route_retry_after(self, rest: list[str], query: dict[str, str]) -> None:
        if self.server.owner.bump(f"retry-after/{'/'.join(rest)}") == 1:
            self.send_body(429, b"slow down", "text/plain", {"Retry-After": "0"})
        else:
            self.send_body(200, JPEG)

    def route_html(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(200, b"<!doctype html><html><body>Not here</body></html>", "image/jpeg")

    def route_slow_headers(self, rest: list[str], query: dict[str, str]) -> None:
        time.sleep(float(query.get("delay", "5")))
        self.send_body(200, JPEG)

    def route_drip(self, rest: list[str], query: dict[str, str]) -> None:
        interval = float(query.get("interval", "0.05"))
        self.start_close_delimited()
        self.wfile.write(JPEG[:16])
        self.wfile.flush()
        for _ in range(100_000):
            time.sleep(interval)
            self.wfile.write(b"\x00")
            self.wfile.flush()

    def route_endless(self, rest: list[str], query: dict[str, str]) -> None:
        self.start_close_delimited()
        self.wfile.write(JPEG[:16])
        block = bytes(64 * 1024)
        for _ in range(100_000):  # 6.4 GB at most; the client stops far earlier
            self.wfile.write(block)

    def route_big(self, rest: list[str], query: dict[str, str]) -> None:
        size = int(query.get("size", "100000"))
        body = JPEG[:16] + bytes(size - 16)
        if query.get("length", "1") == "1":
            self.send_body(200, body)
            return
        self.start_close_delimited()
        self.wfile.write(body)

    def route_short(self, rest: list[str], query: dict[str, str]) -> None:
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "5000")
        self.end_headers()
        self.wfile.write(JPEG[:100])

    def route_reset(self, rest: list[str], query: dict[str, str]) -> None:
        # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def route_redirect(self, rest: list[str], query: dict[str, str]) -> None:
        remaining = int(rest[0])
        target = query.get("to", "/img/target.jpg")
        if remaining <= 1:
            self.redirect(target)
        else:
            self.redirect(f"/redirect/{remaining - 1}?to={target}")

    def route_loop(self, rest: list[str], query: dict[str, str]) -> None:
        self.redirect("/loop/b" if rest and rest[0] == "a" else "/loop/a")

    def route_redirect_ftp(self, rest: list[str], query: dict[str, str]) -> None:
        self.redirect("ftp://127.0.0.1/image.jpg")

    def route_wrong_type(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(200, PNG, "text/plain")

    def route_gzip(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(200, gzip.compress(JPEG, mtime=0), "image/jpeg", {"Content-Encoding": "gzip"})

    def route_empty(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(200, b"", "image/jpeg")

    def route_bad_gzip(self, rest: list[str], query: dict[str, str]) -> None:
        self.send_body(200, b"\x1f\x8b\x08\x00" + bytes(60), "image/jpeg", {"Content-Encoding": "gzip"})

    def route_garbage(self, rest: list[str], query: dict[str, str]) -> None:
        self.close_connection = True
        self.wfile.write(b"HELLO THERE\r\n\r\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    owner: LoopbackServer

    def handle_error(self, request: object, client_address: object) -> None:
        # Clients that hang up (deadline, max_bytes, connection reset) are part of the tests.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)  # type: ignore[arg-type]


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key; return (certificate, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "loopback.crt", folder / "loopback.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    return cert_path, key_path


class LoopbackServer:
    """The server with its request log; start() binds 127.0.0.1 on a free port.

    With ``certificate`` (paths of a certificate and its key) it serves HTTPS.
    """

    def __init__(self, certificate: tuple[Path, Path] | None = None) -> None:
        self.certificate = certificate
        self.images: dict[str, bytes] = {"red.jpg": JPEG, "blue.png": PNG, "target.jpg": JPEG}
        self._requests: list[tuple[float, str]] = []
        self._counters: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.on_request: Callable[[str], None] | None = None

    def start(self) -> LoopbackServer:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        if self.certificate is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.certificate)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        scheme = "https" if self.certificate is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def add_image(self, name: str, data: bytes) -> str:
        """Serve ``data`` at /img/NAME and return its URL."""
        self.images[name] = data
        return self.url(f"/img/{name}")

    def log(self, path: str) -> None:
        with self._lock:
            self._requests.append((time.monotonic(), path))
        if self.on_request is not None:
            self.on_request(path)

    def bump(self, key: str) -> int:
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + 1
            return self._counters[key]

    def requests(self, prefix: str = "") -> list[str]:
        """Return the logged request paths (with query) that start with ``prefix``, oldest first."""
        with self._lock:
            return [path for _, path in self._requests if path.startswith(prefix)]

    def count(self, path: str) -> int:
        """Return how often exactly ``path`` (with its query) was requested."""
        return sum(1 for logged in self.requests() if logged == path)

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._counters.clear()
