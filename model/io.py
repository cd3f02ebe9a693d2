"""Radio-map I/O shared by data loading, the server and tests.

A radio map at the edges of the system (PNG files, the HTTP API, numpy arrays) is a float
array in [0, 1]: an 8-bit RadioMapSeer pixel p is p / 255, a 16-bit one p / 65535. Inside the
network the same map is (x - 0.5) / 0.5, in [-1, 1]. A gain map's gray level g in [0, 1] is
GAIN_MIN_DB + g * (GAIN_MAX_DB - GAIN_MIN_DB) dB (RadioMapSeer's scaling; 0 inside buildings).
"""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN, STD = 0.5, 0.5
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
RANGE_TOLERANCE = 1e-3  # resampling may overshoot [0, 1] by a hair
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GAIN_MAX_DB, GAIN_MIN_DB = -47.0, -147.0  # RadioMapSeer's path gain at gray 1 (255) and gray 0


class RadioMapError(ValueError):
    """A radio map (PNG, npy, or array) is malformed or out of range; the message says why."""


class RadioMapTooLarge(RadioMapError):
    """A payload exceeds a byte or pixel limit (so a server can answer 413, not 400)."""


def decode_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """PNG bytes (8- or 16-bit grayscale) -> float32 [H, W] in [0, 1]."""
    if len(data) > max_bytes:
        raise RadioMapTooLarge(f"PNG is {len(data)} bytes; the limit is {max_bytes}")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            width, height = im.size
            if width * height > max_pixels:  # checked from the header, before decoding
                raise RadioMapTooLarge(f"PNG is {width}x{height} = {width * height} pixels; "
                                       f"the limit is {max_pixels}")
            mode = im.mode
            im.load()
            arr = np.asarray(im)
    except RadioMapError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own cap, above any sane max_pixels
        raise RadioMapTooLarge(f"PNG is too large: {err}") from None
    except Image.UnidentifiedImageError:  # its message holds the BytesIO's repr
        raise RadioMapError(f"not a decodable PNG: {_png_problem(data)}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise RadioMapError(f"not a decodable PNG: {err}") from None
    return _gray_to_unit(arr, mode)


def png_size(data: bytes) -> tuple[int, int]:
    """(H, W) a PNG declares in its IHDR chunk, read without decoding any pixel."""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 24:
        raise RadioMapError(f"not a decodable PNG: {_png_problem(data)}")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return height, width


def npy_shape(data: bytes) -> tuple[int, ...]:
    """The shape a `.npy` payload declares (its header checked against its size: see
    decode_npy), read without loading the array."""
    buf = io.BytesIO(data)
    try:
        return _check_npy_header(buf, len(data))
    except (ValueError, OSError, EOFError) as err:
        raise RadioMapError(f"not a readable .npy array: {err}") from None


def _png_problem(data: bytes) -> str:
    if not data.startswith(PNG_SIGNATURE):
        return (f"expected PNG bytes (they start with {PNG_SIGNATURE!r}); got "
                f"{data[:8]!r}" + ("..." if len(data) > 8 else ""))
    return "the PNG signature is followed by no valid IHDR header chunk"


def _gray_to_unit(arr: np.ndarray, mode: str) -> np.ndarray:
    if mode == "L":
        return arr.astype(np.float32) / 255.0
    if mode.startswith("I;16") or mode == "I":
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 65535:
            raise RadioMapError("16-bit PNG holds values outside 0..65535")
        return arr.astype(np.float32) / 65535.0
    raise RadioMapError(f"expected an 8- or 16-bit grayscale PNG, got mode {mode!r}")


def read_png(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a grayscale PNG file as float32 [H, W] in [0, 1]; errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise RadioMapError(f"{path}: cannot read ({err.strerror})") from None
    try:
        return decode_png(data, max_pixels=max_pixels, max_bytes=max(len(data), 1))
    except RadioMapError as err:
        raise RadioMapError(f"{path}: {err}") from None


def encode_png(x: np.ndarray, bits: int = 8) -> bytes:
    """Float [H, W] in [0, 1] -> grayscale PNG bytes at 8 or 16 bits."""
    x = check_map(np.asarray(x, dtype=np.float32), ndim=2)
    if bits == 8:
        im = Image.fromarray(np.round(x * 255.0).astype(np.uint8), mode="L")
    elif bits == 16:
        im = Image.fromarray(np.round(x * 65535.0).astype(np.uint16))
    else:
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: str | Path, x: np.ndarray, bits: int = 8) -> None:
    Path(path).write_bytes(encode_png(x, bits))


def check_map(x: np.ndarray, ndim: int | None = None) -> np.ndarray:
    """Check a float map (or batch) is finite and in [0, 1]; clip the tolerated overshoot."""
    if ndim is not None and x.ndim != ndim:
        raise RadioMapError(f"expected a {ndim}-D map, got shape {tuple(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise RadioMapError(f"expected a float map, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise RadioMapError("map holds NaN or Inf values")
    if x.size and (x.min() < -RANGE_TOLERANCE or x.max() > 1 + RANGE_TOLERANCE):
        raise RadioMapError(f"map values must lie in [0, 1], got [{x.min():.4g}, {x.max():.4g}]")
    return np.clip(x, 0.0, 1.0)


def decode_npy(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """`.npy` bytes -> array, without pickles and within a byte limit."""
    if len(data) > max_bytes:
        raise RadioMapTooLarge(f"npy payload is {len(data)} bytes; the limit is {max_bytes}")
    buf = io.BytesIO(data)
    try:
        _check_npy_header(buf, len(data))
        buf.seek(0)
        return np.load(buf, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise RadioMapError(f"not a readable .npy array: {err}") from None


def _check_npy_header(buf: io.BytesIO, size: int) -> tuple[int, ...]:
    # np.load allocates what the header claims before reading the data: a 100-byte payload
    # claiming terabytes would exhaust memory, so the claim must match the bytes present.
    version = np.lib.format.read_magic(buf)
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    try:
        shape, _, dtype = readers[version](buf)
    except ValueError as err:  # ast.literal_eval names what it refuses by its repr
        if " at 0x" not in str(err):
            raise
        raise ValueError("the header is not a dict of literals {'descr': ..., 'fortran_order': "
                         "..., 'shape': (...)}") from None
    if dtype.hasobject:
        raise ValueError("object arrays are refused (they need pickle)")
    claimed = math.prod(shape) * dtype.itemsize
    if claimed != size - buf.tell():
        raise ValueError(f"the header declares shape {shape} of {dtype} ({claimed} bytes) but "
                         f"{size - buf.tell()} data bytes follow")
    return tuple(shape)


def encode_npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return buf.getvalue()


def to_model(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Map(s) in [0, 1] -> the network's [-1, 1] tensor."""
    t = torch.as_tensor(x, dtype=torch.float32)
    return (t - MEAN) / STD


def from_model(t: torch.Tensor) -> torch.Tensor:
    """The network's [-1, 1] output -> map(s) in [0, 1], clamped."""
    return (t.float() * STD + MEAN).clamp(0.0, 1.0)
