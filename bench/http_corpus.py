"""A loopback image CDN for the benchmarks: N image URLs, most of them dead in the ways real CDNs die.

Serve a corpus by hand and write its SiLu-format JSONL (Ctrl-C stops it)::

    .venv/bin/python -m bench.http_corpus --n 3000 --jsonl build/bench/urls.jsonl

Benchmarks start it with :class:`CorpusServer`, which runs the server in a
child process on 127.0.0.1 and a free port, so its CPU time is not spent
under the client's GIL. The server is a plain asyncio protocol with HTTP/1.1
keep-alive. It serves only the paths it generated and never connects out.

URL ``i`` gets one fault kind from :data:`MIXES`, fixed by ``--seed``. In
the ``web`` mix 30% of the URLs work and 70% fail. The failures are 404,
403, 410 and 5xx statuses, and HTML error pages served with status 200 (as
``text/html`` and as ``image/jpeg``). Others are connection resets, bodies
cut short, empty bodies, and requests that get no response until the
client times out. Some working URLs
respond after a delay of 0.5-2 s, redirect once, or fail with a 503 on the
first request only. img2dataset stats files published with CC3M, CC12M
and LAION subsets on Hugging Face show 404 as the most common failure and
read timeouts at 0.1-1% of the URLs.
The ``fast`` mix has the same dead share without delays and hangs, for the
scale benchmark, where a few hundred 10 s timeouts would dominate the time.

Bodies come from a few generated base images of photo-like noise. The
``photos`` set has 14 baseline JPEGs and one progressive JPEG of 20-200 KB
(mean about 115 KB) and one 430 KB PNG. Each URL's body differs from every other: a JPEG comment or PNG text
chunk carrying the URL index is inserted, which costs no encoding.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import io
import json
import random
import signal
import socket
import struct
import subprocess
import sys
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from PIL import Image, ImageFilter

from bench.measure import PYTHON, ROOT, clean_env

# --------------------------------------------------------------------------- fault mix

OK = "ok"
SLOW_OK = "slow ok"  # responds after 0.5-2 s
REDIRECT_OK = "redirect ok"  # 302 to another path, then the image
FLAKY_OK = "flaky ok"  # 503 on the first request, the image afterwards
HTTP_404 = "404"
HTTP_403 = "403"
HTTP_410 = "410"
HTTP_5XX = "5xx"  # 500, 502 or 503 on every request
HTML_200 = "html 200"  # an error page as text/html with status 200
HTML_AS_JPEG = "html as jpeg"  # an error page labelled image/jpeg
RESET = "reset"  # RST, no response
TRUNCATED = "truncated"  # Content-Length of the whole image, half of it sent, then FIN
EMPTY = "empty"  # 200 image/jpeg with no body
HANG = "hang"  # no response until the client gives up

ALIVE_KINDS = (OK, SLOW_OK, REDIRECT_OK, FLAKY_OK)

# Fractions of the URLs; OK takes whatever the others leave.
MIXES: dict[str, dict[str, float]] = {
    "web": {
        SLOW_OK: 0.02, REDIRECT_OK: 0.02, FLAKY_OK: 0.01,
        HTTP_404: 0.35, HTTP_403: 0.08, HTTP_410: 0.02, HTTP_5XX: 0.04, HTML_200: 0.08, HTML_AS_JPEG: 0.04,
        RESET: 0.04, TRUNCATED: 0.02, EMPTY: 0.02, HANG: 0.01,
    },
    "fast": {
        REDIRECT_OK: 0.02, FLAKY_OK: 0.01,
        HTTP_404: 0.37, HTTP_403: 0.08, HTTP_410: 0.02, HTTP_5XX: 0.04, HTML_200: 0.09, HTML_AS_JPEG: 0.04,
        RESET: 0.03, TRUNCATED: 0.02, EMPTY: 0.01,
    },
}

HANG_SECONDS = 120.0  # a hanging request is closed after this, far beyond any client timeout


def plan_kinds(n: int, seed: int, mix: str) -> list[str]:
    """Return the fault kind of each of ``n`` URLs: exact shares of the mix, shuffled by ``seed``."""
    shares = MIXES[mix]
    kinds: list[str] = []
    for kind, share in shares.items():
        kinds += [kind] * round(share * n)
    kinds = kinds[:n] + [OK] * max(0, n - len(kinds))
    random.Random(seed).shuffle(kinds)
    return kinds


def expected_successes(kinds: list[str], retries: int) -> int:
    """Return how many URLs a correct downloader keeps: alive kinds, flaky ones only with a retry."""
    counts = Counter(kinds)
    alive = counts[OK] + counts[SLOW_OK] + counts[REDIRECT_OK]
    return alive + (counts[FLAKY_OK] if retries > 0 else 0)


# --------------------------------------------------------------------------- base images

# (width, height, noise sigma, format) per base image; noise sets the JPEG size.
PHOTO_BASES = [
    (480, 320, 4, "JPEG"), (480, 320, 20, "JPEG"), (640, 480, 4, "JPEG"), (640, 480, 10, "JPEG"),
    (640, 480, 20, "JPEG"), (640, 480, 40, "JPEG"), (800, 600, 4, "JPEG"), (800, 600, 10, "JPEG"),
    (800, 600, 20, "JPEG"), (800, 600, 40, "JPEG"), (1024, 768, 4, "JPEG"), (1024, 768, 10, "JPEG"),
    (1024, 768, 20, "JPEG"), (1280, 720, 10, "JPEG"), (800, 600, 10, "progressive"), (640, 480, 4, "PNG"),
]
SMALL_BASES = [(96, 72, 6, "JPEG"), (120, 90, 10, "JPEG"), (64, 64, 4, "JPEG"), (160, 96, 8, "JPEG")]
PROFILES = {"photos": PHOTO_BASES, "small": SMALL_BASES}


def make_photo(width: int, height: int, noise: float, image_format: str, seed: int) -> bytes:
    """Return a photo-like image: a smooth random colour field with grain, as JPEG (quality 85) or PNG."""
    rng = np.random.default_rng(seed)
    low = (rng.random((height // 40 + 2, width // 40 + 2, 3)) * 255).astype(np.uint8)
    field = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC)).astype(np.int16)
    grain = rng.normal(0, noise, (height, width, 3)).astype(np.int16)
    image = Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    buffer = io.BytesIO()
    if image_format == "PNG":
        image.save(buffer, "PNG")
    else:
        image.save(buffer, "JPEG", quality=85, progressive=image_format == "progressive")
    return buffer.getvalue()


def load_bases(folder: Path, profile: str) -> list[bytes]:
    """Return the base images of ``profile``, generated into ``folder`` on first use."""
    folder.mkdir(parents=True, exist_ok=True)
    bases = []
    for index, (width, height, noise, image_format) in enumerate(PROFILES[profile]):
        path = folder / f"base-{profile}-{index:02d}.bin"
        if not path.exists():
            path.write_bytes(make_photo(width, height, noise, image_format, seed=index))
        bases.append(path.read_bytes())
    return bases


class Bodies:
    """The image body of each URL index: a base image with the index inserted as metadata."""

    def __init__(self, bases: list[bytes]):
        self.bases = bases
        self.sizes = []
        for base in bases:
            with Image.open(io.BytesIO(base)) as image:
                self.sizes.append(image.size)

    def parts(self, index: int) -> list[bytes | memoryview]:
        """Return the body of URL ``index`` as pieces to write one after another."""
        base = self.bases[index % len(self.bases)]
        text = f"silu-bench image {index}".encode()
        if base.startswith(b"\x89PNG"):
            # A tEXt chunk after the 33-byte signature + IHDR.
            chunk = b"tEXt" + b"Comment\x00" + text
            return [memoryview(base)[:33], struct.pack(">I", len(text) + 8) + chunk
                    + struct.pack(">I", zlib.crc32(chunk)), memoryview(base)[33:]]
        # A COM segment right after SOI.
        return [b"\xff\xd8\xff\xfe" + struct.pack(">H", len(text) + 2) + text, memoryview(base)[2:]]

    def length(self, index: int) -> int:
        return sum(len(part) for part in self.parts(index))

    def body(self, index: int) -> bytes:
        return b"".join(bytes(part) for part in self.parts(index))

    def size_of(self, index: int) -> tuple[int, int]:
        return self.sizes[index % len(self.bases)]


# --------------------------------------------------------------------------- URLs and the SiLu file

CAPTION_SUBJECTS = ["서울 도심", "부산 항구", "제주 해변", "전통 시장", "국립 박물관", "한강 공원", "고궁", "농촌 마을"]
CAPTION_EVENTS = ["축제 현장", "기자 회견", "공연 장면", "전시회 개막", "시민 행사", "스포츠 경기", "거리 풍경"]


def url_path(index: int, seed: int) -> str:
    token = hashlib.sha256(f"{seed}:{index}".encode()).hexdigest()[:12]
    return f"/news/photo/{index:07d}-{token}.jpg"


def index_of(path: str) -> int | None:
    """Return the URL index encoded in a path of :func:`url_path` or of its redirect target."""
    name = path.rsplit("/", 1)[-1]
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def write_silu_jsonl(path: Path, base_url: str, n: int, seed: int, bodies: Bodies) -> None:
    """Write ``n`` SiLu image-caption records whose ``image.path`` points at the corpus server."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for index in range(n):
            width, height = bodies.size_of(index)
            subject = CAPTION_SUBJECTS[index % len(CAPTION_SUBJECTS)]
            event = CAPTION_EVENTS[(index // len(CAPTION_SUBJECTS)) % len(CAPTION_EVENTS)]
            record = {
                "img_id": hashlib.sha256(f"silu-bench:{seed}:{index}".encode()).hexdigest(),
                "image": {"path": base_url + url_path(index, seed), "resolution": [width, height],
                          "size": round(bodies.length(index) / 1024, 2), "format": "JPEG"},
                "captions": {"content": f"{subject}에서 열린 {event}의 모습 (사진 {index}번)", "lang": "ko"},
                "labels": {"pjwk_cates": {"level1": ["文化类"], "level2": ["民俗传统"]}},
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- server

ERROR_PAGE = (
    "<!DOCTYPE html><html lang=\"ko\"><head><meta charset=\"utf-8\"><title>{title}</title>"
    "<style>body{{font-family:sans-serif;margin:4em}}</style></head><body><h1>{title}</h1>"
    "<p>요청하신 페이지를 찾을 수 없습니다. The requested resource is not available.</p>"
    + "<!-- padding -->" * 120 + "</body></html>"
)
REASONS = {200: "OK", 302: "Found", 403: "Forbidden", 404: "Not Found", 410: "Gone", 500: "Internal Server Error",
           502: "Bad Gateway", 503: "Service Unavailable"}


class CorpusState:
    """Server state: the fault plan, the bodies, and request counts per fault kind for the stats endpoint."""

    def __init__(self, kinds: list[str], seed: int, bodies: Bodies):
        self.kinds = kinds
        self.seed = seed
        self.bodies = bodies
        self.flaky_served: set[int] = set()
        self.requests: Counter[str] = Counter()

    def reset(self) -> None:
        self.flaky_served.clear()
        self.requests.clear()


class CorpusProtocol(asyncio.Protocol):
    """One keep-alive connection, which handles one GET at a time."""

    def __init__(self, state: CorpusState):
        self.state = state
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.busy = False
        self.pending: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pending is not None:
            self.pending.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next_request()

    def _next_request(self) -> None:
        while not self.busy and self.transport is not None and b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = request_line.split(" ")
            if len(parts) != 3 or parts[0] != "GET":
                self._send(400, b"bad request", "text/plain", close=True)
                return
            self._answer(urlsplit(parts[1]).path)

    def _send(self, code: int, body: bytes | list, content_type: str, close: bool = False,
              extra: str = "", length: int | None = None) -> None:
        pieces = body if isinstance(body, list) else [body]
        size = sum(len(piece) for piece in pieces) if length is None else length
        head = (f"HTTP/1.1 {code} {REASONS.get(code, 'Status')}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {size}\r\nServer: silu-bench\r\n{extra}")
        if close:
            head += "Connection: close\r\n"
        assert self.transport is not None
        self.transport.writelines([(head + "\r\n").encode("latin-1"), *pieces])
        if close:
            self.transport.close()

    def _answer(self, path: str) -> None:
        state = self.state
        if path == "/_bench/reset":
            state.reset()
            self._send(200, b"reset", "text/plain")
            return
        if path == "/_bench/stats":
            self._send(200, json.dumps(state.requests).encode(), "application/json")
            return
        index = index_of(path)
        if index is None or not 0 <= index < len(state.kinds):
            self._send(404, ERROR_PAGE.format(title="404 Not Found").encode(), "text/html")
            return
        kind = state.kinds[index]
        state.requests[kind] += 1
        bodies = state.bodies

        if kind == OK or (kind == REDIRECT_OK and path.startswith("/cdn/")):
            self._send(200, bodies.parts(index), "image/jpeg")
        elif kind == REDIRECT_OK:
            self._send(302, b"", "text/html", extra=f"Location: /cdn/{path.rsplit('/', 1)[-1]}\r\n")
        elif kind == SLOW_OK:
            delay = 0.5 + (index % 16) / 10.0
            self._later(delay, lambda: self._send(200, bodies.parts(index), "image/jpeg"))
        elif kind == FLAKY_OK:
            if index in state.flaky_served:
                self._send(200, bodies.parts(index), "image/jpeg")
            else:
                state.flaky_served.add(index)
                self._send(503, ERROR_PAGE.format(title="503 Service Unavailable").encode(), "text/html")
        elif kind in (HTTP_404, HTTP_403, HTTP_410):
            code = int(kind)
            self._send(code, ERROR_PAGE.format(title=f"{code} {REASONS[code]}").encode(), "text/html")
        elif kind == HTTP_5XX:
            code = (500, 502, 503)[index % 3]
            self._send(code, ERROR_PAGE.format(title=f"{code} {REASONS[code]}").encode(), "text/html")
        elif kind == HTML_200:
            self._send(200, ERROR_PAGE.format(title="사진을 찾을 수 없습니다").encode(), "text/html; charset=utf-8")
        elif kind == HTML_AS_JPEG:
            self._send(200, ERROR_PAGE.format(title="Image not found").encode(), "image/jpeg")
        elif kind == EMPTY:
            self._send(200, b"", "image/jpeg")
        elif kind == TRUNCATED:
            body = bodies.body(index)
            self._send(200, body[: len(body) // 2], "image/jpeg", close=True, length=len(body))
        elif kind == RESET:
            self._reset()
        elif kind == HANG:
            self._later(HANG_SECONDS, self._close)
        else:
            raise AssertionError(f"unknown fault kind {kind!r}")

    def _later(self, delay: float, action: Callable[[], None]) -> None:
        self.busy = True

        def fire() -> None:
            self.pending = None
            self.busy = False
            if self.transport is not None:
                action()
                self._next_request()

        self.pending = asyncio.get_running_loop().call_later(delay, fire)

    def _reset(self) -> None:
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        # SO_LINGER with a zero timeout makes the close send RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(state: CorpusState, ready: Callable[[int], None]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: CorpusProtocol(state), "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    ready(port)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


# --------------------------------------------------------------------------- client side


@dataclass
class Corpus:
    """A corpus definition: cache folder, URL count, fault plan seed, fault mix and base image profile."""

    folder: Path
    n: int
    seed: int = 0
    mix: str = "web"
    profile: str = "photos"

    @property
    def jsonl(self) -> Path:
        return self.folder / f"silu-{self.mix}-{self.profile}-{self.n}-{self.seed}.jsonl"

    def kinds(self) -> list[str]:
        return plan_kinds(self.n, self.seed, self.mix)


class CorpusServer:
    """Run the corpus server in a child process on 127.0.0.1; a context manager that stops it by PID.

    On entry the SiLu JSONL with this server's URLs is written to
    ``corpus.jsonl``, so it is valid only while the server runs.
    """

    def __init__(self, corpus: Corpus):
        self.corpus = corpus
        self.process: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> CorpusServer:
        corpus = self.corpus
        command = [PYTHON, "-m", "bench.http_corpus", "--n", str(corpus.n), "--seed", str(corpus.seed),
                   "--mix", corpus.mix, "--profile", corpus.profile, "--folder", str(corpus.folder),
                   "--jsonl", str(corpus.jsonl)]
        self.process = subprocess.Popen(command, cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.__exit__(None, None, None)
            raise RuntimeError(f"corpus server failed to start: {line!r}; run the command by hand: {command}")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def _get(self, path: str) -> bytes:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path)
            return connection.getresponse().read()
        finally:
            connection.close()

    def reset(self) -> None:
        """Forget which flaky URLs were served and zero the request counts (call before each tool run)."""
        self._get("/_bench/reset")

    def stats(self) -> dict[str, int]:
        """Return the number of requests served per fault kind since the last reset."""
        return json.loads(self._get("/_bench/stats"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="number of URLs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault plan (default: %(default)s)")
    parser.add_argument("--mix", choices=sorted(MIXES), default="web", help="fault mix (default: %(default)s)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="photos",
                        help="base images: photos (20-200 KB, one 430 KB PNG) or small (1-3 KB) (default: %(default)s)")
    parser.add_argument("--folder", type=Path, default=ROOT / "build" / "bench",
                        help="where base images are cached (default: build/bench)")
    parser.add_argument("--jsonl", type=Path, help="write the SiLu JSONL of the URLs here once listening")
    args = parser.parse_args(argv)

    bodies = Bodies(load_bases(args.folder, args.profile))
    state = CorpusState(plan_kinds(args.n, args.seed, args.mix), args.seed, bodies)

    def ready(port: int) -> None:
        if args.jsonl:
            write_silu_jsonl(args.jsonl, f"http://127.0.0.1:{port}", args.n, args.seed, bodies)
        print(f"listening on http://127.0.0.1:{port}", flush=True)

    asyncio.run(serve(state, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
