"""Hostile payloads built by hand: PNGs and .npy files that lie about their size, and a
streamed body far larger than any limit."""
from __future__ import annotations

import io
import select
import socket
import struct
import zlib
from collections.abc import Iterator

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, bit_depth: int = 8, idat: bytes = b"") -> bytes:
    """A grayscale PNG whose header claims width x height, with `idat` as its only pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def decompression_bomb(side: int = 20000) -> bytes:
    """A valid side x side 8-bit PNG of zeros: ~side*side bytes decoded, a few hundred KB sent."""
    compressor, chunks = zlib.compressobj(9), []
    row = b"\x00" * (side + 1)  # filter byte + pixels
    for _ in range(side):
        chunks.append(compressor.compress(row))
    chunks.append(compressor.flush())
    return png_claiming(side, side, idat=b"".join(chunks))


def npy_claiming(shape: tuple[int, ...], descr: str = "<f4", data: bytes = b"") -> bytes:
    """An .npy whose header claims `shape` of `descr`, followed by only `data`."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


def png_of(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def zeros_1gib(chunk: int = 2**20) -> Iterator[bytes]:
    """1 GiB of body, produced as it is sent."""
    block = b"\x00" * chunk
    for _ in range(2**30 // chunk):
        yield block


def stream_until_answered(host: str, port: int, path: str, body: Iterator[bytes],
                          declared_length: int | None = None,
                          timeout: float = 30) -> tuple[int, int]:
    """POST a body from a generator, stopping as soon as the server answers or hangs up.

    Returns (HTTP status, body bytes sent). A raw socket, because HTTP clients send the whole
    body before they read an answer, and would push the full gigabyte at a server that
    refused it after the first megabytes.
    """
    length = (f"Content-Length: {declared_length}" if declared_length is not None
              else "Transfer-Encoding: chunked")
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/x-npy\r\n"
            f"{length}\r\n\r\n").encode()
    sent = 0
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in body:
            if select.select([sock], [], [], 0)[0]:
                break  # an answer (or a close) is waiting
            framed = chunk if declared_length is not None else (
                b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            try:
                sock.sendall(framed)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                break
            sent += len(chunk)
        return _read_status(sock), sent


def _read_status(sock: socket.socket) -> int:
    data = b""
    try:
        while b"\r\n" not in data:
            part = sock.recv(4096)
            if not part:
                break
            data += part
    except (ConnectionResetError, socket.timeout):
        pass
    if not data.startswith(b"HTTP/1."):
        raise AssertionError(f"no HTTP answer before the connection ended: {data[:80]!r}")
    return int(data.split()[1])
