"""Connection bounds of one HTTP process: idle keep-alive connections are closed after
--keep-alive-timeout, a connection that has not sent a request head after --header-timeout is
closed, silent connections do not count against --max-connections, and past it new requests
get 503 at once while the server stays up for the others."""
import socket
import time

import pytest
import requests

from tests.test_server import read_response, running_server, save_tiny_checkpoint

HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("conn")
    save_tiny_checkpoint(root)
    args = ["--max-connections", "4", "--keep-alive-timeout", "1", "--header-timeout", "2"]
    with running_server(root, args, {}) as (url, port, proc, log):
        yield url, port


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(server):
    _, port = server
    sock = _connect(port)
    sock.sendall(HEALTH)
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    start = time.monotonic()
    sock.settimeout(10)
    assert sock.recv(65536) == b""  # the server closed it (within the 10 s socket timeout)
    assert time.monotonic() - start > 0.5  # not before the keep-alive timeout
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
            sock.settimeout(15)
            assert sock.recv(1) == b"", "a silent connection was left open"
    finally:
        for sock in silent:
            sock.close()


def test_past_max_connections_new_requests_get_503_and_the_rest_are_served(server):
    url, port = server
    held = [_connect(port) for _ in range(6)]  # open, silent: each counts against the limit
    try:
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        time.sleep(0.5)
        answer = requests.get(f"{url}/health", timeout=5)
        assert answer.status_code == 503
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the slots free as the held connections close
        if requests.get(f"{url}/health", timeout=5).status_code == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the server did not serve again after the held connections closed")
