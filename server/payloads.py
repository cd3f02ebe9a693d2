"""HTTP bodies <-> arrays: decoding, shape, size and value checks, resizing, encoding.

Runs in the HTTP processes, before a request reaches an inference worker, so that a bad request
is answered with a 4xx naming what was expected and never reaches (or poisons) a model batch.
Maps are float32 in [0, 1] at the API; latents are float32 [z, h, w] or [N, z, h, w].
"""
from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from PIL import Image

from model.io import (RadioMapError, RadioMapTooLarge, check_map, decode_npy, decode_png,
                      encode_npy, encode_png, npy_shape, png_size)
from runtime.tiling import Tiler

from .budget import UNLIMITED, Budget, check_cost
from .protocol import JSON, NPY, PNG, Operation, Options, RequestError
from .queueing import Ticket
from .spec import Limits, ModelSpec

Layout = Literal["hw", "chw", "nchw"]
# No posterior gives latents this large (they are O(1) to O(10)); far larger ones (~1e19)
# overflow float32 in GroupNorm's variance and decode to NaN maps.
LATENT_LIMIT = 1e4


@dataclass
class Job:
    """What an inference worker receives: validated arrays [N, C, H, W] and how to treat them."""
    x: np.ndarray
    mode: str = "mean"
    seed: Optional[int] = None
    scaled: bool = False
    tiler: Optional[Tiler] = None  # run through these tiles; None: whole
    ticket: Optional[Ticket] = None  # its place in the endpoint's queue (server/queueing.py)
    client: int = 0  # who sent it (server/queueing.py client_key): batches alternate clients


@dataclass
class Payload:
    array: np.ndarray  # [N, C, H, W] float32
    layout: Layout
    tiler: Optional[Tiler] = None  # how it is to be run (server/payloads.py: tiling)


def decode_body(body: bytes, kind: str, op: Operation, spec: ModelSpec, limits: Limits,
                options: Options, budget: Budget = UNLIMITED) -> Payload:
    """Request body -> checked float32 [N, C, H, W] (maps resized if asked) and the tiles it
    runs through; the size it is to be computed at (after ?resize=) is checked, then its cost
    (server/budget.py) against `budget`, before any resize."""
    if kind == JSON:
        items, encoding, is_list = _json_items(body, limits.max_request_maps)
    else:
        items, encoding, is_list = [body], ("png" if kind == PNG else "npy"), False
    _check_declared(items, encoding, op, spec, limits, options, budget)
    arrays = [_decode_item(item, encoding, op, limits, options) for item in items]
    payload = _stack(arrays, op, spec) if is_list else _as_batch(arrays[0], op, spec)
    _check_count(payload.array.shape[0], limits)
    size = _output_size(payload.array, op, spec, options)
    payload.tiler = tiling(size, options, limits)
    check_map_size(size, limits, payload.tiler, options, _prefix(payload.array, op))
    check_cost(op.path, len(payload.array), size, 1, budget, payload.tiler)
    if op.takes == "map":
        payload.array = _checked(check_map, payload.array)
        if options.resize:
            payload.array = resize_maps(payload.array, options.resize)
    else:
        if not np.isfinite(payload.array).all():
            raise RequestError(422, "latent holds NaN or Inf values")
        if np.abs(payload.array).max() > LATENT_LIMIT:
            raise RequestError(422, f"latent values must lie within +-{LATENT_LIMIT:g} (a "
                                    f"posterior's are O(1) to O(10)); got max |z| = "
                                    f"{np.abs(payload.array).max():.4g}")
    return payload


def _check_declared(items: list[bytes], encoding: str, op: Operation, spec: ModelSpec,
                    limits: Limits, options: Options, budget: Budget) -> None:
    """Cost before work: from the sizes the items declare (PNG IHDR, npy header), refuse a
    request whose decoded pixels, map size or compute cost is over its limit before any pixel
    is decoded (a 100-byte PNG may declare 4096x4096). The checks after decoding still run."""
    shapes = [_declared(item, encoding) for item in items]
    if op.takes != "map" or any(len(shape) < 2 for shape in shapes):
        return  # latents and odd shapes: bounded by the body size, checked once decoded
    largest = limits.max_pixels if options.tiled is False else limits.max_tiled_pixels
    if any(math.prod(shape) > largest for shape in shapes):
        return  # one item over the limit: its decoder refuses it from its header, naming it
    pixels = sum(math.prod(shape) for shape in shapes)
    bound = max(limits.max_tiled_pixels, limits.max_request_maps * limits.max_pixels)
    if pixels > bound:  # more than one largest map, or a full request of whole maps
        raise RequestError(413, f"the request's maps declare {pixels} pixels in all; a request "
                                f"may hold at most {bound} (the larger of --max-tiled-pixels "
                                f"and --max-request-maps x --max-pixels)")
    sizes = {tuple(shape[-2:]) for shape in shapes}
    if len(sizes) == 1:  # else refused once decoded: items of one list must share a shape
        size = tuple(options.resize or sizes.pop())
        maps = sum(math.prod(shape[:-2]) for shape in shapes)
        _check_count(maps, limits)
        tiler = tiling(size, options, limits)
        check_map_size(size, limits, tiler, options)
        check_cost(op.path, maps, size, 1, budget, tiler)


def _declared(item: bytes, encoding: str) -> tuple[int, ...]:
    try:
        return png_size(item) if encoding == "png" else npy_shape(item)
    except RadioMapError as err:
        raise RequestError(400, str(err)) from None


def _output_size(array: np.ndarray, op: Operation, spec: ModelSpec,
                 options: Options) -> tuple[int, int]:
    """The size of the maps the network works at: after ?resize=, or what latents decode to."""
    if op.takes == "map":
        return tuple(options.resize or array.shape[-2:])
    f = spec.downsample_factor
    return array.shape[-2] * f, array.shape[-1] * f


def _prefix(array: np.ndarray, op: Operation) -> str:
    """How a size error names what was sent: a latent by its own size, a map by nothing more."""
    if op.takes == "map":
        return ""
    return f"latent {array.shape[-2]}x{array.shape[-1]} decodes to a map of "


def tiling(hw: tuple[int, int], options: Options, limits: Limits) -> Optional[Tiler]:
    """The tiles an HxW map runs through (None: whole): with ?tiled=true, or by default when
    it is over --max-pixels; never for a map within one tile (tiled == untiled there)."""
    h, w = int(hw[0]), int(hw[1])
    wanted = h * w > limits.max_pixels if options.tiled is None else options.tiled
    tile = limits.tiler.tile
    return limits.tiler if wanted and (h > tile or w > tile) else None


def _check_count(count: int, limits: Limits) -> None:
    if not 1 <= count <= limits.max_request_maps:
        raise RequestError(413 if count else 422, f"a request holds 1 to "
                                                  f"{limits.max_request_maps} items; got {count}")


def _json_items(body: bytes, max_items: int) -> tuple[list[bytes], str, bool]:
    """The base64-decoded items of a JSON body, their encoding, and whether they came as a list."""
    # Base64 holds no comma, so a body of at most max_items items has at most max_items + 1 of
    # them: counted (in C, no allocation) before parsing, since parsing a body of millions of
    # empty items takes seconds and gigabytes.
    if body.count(b",") > max_items + 1:
        raise RequestError(413, f"a request holds 1 to {max_items} items; this JSON body holds "
                                f"more")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise RequestError(400, f"body is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or set(doc) - {"data", "encoding"} or "data" not in doc:
        raise RequestError(422, 'expected a JSON object {"data": <base64 or list of base64>, '
                                '"encoding": "npy" | "png"}')
    encoding = doc.get("encoding")
    if encoding not in ("npy", "png"):
        raise RequestError(422, f'"encoding": expected "npy" or "png", got {encoding!r}')
    data = doc["data"]
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(item, str) for item in items):
        raise RequestError(422, '"data": expected a base64 string or a non-empty list of them')
    if len(items) > max_items:
        raise RequestError(413, f"a request holds 1 to {max_items} items; got {len(items)}")
    decoded = []
    for i, item in enumerate(items):
        try:
            decoded.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as err:
            raise RequestError(400, f'"data"[{i}]: not valid base64: {err}') from None
    return decoded, encoding, isinstance(data, list)


def _decode_item(data: bytes, encoding: str, op: Operation, limits: Limits,
                 options: Options) -> np.ndarray:
    if encoding == "png" and op.takes != "map":
        raise RequestError(422, "latents cannot be PNG; send them as npy (float32)")
    largest = limits.max_pixels if options.tiled is False else limits.max_tiled_pixels
    try:
        if encoding == "png":
            return decode_png(data, max_pixels=largest, max_bytes=limits.max_body_bytes)
        array = decode_npy(data, max_bytes=limits.max_body_bytes)
    except RadioMapTooLarge as err:
        raise RequestError(413, str(err)) from None
    except RadioMapError as err:
        raise RequestError(400, str(err)) from None
    except Exception as err:  # noqa: BLE001 - a decoder fed hostile bytes may raise anything
        raise RequestError(400, f"not a decodable {encoding}: {type(err).__name__}: "
                                f"{err}") from None
    if array.dtype != np.float32:
        raise RequestError(422, f"expected a float32 array, got dtype {array.dtype}")
    return array


def _as_batch(array: np.ndarray, op: Operation, spec: ModelSpec) -> Payload:
    """[H, W] / [C, H, W] / [N, C, H, W] -> [N, C, H, W] and the layout it came in."""
    channels = 1 if op.takes == "map" else spec.latent_channels
    if op.takes == "map" and array.ndim == 2:
        return Payload(array[None, None], "hw")
    if array.ndim == 3 and array.shape[0] == channels:
        return Payload(array[None], "chw")
    if array.ndim == 4 and array.shape[1] == channels:
        return Payload(array, "nchw")
    if op.takes == "map":
        raise RequestError(422, f"expected a map [H, W], [1, H, W] or a batch [N, 1, H, W]; got "
                                f"shape {list(array.shape)}")
    raise RequestError(422, f"expected a latent [{channels}, h, w] or a batch [N, {channels}, h, w]"
                            f"; got shape {list(array.shape)}")


def _stack(arrays: list[np.ndarray], op: Operation, spec: ModelSpec) -> Payload:
    singles = [_as_batch(a, op, spec) for a in arrays]
    if any(s.layout == "nchw" for s in singles):
        raise RequestError(422, "each item of a JSON list is one map or latent, not a batch")
    shapes = {s.array.shape for s in singles}
    if len(shapes) > 1:
        raise RequestError(422, f"items of one JSON list must share a shape; got "
                                f"{sorted(list(s)[1:] for s in shapes)}")
    return Payload(np.concatenate([s.array for s in singles]), "nchw")


def check_map_size(hw: tuple[int, int], limits: Limits, tiler: Optional[Tiler],
                   options: Options, prefix: str = "") -> None:
    """413 / 422 unless an HxW map (run through `tiler`, or whole) is an accepted size."""
    h, w = int(hw[0]), int(hw[1])
    what = f"{prefix}{h}x{w}"
    if h * w > (limits.max_tiled_pixels if tiler else limits.max_pixels):
        tiled = "" if options.tiled is False else f"; {limits.tiling()}"
        raise RequestError(413, f"{what} = {h * w} pixels; this server accepts "
                                f"{limits.accepted()}{tiled}")
    pinned = limits.resolution
    bad = (h, w) != tuple(pinned) if pinned else (h % limits.factor or w % limits.factor
                                                   or not (h and w))
    if bad:
        raise RequestError(422, f"{what}: this server accepts {limits.accepted()}; "
                                "ask ?resize=H,W to resize maps")


def resize_maps(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of [N, 1, H, W] maps to `size`."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    h, w = size
    out = [np.asarray(Image.fromarray(m[0]).resize((w, h), Image.Resampling.BILINEAR))
           for m in x]
    return np.clip(np.stack(out)[:, None], 0.0, 1.0).astype(np.float32)


def _checked(check, array: np.ndarray) -> np.ndarray:
    try:
        return check(array)
    except RadioMapError as err:
        raise RequestError(422, str(err)) from None


def shape_output(result: np.ndarray, layout: Layout, op: Operation) -> np.ndarray:
    """A batch result back in the caller's layout: a single in, a single out."""
    if layout == "nchw":
        return result
    if layout == "hw" and op.gives == "map":
        return result[0, 0]
    return result[0]


def check_deliverable(kind: str, count: int) -> None:
    """Refuse, before any work, a PNG response that would have to hold several maps."""
    if kind == PNG and count != 1:
        raise RequestError(406, f"image/png holds one map and this response would hold {count}; "
                                f"accept {NPY} or {JSON}")


def encode_result(result: np.ndarray, layout: Layout, op: Operation, kind: str,
                  bits: int) -> bytes:
    """The response body: npy, PNG (one map) or JSON with base64 npy."""
    out = shape_output(np.ascontiguousarray(result, dtype=np.float32), layout, op)
    if kind == PNG:
        return encode_png(result[0, 0], bits=bits)
    if kind == JSON:
        return json.dumps({"encoding": "npy", "shape": list(out.shape), "dtype": "float32",
                           "data": base64.b64encode(encode_npy(out)).decode("ascii")}).encode()
    return encode_npy(out)
