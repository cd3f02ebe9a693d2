"""Connection bounds of one HTTP process: idle keep-alive connections are closed after
--keep-alive-timeout, a connection that has not sent a request head after --header-timeout is
closed, silent connections do not count against --max-connections, and past it new requests
get 503 at once while the server stays up for the others."""
import socket
import time

import pytest
import requests

from tests.conftest import CONNECTIONS_MAX, CONNECTIONS_SERVER
from tests.test_server import read_response

pytestmark = pytest.mark.server
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
KEEP_ALIVE, HEADER_TIMEOUT = 1.0, 2.0  # CONNECTIONS_SERVER's --keep-alive-timeout, ...


@pytest.fixture(scope="module")
def server(shared_server):
    """The session's server with tests/conftest.py CONNECTIONS_SERVER (--max-connections 4,
    --keep-alive-timeout 1, --header-timeout 2), shared with tests/test_server_uploads.py."""
    running = shared_server(CONNECTIONS_SERVER)
    return running.url, running.port


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(server):
    _, port = server
    sock = _connect(port)
    sent = time.monotonic()  # before the response, so before the keep-alive timer starts
    sock.sendall(HEALTH)
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    sock.settimeout(10 * KEEP_ALIVE)
    assert sock.recv(65536) == b""  # the server closed it (within the socket timeout)
    assert time.monotonic() - sent >= 0.9 * KEEP_ALIVE  # not before the keep-alive timeout
    sock.close()


def test_silent_connections_never_make_health_fail_and_are_closed(server):
    """Before: 64 idle TCP connections gave every request, /health included, 503 for as long
    as they stayed open. Now they do not count until they send, and after --header-timeout
    (2 s here) a connection without a whole request head is closed."""
    url, port = server
    silent = [_connect(port) for _ in range(12)]  # 3x --max-connections, sending nothing
    try:
        assert requests.get(f"{url}/health", timeout=5).status_code == 200
        for sock in silent:
            sock.settimeout(10 * HEADER_TIMEOUT)
            assert sock.recv(1) == b"", "a silent connection was left open"
    finally:
        for sock in silent:
            sock.close()


def test_past_max_connections_new_requests_get_503_and_the_rest_are_served(server):
    url, port = server
    held = [_connect(port) for _ in range(CONNECTIONS_MAX + 2)]
    try:
        for sock in held:  # each counts against the limit once it has sent something
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        deadline = time.monotonic() + HEADER_TIMEOUT
        while (answer := requests.get(f"{url}/health", timeout=30)).status_code != 503:
            assert answer.status_code == 200, answer.text  # the held bytes not yet read
            assert time.monotonic() < deadline, "never 503 past --max-connections"
            time.sleep(0.02)
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the slots free as the held connections close
        if requests.get(f"{url}/health", timeout=30).status_code == 200:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the server did not serve again after the held connections closed")
