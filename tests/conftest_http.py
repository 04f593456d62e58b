"""Pytest plugin: the session-wide loopback HTTP and HTTPS servers of tests/http_server.py.

Loaded from tests/conftest.py through ``pytest_plugins``. Each server starts on
first use, listens on 127.0.0.1 only, and stops when the session ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.http_server import LoopbackServer, make_certificate


@pytest.fixture(scope="session")
def http_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def https_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackServer]:
    """The same routes over TLS; ``https_server.certificate[0]`` is the certificate to trust."""
    server = LoopbackServer(make_certificate(tmp_path_factory.mktemp("tls"))).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server(http_server: LoopbackServer) -> LoopbackServer:
    """The session server with an empty request log and fresh counters."""
    http_server.clear()
    http_server.on_request = None
    return http_server
