"""Concurrent uploads are bounded in memory, on a real `python -m server` (tiny model, CPU):
many clients each hold an almost finished large upload open; the HTTP process holds at most
--max-connections of them (the rest get 503 at once), so its resident memory grows by about
--max-connections x the body size, not by the number of clients; then every held upload that
was admitted is read and answered (its values are out of range, so that the test measures
uploads, not the model: each is read and decoded in full, then refused with 422)."""
from __future__ import annotations

import os
import re
import select
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from model.io import encode_npy
from tests.conftest import CONNECTIONS_MAX, CONNECTIONS_SERVER
from tests.test_server import NPY, read_response, running_server, save_tiny_checkpoint

pytestmark = pytest.mark.server
MAX_CONNECTIONS = CONNECTIONS_MAX
CLIENTS = 48  # 12x the limit: held all at once, unbounded, they would take 192 MiB
SIDE = 1024  # a 1x1x1024x1024 float32 map: 4 MiB per upload (CONNECTIONS_SERVER: 1024^2)
BODY_MIB = 4
MIB = 1 << 20
# the server of the control test: CONNECTIONS_SERVER's limits but --max-connections
UNLIMITED_SERVER = ["--max-connections", str(4 * CLIENTS), "--max-pixels", str(SIDE * SIDE),
                    "--timeout", "120", "--max-body-mb", "8"]


def _tcp_queues() -> list[tuple[int, int, int, int]]:
    """(local port, remote port, bytes not yet acknowledged by the peer, bytes received and
    not yet read by the process) of each IPv4 TCP socket."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(f.split(":")[1], 16) for f in fields[1:3])
        unacked, unread = (int(q, 16) for q in fields[4].split(":"))
        found.append((local, remote, unacked, unread))
    return found


def _wait_until_read(port: int, socks: list[socket.socket], limit: float = 120.0) -> None:
    """Until the server on `port` has read every byte sent on `socks`: nothing in flight from
    them, nothing waiting in the server's receive queues."""
    clients = {sock.getsockname()[1] for sock in socks}
    deadline = time.monotonic() + limit
    while True:
        pending = sum(unacked if local in clients and remote == port else unread
                      for local, remote, unacked, unread in _tcp_queues()
                      if (local in clients and remote == port)
                      or (local == port and remote in clients))
        if not pending:
            return
        assert time.monotonic() < deadline, f"{pending} bytes never read by the server"
        time.sleep(0.02)


def _socket_owner(local_port: int, remote_port: int) -> int:
    """The process holding the established TCP connection local_port <- remote_port."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(f.split(":")[1], 16) for f in fields[1:3])
        if (local, remote, fields[3]) == (local_port, remote_port, "01"):  # ESTABLISHED
            inode = f"socket:[{fields[9]}]"
    assert inode, f"no connection {remote_port} -> {local_port}"
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == inode
                   for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    raise AssertionError("no process holds the connection")


def _http_process(port: int) -> int:
    """The uvicorn process serving `port`: the one that answers a keep-alive request (others,
    the main process and the queue manager, hold the listening socket too)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(sock)
        return _socket_owner(port, sock.getsockname()[1])


def _kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0])


def _hold_uploads(port: int, max_connections: int) -> tuple[float, int, list[bytes]]:
    """CLIENTS clients each send all but the last byte of an upload to the server on `port`
    and hold it; the HTTP process's peak memory growth (MiB) once it has read every byte sent,
    how many uploads it admitted, and every answer."""
    body = encode_npy(np.full((1, 1, SIDE, SIDE), 2.0, np.float32))
    head = (f"POST /reconstruct?mode=mean HTTP/1.1\r\nHost: x\r\nContent-Type: {NPY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    http = _http_process(port)
    Path(f"/proc/{http}/clear_refs").write_text("5")
    before = _kib(http, "VmRSS")
    sent, answers = [], []
    try:
        for _ in range(CLIENTS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            try:
                sock.sendall(head + body[:-1])
                sent.append(sock)
            except OSError:  # past the limit: answered 503 and closed while we sent
                answers.append(b"refused")
                sock.close()
        _wait_until_read(port, sent)
        grown_mib = (_kib(http, "VmHWM") - before) / 1024
        # past the limit too: answered 503 and closed after we sent (the upload fitted in the
        # socket buffers); an admitted upload has no answer before its last byte
        answered = set(select.select(sent, [], [], 0)[0])
        answers += [b"refused"] * len(answered)
        held = [sock for sock in sent if sock not in answered]
        for sock in held:
            sock.sendall(body[-1:])
        for sock in held:
            answers.append(read_response(sock).split(b" ", 2)[1])
    finally:
        for sock in sent:
            sock.close()
    print(f"--max-connections {max_connections}: HTTP process +{grown_mib:.0f} MiB peak, "
          f"{CLIENTS} clients holding {len(body) / MIB:.0f} MiB uploads, {len(held)} admitted")
    return grown_mib, len(held), answers


def test_many_concurrent_uploads_hold_at_most_max_connections_bodies(shared_server):
    """On the session's CONNECTIONS_SERVER (tests/conftest.py), shared with the connection
    tests."""
    port = shared_server(CONNECTIONS_SERVER).port
    grown_mib, admitted, answers = _hold_uploads(port, MAX_CONNECTIONS)
    assert 1 <= admitted <= MAX_CONNECTIONS and answers.count(b"422") == admitted, str(answers)
    assert answers.count(b"refused") == CLIENTS - admitted, str(answers)
    # at most MAX_CONNECTIONS bodies (each read once and decoded once), plus slack
    assert grown_mib < MAX_CONNECTIONS * 3 * BODY_MIB + 64, (
        f"the HTTP process grew by {grown_mib:.0f} MiB for {CLIENTS} held {BODY_MIB} MiB "
        f"uploads with --max-connections {MAX_CONNECTIONS}")


def test_without_a_low_limit_every_held_upload_costs_its_body(tmp_path):
    """The control: the measurement sees the bodies, so the bound above is the limit's doing."""
    save_tiny_checkpoint(tmp_path)
    with running_server(tmp_path, UNLIMITED_SERVER, {}) as (url, port, proc, log):
        grown_mib, admitted, answers = _hold_uploads(port, 4 * CLIENTS)
    assert admitted == CLIENTS and answers.count(b"422") == CLIENTS, str(answers)
    assert grown_mib > 0.75 * CLIENTS * BODY_MIB, f"grew by {grown_mib:.0f} MiB only"


def test_a_client_that_leaves_mid_upload_is_a_499_line_and_counter_not_a_bug(shared_server):
    """Before: logged as "bug: ... raised" with a traceback and counted as a server error.
    On the session's CONNECTIONS_SERVER (--log-level info)."""
    _, url, port, _, log = shared_server(CONNECTIONS_SERVER)
    counter = 'radiodiff_rejections_total{endpoint="/encode",reason="disconnected_upload"}'

    def counted() -> float:
        text = requests.get(url + "/metrics", timeout=30).text
        return float(re.search(rf"^{re.escape(counter)} (\S+)$", text, re.M)[1]) \
            if counter in text else 0.0

    before = counted()
    with _partial_upload(port, 100000, b"\x93NUMPY" + b"\0" * 1000) as sock:
        _wait_until_read(port, [sock])  # the server is reading the body
    deadline = time.monotonic() + 60
    while counted() != before + 1:
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.05)
    text = log.read_text()
    assert "499 /encode: the client closed the connection during the upload" in text
    assert "bug:" not in text and "Traceback" not in text


def test_a_body_slower_than_the_body_timeout_gets_408(tmp_path):
    save_tiny_checkpoint(tmp_path)
    with running_server(tmp_path, ["--body-timeout", "1"], {}) as (url, port, proc, log):
        with _partial_upload(port, 1000, b"\x93NUMPY") as sock:  # then nothing: a stuck upload
            answer = read_response(sock)
        counts = requests.get(url + "/metrics", timeout=10).text
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer, answer[:300]
    assert 'reason="slow_upload"} 1.0' in counts


def _partial_upload(port: int, length: int, sent: bytes) -> socket.socket:
    """A connection that declared a `length`-byte /encode body and sent only `sent` of it."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall(f"POST /encode HTTP/1.1\r\nHost: x\r\nContent-Type: {NPY}\r\n"
                 f"Content-Length: {length}\r\n\r\n".encode() + sent)
    return sock
