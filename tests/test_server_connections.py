"""Connection bounds of one HTTP process: idle keep-alive connections are closed after
--keep-alive-timeout, and past --max-connections new requests get 503 at once while the
server stays up for the others."""
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
    with running_server(root, ["--max-connections", "4", "--keep-alive-timeout", "1"],
                        {}) as (url, port, proc, log):
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
    assert sock.recv(65536) == b""  # the server closed it
    assert 0.5 < time.monotonic() - start < 4.0
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
