"""Tests for stages.download against the loopback server of tests/http_server.py.

No test leaves 127.0.0.1. Timeouts are scaled down (read 0.3 s, deadline
1.5 s), so each fault case costs at most about one deadline.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import random
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3
import yaml

from stages import download, fetch
from stages.common import StageError
from stages.config import Params, parse_params
from stages.download import run
from stages.fetch import Target, resolve_target, sniff_image
from tests.http_server import JPEG, PNG, LoopbackServer, make_image

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "sample"

FAST = {
    "workers": 8,
    "connect_timeout": 0.5,
    "read_timeout": 0.3,
    "deadline": 1.5,
    "max_bytes": 200_000,
    "max_redirects": 5,
    "retries": 2,
    "backoff": 0.01,
    "shard_size": 100,
    "allow_private_hosts": True,  # the test servers listen on 127.0.0.1
}


def make_params(image_root: str = str(SAMPLE / "images"), limit: int = 0, **download_params: Any) -> Params:
    return parse_params({
        "data": {"lang": "ko", "source": "unused.jsonl", "image_root": image_root, "limit": limit},
        "download": {**FAST, **download_params},
    })


def record(index: int, path: str, caption: str | None = None) -> dict[str, Any]:
    return {
        "img_id": hashlib.sha256(f"test-{index}".encode()).hexdigest(),
        "image": {"path": path, "resolution": [64, 48], "size": 1.0, "format": "JPEG"},
        "captions": {"content": caption or f"테스트 그림 {index}", "lang": "ko"},
        "labels": {"pjwk_cates": {"level1": ["艺术类"], "level2": ["抽象图形"]}},
    }


def write_source(path: Path, paths: list[str]) -> Path:
    lines = [json.dumps(record(i, image_path), ensure_ascii=False) for i, image_path in enumerate(paths)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_manifests(out_dir: Path) -> list[dict[str, Any]]:
    entries = []
    for manifest in sorted(out_dir.glob("shard-*.jsonl")):
        entries += [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]
    return entries


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar}  # type: ignore[union-attr]


def download_urls(tmp_path: Path, paths: list[str], **download_params: Any) -> list[dict[str, Any]]:
    source = write_source(tmp_path / "source.jsonl", paths)
    run(source, tmp_path / "out", make_params(**download_params), tmp_path / "metrics.json")
    return read_manifests(tmp_path / "out")


# --------------------------------------------------------------------------- fault table

# path on the loopback server -> (status, reason, requests made for that path)
CASES: dict[str, tuple[str, str | None, int]] = {
    "/img/red.jpg": ("ok", None, 1),
    "/img/blue.png?size=large&v=2": ("ok", None, 1),
    "/status/404": ("dropped", "http 404", 1),
    "/status/403": ("dropped", "http 403", 1),
    "/status/410": ("dropped", "http 410", 1),
    "/status/400": ("dropped", "http 4xx", 1),
    "/status/500": ("dropped", "http 5xx", 3),
    "/status/503": ("dropped", "http 5xx", 3),
    "/flaky/2/a": ("ok", None, 3),
    "/retry-after/a": ("ok", None, 2),
    "/html": ("dropped", "not an image", 1),
    "/slow-headers?delay=1": ("dropped", "timeout", 3),
    "/drip?interval=0.05": ("dropped", "timeout", 1),
    "/endless": ("dropped", "too large", 1),
    "/big?size=300000": ("dropped", "too large", 1),
    "/big?size=300000&length=0": ("dropped", "too large", 1),
    "/big?size=150000": ("ok", None, 1),
    "/short": ("dropped", "incomplete body", 1),
    "/reset": ("dropped", "connection error", 3),
    "/redirect/3": ("ok", None, 1),
    "/redirect/6": ("dropped", "too many redirects", 1),
    "/loop/a": ("dropped", "redirect loop", 1),
    "/redirect-ftp": ("dropped", "unsupported scheme", 1),
    "/wrong-type": ("ok", None, 1),
    "/gzip": ("ok", None, 1),
    "/empty": ("dropped", "empty body", 1),
    "/bad-gzip": ("dropped", "invalid encoding", 1),
    "/garbage": ("dropped", "invalid response", 1),
}


@pytest.fixture(scope="module")
def fault_run(http_server: LoopbackServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Download every case of CASES in one run; return the manifest by path, the request log and the time."""
    http_server.clear()
    http_server.on_request = None
    tmp_path = tmp_path_factory.mktemp("faults")
    started = time.monotonic()
    entries = download_urls(tmp_path, [http_server.url(path) for path in CASES])
    return {
        "entries": {entry["url"].split(str(http_server.port), 1)[1]: entry for entry in entries},
        "requests": Counter(http_server.requests()),
        "seconds": time.monotonic() - started,
        "out": tmp_path / "out",
        "metrics": json.loads((tmp_path / "metrics.json").read_text()),
    }


@pytest.mark.parametrize("path", list(CASES))
def test_fault_outcome(fault_run: dict[str, Any], path: str) -> None:
    status, reason, requests_made = CASES[path]
    entry = fault_run["entries"][path]
    assert entry["status"] == status
    assert entry["reason"] == reason
    assert fault_run["requests"][path] == requests_made


def test_fault_run_accounting(fault_run: dict[str, Any]) -> None:
    metrics = fault_run["metrics"]
    assert metrics["records"] == len(CASES)
    assert metrics["kept"] == sum(1 for status, _, _ in CASES.values() if status == "ok")
    assert metrics["kept"] + metrics["dropped"] == metrics["records"]
    assert metrics["dropped_by_reason"] == dict(Counter(r for s, r, _ in CASES.values() if s == "dropped"))


def test_redirect_chain_followed(fault_run: dict[str, Any]) -> None:
    assert fault_run["requests"]["/redirect/2?to=/img/target.jpg"] == 2  # also on the way of /redirect/6
    assert fault_run["requests"]["/img/target.jpg"] == 1
    assert fault_run["entries"]["/redirect/3"]["sha256"] == hashlib.sha256(JPEG).hexdigest()


def test_gzip_body_decoded(fault_run: dict[str, Any]) -> None:
    entry = fault_run["entries"]["/gzip"]
    assert entry["sha256"] == hashlib.sha256(JPEG).hexdigest()
    assert entry["bytes"] == len(JPEG)


def test_wrong_content_type_kept(fault_run: dict[str, Any]) -> None:
    entry = fault_run["entries"]["/wrong-type"]
    assert entry["content_type"] == "text/plain"
    assert entry["sha256"] == hashlib.sha256(PNG).hexdigest()


def test_oversize_rejected_by_header(fault_run: dict[str, Any]) -> None:
    assert fault_run["entries"]["/big?size=300000"]["detail"] == (
        "Content-Length 300000 exceeds download.max_bytes = 200000"
    )
    assert fault_run["entries"]["/big?size=300000&length=0"]["detail"] == "body exceeds download.max_bytes = 200000"


def test_retry_detail_counts_attempts(fault_run: dict[str, Any]) -> None:
    assert fault_run["entries"]["/status/503"]["detail"] == "HTTP 503 Service Unavailable (after 3 attempts)"
    assert fault_run["entries"]["/status/404"]["detail"] == "HTTP 404 Not Found"


def test_drip_cut_at_deadline(fault_run: dict[str, Any]) -> None:
    assert fault_run["entries"]["/drip?interval=0.05"]["detail"] == "download.deadline of 1.5 s exceeded"
    # The cases run in parallel, so the whole run takes about one deadline;
    # an uncut drip would take 5000 s. The margin absorbs a loaded machine.
    assert fault_run["seconds"] < FAST["deadline"] + 3.5


def test_tar_holds_kept_images(fault_run: dict[str, Any]) -> None:
    members = tar_members(fault_run["out"] / "shard-00000.tar")
    kept = {entry["sha256"] for entry in fault_run["entries"].values() if entry["status"] == "ok"}
    assert set(members) == kept
    for name, data in members.items():
        assert hashlib.sha256(data).hexdigest() == name


def test_no_files_left_behind(fault_run: dict[str, Any]) -> None:
    assert sorted(path.name for path in fault_run["out"].iterdir()) == ["shard-00000.jsonl", "shard-00000.tar"]


def test_detail_has_no_control_characters(fault_run: dict[str, Any]) -> None:
    detail = fault_run["entries"]["/garbage"]["detail"]
    assert detail.startswith("BadStatusLine: ")
    assert "HELLO THERE" in detail
    for entry in fault_run["entries"].values():
        assert not any(ord(char) < 32 for char in entry["detail"] or ""), entry


@pytest.mark.parametrize(
    ("text", "clean"),
    [
        ("BadStatusLine: NOT HTTP\r\nX-Evil: 1\r\n", "BadStatusLine: NOT HTTP\\r\\nX-Evil: 1"),
        ("bell\x07 esc\x1b[31m c1\x85 end", "bell\\x07 esc\\x1b[31m c1\\x85 end"),
        ("bidi \u202egnp.exe", "bidi \\u202egnp.exe"),
        ("lone \ud800", "lone \\ud800"),
        ("redirect to https://user:pa@ss@host.example:8443/a.jpg?token=1", "redirect to https://***@host.example:8443/a.jpg?token=1"),
        ("사진 https://host.example/a@b.jpg", "사진 https://host.example/a@b.jpg"),
    ],
)
def test_clean_text(text: str, clean: str) -> None:
    assert fetch.clean_text(text) == clean


def test_userinfo_redacted(server: LoopbackServer, tmp_path: Path) -> None:
    secret_url = server.url("/img/red.jpg?token=abc").replace("http://", "http://user:secret@")
    source = write_source(tmp_path / "source.jsonl", [secret_url])
    run(source, tmp_path / "out", make_params(), tmp_path / "metrics.json")
    (entry,) = read_manifests(tmp_path / "out")
    assert entry["status"] == "ok"
    assert entry["url"] == f"http://***@127.0.0.1:{server.port}/img/red.jpg?token=abc"
    for path in (tmp_path / "out").rglob("*"):
        assert b"secret" not in path.read_bytes(), path

    # A changed shard takes the image from its previous version, found by the redacted URL.
    server.clear()
    write_source(source, [secret_url, server.url("/status/404")])
    summary = run(source, tmp_path / "out", make_params(), tmp_path / "metrics.json")
    assert server.requests() == ["/status/404"]
    assert summary.reused == 1


def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (entry,) = download_urls(tmp_path, [f"http://127.0.0.1:{port}/a.jpg"])
    assert entry["reason"] == "connection error"
    assert entry["detail"] == "ConnectionRefusedError: Connection refused (after 3 attempts)"


# --------------------------------------------------------------------------- classification units


# --------------------------------------------------------------------------- address rule


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every socket connect; one to anything but 127.0.0.1 is refused before it leaves the machine."""
    calls: list[Any] = []
    original = socket.socket.connect

    def guarded_connect(sock: socket.socket, address: Any) -> None:
        calls.append(address)
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"test guard: no connect to {address[0]}")
        original(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return calls


def _resolve_to(monkeypatch: pytest.MonkeyPatch, names: dict[str, str]) -> None:
    """Make getaddrinfo return ``names`` (host -> IPv4 address) without querying a resolver."""
    original = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]
        return original(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/a.jpg",
        "http://[::ffff:192.168.1.1]/a.jpg",
        "https://224.0.0.1/a.jpg",
        "http://0.0.0.0/a.jpg",
        "http://240.0.0.1/a.jpg",
        "http://100.64.0.1/a.jpg",
    ],
)
def test_literal_private_address_blocked(tmp_path: Path, connects: list[Any], url: str) -> None:
    (entry,) = download_urls(tmp_path, [url], allow_private_hosts=False)
    assert entry["reason"] == "blocked address"
    assert "is not a public address" in entry["detail"]
    assert connects == []


def test_loopback_blocked_by_default(server: LoopbackServer, tmp_path: Path, connects: list[Any]) -> None:
    (entry,) = download_urls(tmp_path, [server.url("/img/red.jpg")], allow_private_hosts=False)
    assert entry["reason"] == "blocked address"
    assert server.requests() == []
    assert connects == []


def test_private_name_blocked_after_resolution(tmp_path: Path, connects: list[Any],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # A public-looking name (or one rebound between lookups) that resolves to a private address.
    _resolve_to(monkeypatch, {"rebind.example": "10.1.2.3", "decimal.example": "127.0.0.1"})
    entries = download_urls(tmp_path, ["http://rebind.example/a.jpg", "http://decimal.example/a.jpg"],
                            allow_private_hosts=False)
    assert [entry["reason"] for entry in entries] == ["blocked address", "blocked address"]
    assert entries[0]["detail"] == "rebind.example resolves to 10.1.2.3, no public address"
    assert connects == []


def test_redirect_to_private_blocked(server: LoopbackServer, tmp_path: Path, connects: list[Any],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Treat the loopback test server as public, so only the redirect targets are private.
    blocked = fetch.is_blocked_address
    monkeypatch.setattr(fetch, "is_blocked_address", lambda address: address != "127.0.0.1" and blocked(address))
    _resolve_to(monkeypatch, {"inside.example": "192.168.0.10"})
    urls = [
        server.url("/redirect/1?to=http://10.0.0.1/a.jpg"),
        server.url(f"/redirect/2?to=http://inside.example:{server.port}/img/red.jpg"),
        server.url("/img/red.jpg"),
    ]
    entries = download_urls(tmp_path, urls, allow_private_hosts=False)
    assert [entry["reason"] for entry in entries] == ["blocked address", "blocked address", None]
    assert {address[0] for address in connects} == {"127.0.0.1"}


def test_is_blocked_address() -> None:
    for address in ("127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "224.0.0.251",
                    "0.0.0.0", "255.255.255.255", "::1", "fe80::1", "fc00::1", "ff02::1", "::", "::ffff:10.0.0.1"):
        assert fetch.is_blocked_address(address), address
    for address in ("93.184.216.34", "8.8.8.8", "2606:4700::1111"):
        assert not fetch.is_blocked_address(address), address


def _resolution_error(code: int) -> requests.exceptions.ConnectionError:
    cause = socket.gaierror(code, "Name or service not known")
    error = urllib3.exceptions.NameResolutionError("dead.example", None, cause)  # type: ignore[arg-type]
    error.__cause__ = cause
    return requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/a.jpg", error))  # type: ignore[arg-type]


def test_unknown_host_not_retried() -> None:
    result = fetch.classify_error(_resolution_error(socket.EAI_NONAME), time.monotonic() + 10, make_params().download)
    assert result.reason == "dns error"
    assert not result.retryable


def test_temporary_dns_failure_retried() -> None:
    result = fetch.classify_error(_resolution_error(socket.EAI_AGAIN), time.monotonic() + 10, make_params().download)
    assert result.reason == "dns error"
    assert result.retryable


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (JPEG, "jpeg"), (PNG, "png"), (make_image(image_format="GIF"), "gif"), (make_image(image_format="WEBP"), "webp"),
        (make_image(image_format="BMP"), "bmp"), (make_image(image_format="TIFF"), "tiff"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "heif"),
        (b"<!DOCTYPE html><html>", None), (b"", None), (b"\x89PN", None),
    ],
)
def test_sniff_image(data: bytes, kind: str | None) -> None:
    assert sniff_image(data[:16]) == kind


# --------------------------------------------------------------------------- local files


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(JPEG)
    (root / "sub" / "b.png").write_bytes(PNG)
    (root / "0123abcd.jpg").write_bytes(JPEG)
    (root / "notes.txt").write_bytes(b"plain text, not an image")
    (tmp_path / "secret.jpg").write_bytes(JPEG)
    (root / "inside_link.jpg").symlink_to(root / "a.jpg")
    (root / "outside_link.jpg").symlink_to(tmp_path / "secret.jpg")
    (root / "outside_dir").symlink_to(tmp_path, target_is_directory=True)
    return root


@pytest.mark.parametrize(
    ("image_path", "status", "reason"),
    [
        ("a.jpg", "ok", None),
        ("sub/b.png", "ok", None),
        ("./sub/../a.jpg", "ok", None),
        ("0123abcd", "ok", None),  # a bare id: the .jpg file is found
        ("inside_link.jpg", "ok", None),
        ("notes.txt", "dropped", "not an image"),
        ("missing.jpg", "dropped", "file not found"),
        ("sub", "dropped", "file not found"),
        ("../secret.jpg", "dropped", "path outside image_root"),
        ("sub/../../secret.jpg", "dropped", "path outside image_root"),
        ("/etc/passwd", "dropped", "path outside image_root"),
        ("C:\\images\\a.jpg", "dropped", "path outside image_root"),
        ("outside_link.jpg", "dropped", "path outside image_root"),
        ("outside_dir/secret.jpg", "dropped", "path outside image_root"),
        ("file:///etc/passwd", "dropped", "unsupported scheme"),
        ("ftp://127.0.0.1/a.jpg", "dropped", "unsupported scheme"),
        ("data:image/png;base64,iVBORw0KGgo=", "dropped", "unsupported scheme"),
        ("http:///a.jpg", "dropped", "invalid url"),
    ],
)
def test_local_path(tmp_path: Path, image_root: Path, image_path: str, status: str, reason: str | None) -> None:
    source = write_source(tmp_path / "source.jsonl", [image_path])
    run(source, tmp_path / "out", make_params(image_root=str(image_root)), tmp_path / "metrics.json")
    (entry,) = read_manifests(tmp_path / "out")
    assert entry["status"] == status
    assert entry["reason"] == reason


def test_relative_path_without_root() -> None:
    # params.yaml cannot leave data.image_root empty, but a caller of resolve_target can.
    result = resolve_target("a.jpg", None)
    assert isinstance(result, fetch.FetchResult)
    assert result.reason == "no image_root"


def test_target_resolution_never_reads_outside(tmp_path: Path, image_root: Path) -> None:
    root = image_root.resolve()
    for image_path in ("a.jpg", "sub/b.png", "0123abcd"):
        target = resolve_target(image_path, root)
        assert isinstance(target, Target)
        assert target.path is not None
        assert target.path.is_relative_to(root)


def test_sample_end_to_end(tmp_path: Path) -> None:
    params = make_params(image_root=str(SAMPLE / "images"))
    summary = run(SAMPLE / "ko_sample.jsonl", tmp_path / "out", params, tmp_path / "metrics.json")
    assert summary.metrics == {
        "records": 42,
        "kept": 38,
        "dropped": 4,
        "drop_rate": round(4 / 42, 6),
        "dropped_by_reason": {"blank line": 1, "file not found": 1, "invalid json": 1, "wrong language": 1},
    }
    entries = read_manifests(tmp_path / "out")
    assert [entry["line"] for entry in entries] == list(range(1, 43))
    members = tar_members(tmp_path / "out" / "shard-00000.tar")
    # The copy of sky_red_circle.jpg under another id shares one member.
    assert len(members) == 37


def test_surrogate_line_dropped(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "a.jpg").write_bytes(JPEG)
    good = json.dumps(record(1, "a.jpg"), ensure_ascii=False)
    bad = good.replace("테스트 그림 1", "\\ud800").replace(record(1, "a.jpg")["img_id"], "bad")
    source = tmp_path / "source.jsonl"
    source.write_text(bad + "\n" + good + "\n", encoding="utf-8")
    summary = run(source, tmp_path / "out", make_params(image_root=str(root)), tmp_path / "metrics.json")
    assert summary.metrics["records"] == 2
    assert summary.metrics["kept"] == 1
    dropped = read_manifests(tmp_path / "out")[0]
    assert dropped["reason"] == "invalid field"
    assert dropped["detail"].startswith("line 1: `captions.content` contains a lone UTF-16 surrogate")


def test_sample_images_as_documented() -> None:
    from PIL import Image

    images = SAMPLE / "images"
    files = sorted(path for path in images.rglob("*") if path.is_file())
    assert sum(path.stat().st_size for path in files) < 1_500_000
    special = {"lighthouse_truncated.jpg", "tiny_dot.png", "thin_strip.jpg", "sky_red_circle_copy.jpg"}
    for path in files:
        if path.name in special:
            continue
        with Image.open(path) as image:
            image.load()
            assert 200 <= max(image.size) <= 640, path
    with Image.open(images / "lighthouse_truncated.jpg") as image, pytest.raises(OSError, match="truncated"):
        image.load()
    with Image.open(images / "tiny_dot.png") as image:
        assert image.size == (10, 10)
    with Image.open(images / "thin_strip.jpg") as image:
        assert image.size == (640, 30)
    assert (images / "sky_red_circle_copy.jpg").read_bytes() == (images / "sky_red_circle.jpg").read_bytes()


# --------------------------------------------------------------------------- shards, resume, determinism


def test_rerun_fetches_nothing(server: LoopbackServer, tmp_path: Path) -> None:
    urls = [server.add_image(f"rerun{i}.jpg", make_image(40 + i, 30)) for i in range(12)] + [server.url("/status/404")]
    source = write_source(tmp_path / "source.jsonl", urls)
    params = make_params(shard_size=5)
    first = run(source, tmp_path / "out", params, tmp_path / "metrics.json")
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    assert len(server.requests()) == 13
    server.clear()

    second = run(source, tmp_path / "out", params, tmp_path / "metrics.json")

    assert server.requests() == []
    assert second.skipped_shards == 3
    assert second.metrics == first.metrics
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before


def test_all_dropped_shard_skipped_on_rerun(server: LoopbackServer, tmp_path: Path) -> None:
    source = write_source(tmp_path / "source.jsonl", [server.url("/status/404"), server.url("/html")])
    params = make_params()
    run(source, tmp_path / "out", params, tmp_path / "metrics.json")
    server.clear()

    again = run(source, tmp_path / "out", params, tmp_path / "metrics.json")

    assert server.requests() == []
    assert again.skipped_shards == 1
    assert again.fetched == 0


def test_all_dropped_shard_drops_reused(server: LoopbackServer, tmp_path: Path) -> None:
    source = write_source(tmp_path / "source.jsonl", [server.url("/status/404")])
    run(source, tmp_path / "out", make_params(), tmp_path / "metrics.json")
    server.clear()
    write_source(source, [server.url("/status/404"), server.url("/status/410")])

    again = run(source, tmp_path / "out", make_params(), tmp_path / "metrics.json")

    assert server.requests() == ["/status/410"]
    assert again.reused == 1
    assert [entry["reason"] for entry in read_manifests(tmp_path / "out")] == ["http 404", "http 410"]


def test_shard_layout(server: LoopbackServer, tmp_path: Path) -> None:
    urls = [server.add_image(f"layout{i}.jpg", make_image(30 + i, 30)) for i in range(12)]
    entries = download_urls(tmp_path, urls, shard_size=5)
    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert names == [f"shard-0000{i}.{suffix}" for i in range(3) for suffix in ("jsonl", "tar")]
    assert [entry["line"] for entry in entries] == list(range(1, 13))
    shard_two = [json.loads(line) for line in (tmp_path / "out" / "shard-00002.jsonl").read_text().splitlines()]
    assert [entry["line"] for entry in shard_two] == [11, 12]


def test_stale_shards_removed(server: LoopbackServer, tmp_path: Path) -> None:
    urls = [server.add_image(f"stale{i}.jpg", make_image(20 + i, 30)) for i in range(12)]
    source = write_source(tmp_path / "source.jsonl", urls)
    run(source, tmp_path / "out", make_params(shard_size=5), tmp_path / "metrics.json")
    server.clear()

    summary = run(source, tmp_path / "out", make_params(shard_size=5, limit=7), tmp_path / "metrics.json")

    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert names == ["shard-00000.jsonl", "shard-00000.tar", "shard-00001.jsonl", "shard-00001.tar"]
    assert summary.metrics["records"] == 7
    # Shard 1 changed (2 lines instead of 5), but its images come from the old tar.
    assert server.requests() == []
    assert len(tar_members(tmp_path / "out" / "shard-00001.tar")) == 2


def test_changed_params_refetch_only_drops(server: LoopbackServer, tmp_path: Path) -> None:
    urls = [server.add_image(f"params{i}.jpg", make_image(50 + i, 30)) for i in range(4)]
    urls += [server.url("/big?size=300000"), server.url("/status/404")]
    source = write_source(tmp_path / "source.jsonl", urls)
    run(source, tmp_path / "out", make_params(), tmp_path / "metrics.json")
    server.clear()

    summary = run(source, tmp_path / "out", make_params(max_bytes=400_000), tmp_path / "metrics.json")

    assert sorted(server.requests()) == ["/big?size=300000", "/status/404"]
    assert summary.metrics["kept"] == 5
    assert summary.reused == 4


def test_duplicate_urls_fetched_once(server: LoopbackServer, tmp_path: Path) -> None:
    url = server.add_image("dup.jpg", make_image(33, 33))
    entries = download_urls(tmp_path, [url, url, url])
    assert server.count("/img/dup.jpg") == 1
    assert [entry["status"] for entry in entries] == ["ok", "ok", "ok"]
    assert len({entry["member"] for entry in entries}) == 1
    assert len(tar_members(tmp_path / "out" / "shard-00000.tar")) == 1


def test_output_independent_of_completion_order(server: LoopbackServer, tmp_path: Path) -> None:
    urls = [server.add_image(f"order{i}.jpg", make_image(20 + i, 20 + i)) for i in range(24)]
    urls += [server.url("/status/404"), server.url("/html")]
    source = write_source(tmp_path / "source.jsonl", urls)
    outputs = []
    orders = []
    for seed in (1, 2):
        rng = random.Random(seed)
        server.on_request = lambda path, rng=rng: time.sleep(rng.random() * 0.03)
        server.clear()
        out = tmp_path / f"out{seed}"
        run(source, out, make_params(shard_size=10), tmp_path / "metrics.json")
        outputs.append({path.name: path.read_bytes() for path in out.iterdir()})
        orders.append(server.requests())
    server.on_request = None
    assert outputs[0] == outputs[1]
    assert sorted(orders[0]) == sorted(orders[1])


def _write_params_file(path: Path, **download_params: Any) -> Path:
    params = {"data": {"lang": "ko", "source": "unused.jsonl", "image_root": str(SAMPLE / "images"), "limit": 0},
              "download": {**FAST, **download_params}}
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def _fetched_targets(out_dir: Path) -> set[str]:
    """Return the URLs in finished shards and in the journals of unfinished ones."""
    targets = {entry["url"] for entry in read_manifests(out_dir)}
    for journal in out_dir.glob(".shard-*.partial/journal.jsonl"):
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                targets.add(json.loads(line)["target"])
            except ValueError:
                pass  # a line cut by the kill is refetched
    return targets


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT], ids=["kill", "ctrl-c"])
def test_resume_after_kill(server: LoopbackServer, tmp_path: Path, stop: signal.Signals) -> None:
    urls = [server.add_image(f"kill{i}.jpg", make_image(60 + i, 40)) for i in range(30)]
    source = write_source(tmp_path / "source.jsonl", urls)
    params_file = _write_params_file(tmp_path / "params.yaml", workers=2, shard_size=8)
    # Requests after the 12th wait for the signal, so a loaded machine cannot let the
    # stage finish between the last check and the kill.
    served = itertools.count()
    release = threading.Event()

    def hold(path: str) -> None:
        time.sleep(0.05)
        if next(served) >= 12:
            release.wait(30)

    server.on_request = hold
    out = tmp_path / "out"
    command = [sys.executable, "-m", "stages.download", str(source), str(out), "--params", str(params_file),
               "--metrics", str(tmp_path / "metrics.json")]
    # A shell starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler. Restoring the default lets Ctrl-C reach the stage under CI too.
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        give_up = time.monotonic() + 20
        while len(_fetched_targets(out)) < 8 and time.monotonic() < give_up and process.poll() is None:
            time.sleep(0.02)
        assert process.poll() is None, "the stage finished before it could be killed"
        process.send_signal(stop)
        release.set()
        stderr = process.communicate(timeout=10)[1].decode()
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
        process.stderr.close()  # type: ignore[union-attr]
    server.on_request = None
    if stop == signal.SIGINT:
        assert process.returncode == 130
        assert "Traceback" not in stderr
        assert re.search(r"interrupted; rerun to resume: [0-3] of 4 shards done\n$", stderr), stderr

    done = _fetched_targets(out)
    assert 8 <= len(done) < 30
    server.clear()
    summary = run(source, out, make_params(workers=2, shard_size=8), tmp_path / "metrics.json")

    fetched = {server.url(path) for path in server.requests()}
    assert fetched == set(urls) - done
    assert len(server.requests()) == len(fetched)
    assert summary.metrics["kept"] == 30
    assert sorted(path.name for path in out.iterdir()) == [
        f"shard-0000{i}.{suffix}" for i in range(4) for suffix in ("jsonl", "tar")
    ]

    server.clear()
    run(source, out, make_params(workers=2, shard_size=8), tmp_path / "metrics.json")
    assert server.requests() == []


def test_resumed_output_matches_clean_run(server: LoopbackServer, tmp_path: Path) -> None:
    urls = [server.add_image(f"same{i}.jpg", make_image(70 + i, 40)) for i in range(10)]
    source = write_source(tmp_path / "source.jsonl", urls)
    params = make_params(shard_size=4)
    run(source, tmp_path / "clean", params, tmp_path / "metrics.json")

    # A half-built shard: two images fetched and journaled, then the run stopped.
    run(source, tmp_path / "resumed", make_params(shard_size=4, limit=2), tmp_path / "metrics.json")
    first = (tmp_path / "resumed" / "shard-00000.tar")
    assert first.exists()
    server.clear()
    run(source, tmp_path / "resumed", params, tmp_path / "metrics.json")

    assert len(server.requests()) == 8
    clean = {path.name: path.read_bytes() for path in (tmp_path / "clean").iterdir()}
    resumed = {path.name: path.read_bytes() for path in (tmp_path / "resumed").iterdir()}
    assert resumed == clean


# --------------------------------------------------------------------------- systemic failures


def test_missing_source_fails(tmp_path: Path) -> None:
    with pytest.raises(StageError, match=r"nothing\.jsonl: source file not found\. Run `dvc pull"):
        run(tmp_path / "nothing.jsonl", tmp_path / "out", make_params(), tmp_path / "metrics.json")


def test_folder_source_fails(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(StageError, match=r"data: is a folder, not a file\. Set `data.source`"):
        run(tmp_path / "data", tmp_path / "out", make_params(), tmp_path / "metrics.json")


def test_file_image_root_fails(tmp_path: Path) -> None:
    source = write_source(tmp_path / "source.jsonl", ["a.jpg"])
    with pytest.raises(StageError, match="`data.image_root` is .*which is a file, not a folder"):
        run(source, tmp_path / "out", make_params(image_root=str(source)), tmp_path / "metrics.json")


def test_empty_source_fails(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(StageError, match="no lines to read"):
        run(tmp_path / "empty.jsonl", tmp_path / "out", make_params(), tmp_path / "metrics.json")


def test_missing_image_root_fails(tmp_path: Path) -> None:
    source = write_source(tmp_path / "source.jsonl", ["a.jpg"])
    with pytest.raises(StageError, match="`data.image_root` is .*which is not found, not a folder"):
        run(source, tmp_path / "out", make_params(image_root=str(tmp_path / "nope")), tmp_path / "metrics.json")


def test_error_rate_limit(server: LoopbackServer, tmp_path: Path) -> None:
    urls = [server.url("/status/404")] * 3 + [server.url("/img/red.jpg")]
    source = write_source(tmp_path / "source.jsonl", urls)
    with pytest.raises(StageError, match=r"download: 75\.0% of 4 records dropped, above `download.max_error_rate`"):
        run(source, tmp_path / "out", make_params(max_error_rate=0.5), tmp_path / "metrics.json")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["dropped_by_reason"] == {"http 404": 3}


class _FullDisk:
    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        pass


def test_disk_full_names_file(server: LoopbackServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = fetch._BodySink._write_file

    def write_to_full_disk(sink: fetch._BodySink, data: bytes) -> None:
        sink.file.close()
        sink.file = _FullDisk()
        original(sink, data)

    monkeypatch.setattr(fetch._BodySink, "_write_file", write_to_full_disk)
    source = write_source(tmp_path / "source.jsonl", [server.url("/img/red.jpg")])
    with pytest.raises(StageError, match=r"cannot write .*/tmp-[0-9a-f]+: No space left on device; the disk is full"):
        run(source, tmp_path / "out", make_params(), tmp_path / "metrics.json")


def test_cli_exit_codes(tmp_path: Path) -> None:
    params_file = _write_params_file(tmp_path / "params.yaml")
    assert download.main([str(tmp_path / "none.jsonl"), str(tmp_path / "out"), "--params", str(params_file)]) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("download:\n  workerz: 3\n", encoding="utf-8")
    assert download.main([str(tmp_path / "none.jsonl"), str(tmp_path / "out"), "--params", str(bad)]) == 2


# --------------------------------------------------------------------------- TLS


def test_https_image_and_deadline(https_server: LoopbackServer, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(https_server.certificate[0]))  # type: ignore[index]
    started = time.monotonic()
    entries = download_urls(tmp_path, [https_server.url("/img/red.jpg"), https_server.url("/drip?interval=0.05")])
    assert [entry["reason"] for entry in entries] == [None, "timeout"]
    assert entries[0]["sha256"] == hashlib.sha256(JPEG).hexdigest()
    assert entries[1]["detail"] == "download.deadline of 1.5 s exceeded"
    assert time.monotonic() - started < FAST["deadline"] + 3.5


def test_untrusted_certificate(https_server: LoopbackServer, tmp_path: Path) -> None:
    (entry,) = download_urls(tmp_path, [https_server.url("/img/red.jpg")])
    assert entry["reason"] == "tls error"
    assert "CERTIFICATE_VERIFY_FAILED" in entry["detail"]
