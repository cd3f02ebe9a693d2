"""The HTTP side of /encode, /decode, /reconstruct: auth, limits, payloads, errors, OpenAPI.

Everything a client can get wrong is checked here, in the HTTP process, in the order that
costs the server least: key (401), query (422), Content-Type (415), Accept (406), declared
length (413, before any byte of the body is read), streamed length (413), then the payload
itself (400 / 413 / 422), its compute cost against the request budget (413, before any resize;
server/budget.py), room in its endpoint's queue (429). Only a valid job within budget reaches an
inference worker, and its answer is awaited until its deadline (504) or its client's departure
(server/queueing.py).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import Any, Literal, Optional, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .metrics import CONTENT_TYPE_LATEST
from .budget import UNLIMITED, Budget, client_share, cost_megapixels, endpoint_budget
from .logs import LOGGER
from .payloads import Job, check_deliverable, decode_body, encode_result
from .queueing import Abandoned, OverShare, QueueSlots, client_key, retry_after
from .protocol import (JSON, MAX_SEED, NPY, PNG, Operation, RequestError, check_content_type,
                       negotiate, parse_options)
from .spec import Limits, ModelSpec

logger = logging.getLogger(LOGGER)
ENDPOINTS = ("/encode", "/decode", "/reconstruct", "/health", "/info", "/metrics")
_OBJECT_REPR = re.compile(r"<([\w.]+)[^<>]* at 0x[0-9a-fA-F]+>")


class Handler(Protocol):
    """How a route reaches its endpoint's workers (server/app.py's QueuedRequestHandler)."""
    slots: QueueSlots
    in_flight: QueueSlots
    timeout: float

    async def answer(self, job: Job, gone: Callable[[], Any], timeout: float) -> Any: ...


@dataclass(frozen=True)
class Context:
    """What every request handler needs to know about the server; `workers` reads what the
    inference workers published (their measured speed and request budget)."""
    spec: ModelSpec
    limits: Limits
    api_key: Optional[str]
    workers: Callable[[], list[dict]] = list
    trusted_proxies: tuple = ()  # networks of proxies whose X-Real-IP names the client
    body_timeout: float = float("inf")  # seconds a request body may take to arrive


class ErrorBody(BaseModel):
    status: int
    error: str
    detail: str


class HealthBody(BaseModel):
    status: Literal["ready", "starting"]
    workers: dict[str, str]


class TooLargeBody(ErrorBody):
    """A 413; one refused for its compute cost also says the cost and the budget."""
    cost_megapixels: Optional[float] = None
    budget_megapixels: Optional[float] = None


def error_response(status: int, detail: str, fields: Optional[dict] = None,
                   headers: Optional[Mapping[str, str]] = None) -> JSONResponse:
    """The one JSON shape of every error; a Python object's repr that a library put in its
    message (PIL: `<_io.BytesIO object at 0x7f...>`) is named by its type, never its address."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    detail = _OBJECT_REPR.sub(lambda m: f"a {m.group(1).rsplit('.', 1)[-1]} object", detail)
    return JSONResponse({"status": status, "error": phrase, "detail": detail, **(fields or {})},
                        status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours, FastAPI's (404, 405) or litserve's (504), as one JSON shape."""

    async def request_error(_: Request, err: RequestError) -> JSONResponse:
        return error_response(err.status, err.detail, err.fields, err.headers)

    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), headers=err.headers)  # 405: Allow

    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("bug: %s %s raised", request.method, request.url.path)
        return error_response(500, f"internal error ({type(err).__name__}); this is a server bug")

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def authorize(request: Request, api_key: Optional[str]) -> None:
    """With a key configured: a non-empty X-API-Key must be the key; without one (an empty
    header counts as none), the Authorization Bearer token must be."""
    if api_key is None:
        return
    given = request.headers.get("x-api-key", "").strip()
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    if not given and scheme.lower() == "bearer":
        given = token.strip()
    if not given:
        raise RequestError(401, "missing API key: send it as 'X-API-Key: <key>' or "
                                "'Authorization: Bearer <key>'")
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise RequestError(401, "wrong API key")


async def read_body(request: Request, limit: int, path: str = "",
                    seconds: float = float("inf")) -> bytes:
    """The body, refused with 413 as soon as it (or its declared length) passes `limit`, and
    with 408 when it has not all arrived within `seconds`; a client that leaves mid-upload is
    a 499 with its own counter, not a server error."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"Content-Length: expected a byte count, got {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, f"body is {int(declared)} bytes; the limit is {limit} "
                                    "(--max-body-mb)")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(None if seconds == float("inf") else seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"body exceeds the limit of {limit} bytes "
                                            "(--max-body-mb)")
                chunks.append(chunk)
    except TimeoutError:
        metrics.reject(path, "slow_upload")
        raise RequestError(408, f"{path}: the body did not arrive within {seconds:g} s "
                                f"({size} bytes received; --body-timeout)") from None
    except ClientDisconnect:
        metrics.reject(path, "disconnected_upload")
        logger.info("499 %s: the client closed the connection during the upload (%d bytes "
                    "received)", path, size)
        raise RequestError(499, f"{path}: the client closed the connection during the "
                                "upload") from None
    return b"".join(chunks)


async def serve(request: Request, op: Operation, handler: Handler, ctx: Context) -> Response:
    authorize(request, ctx.api_key)
    options = parse_options(op, request.query_params)
    kind = check_content_type(op, request.headers.get("content-type"))
    answer = negotiate(op, request.headers.get("accept"))
    body = await read_body(request, ctx.limits.max_body_bytes, op.path, ctx.body_timeout)
    budget = endpoint_budget(await run_in_threadpool(ctx.workers), op.path)
    payload = await run_in_threadpool(decode_body, body, kind, op, ctx.spec, ctx.limits, options,
                                      budget)
    check_deliverable(answer, len(payload.array))
    job = Job(payload.array, options.mode, options.seed, options.scaled, payload.tiler)
    result = await dispatch(request, op, handler, ctx, job, budget)
    content = await run_in_threadpool(encode_result, result, payload.layout, op, answer,
                                      options.bits)
    return Response(content, media_type=answer)


async def dispatch(request: Request, op: Operation, handler: Handler, ctx: Context,
                   job: Job, budget: Budget = UNLIMITED) -> Any:
    """Queue `job` and return its result: 429 when the queue is full or the client's share of
    it (one request budget of queued or running cost) is taken, 504 at the deadline, 499
    (nobody reads it) when the client left. Counts every rejection (server/metrics.py)."""
    path = op.path
    factor = 1 if op.takes == "map" else ctx.spec.downsample_factor
    cost = cost_megapixels(len(job.x), job.x.shape[-2:], factor, job.tiler, budget)
    client = client_key(request.client.host if request.client else None,
                        request.headers.get("x-real-ip"), ctx.trusted_proxies)
    try:
        limit = client_share(await run_in_threadpool(ctx.workers), path, handler.timeout)
        share = handler.in_flight.take(cost, client, limit)
    except OverShare as err:
        raise await _over_share(path, ctx, err.held, limit, handler.timeout) from None
    try:
        return await _queued(request, path, handler, ctx, replace(job, client=client), cost)
    finally:
        if share is not None:
            handler.in_flight.release(share)


async def _queued(request: Request, path: str, handler: Handler, ctx: Context, job: Job,
                  cost: float) -> Any:
    ticket = handler.slots.take(cost, size=job.x.nbytes)
    if ticket is None:
        raise await _queue_full(path, handler, ctx)
    try:
        return await handler.answer(replace(job, ticket=ticket),
                                    lambda: client_gone(request.receive), handler.timeout)
    except Abandoned as err:
        abandoned = err.reason
    except StarletteHTTPException as err:  # a worker's 504 (its batch would end too late),
        if err.status_code == 504:           # 503 (no memory for it now) or 500 (it died)
            metrics.reject(path, "deadline_unreachable")
        if err.status_code == 503:
            metrics.reject(path, "no_memory")
            seconds = retry_after(await run_in_threadpool(ctx.workers), path, cost,
                                  handler.timeout)
            raise RequestError(503, str(err.detail), headers={"Retry-After": str(seconds)})
        raise
    finally:
        never_run = handler.slots.abandon(ticket)  # False: a worker ran it
    raise _abandoned(path, abandoned, never_run, handler.timeout)


async def _over_share(path: str, ctx: Context, held: float, budget: float,
                      timeout: float) -> RequestError:
    metrics.reject(path, "client_share")
    seconds = retry_after(await run_in_threadpool(ctx.workers), path, held, timeout)
    return RequestError(429, f"{path}: this client already has {held:.4g} megapixels in "
                             f"progress; one client may have up to {budget:.4g} (what the "
                             f"endpoint computes in --timeout) so that others are served too; "
                             f"retry in about {seconds} s",
                        headers={"Retry-After": str(seconds)})


async def _queue_full(path: str, handler: Handler, ctx: Context) -> RequestError:
    metrics.reject(path, "queue_full")
    waiting, queued = handler.slots.waiting()
    seconds = retry_after(await run_in_threadpool(ctx.workers), path, queued,
                          handler.timeout)
    return RequestError(429, f"{path}: the queue is full ({waiting} requests wait, --max-queue "
                             f"{handler.slots.capacity}); retry in about {seconds} s",
                        headers={"Retry-After": str(seconds)})


def _abandoned(path: str, reason: str, never_run: bool, timeout: float) -> RequestError:
    """Count a request its handler stopped waiting for; its 504 (or 499)."""
    if reason == "disconnected":
        if never_run:  # a worker that meets it drops it; a running batch is not interrupted
            metrics.reject(path, reason)
        return RequestError(499, f"{path}: the client closed the connection before the answer")
    metrics.reject(path, "deadline" if never_run else "deadline_running")
    where = ("it was still queued, and will not run" if never_run else
             "its batch was still running; its result will be discarded")
    return RequestError(504, f"{path}: no answer within the request deadline (--timeout "
                             f"{timeout:g} s): {where}. The server is busy: retry later, or "
                             "send a smaller request")


async def client_gone(receive: Receive) -> None:
    """Return once the client has closed the connection. Called after the body was read, when
    the only message left to receive is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


def add_operation_route(app: FastAPI, op: Operation, handler: Handler, ctx: Context) -> None:
    metrics.expose_rejections(op.path)
    async def endpoint(request: Request) -> Response:
        return await serve(request, op, handler, ctx)

    endpoint.__name__ = op.name
    app.add_api_route(op.path, endpoint, methods=["POST"], response_class=Response,
                      summary=_SUMMARIES[op.name], description=_description(op, ctx),
                      openapi_extra=_openapi_extra(op), responses=_responses(op))


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status code, its latency, and those in flight."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        gauge = metrics.IN_FLIGHT.labels(endpoint)
        gauge.inc()
        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_record)
        finally:
            gauge.dec()
            metrics.REQUESTS.labels(endpoint, str(status)).inc()
            metrics.REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - start)


# OpenAPI: the payloads as they really are (FastAPI cannot infer them from a raw Request).

_SUMMARIES = {"encode": "Radio map(s) -> latent(s)", "decode": "Latent(s) -> radio map(s)",
              "reconstruct": "Radio map(s) -> reconstructed radio map(s)"}

_PARAMETERS = {
    "mode": ({"type": "string", "enum": ["mean", "sample"], "default": "mean"},
             "mean: the posterior mean (its mode); sample: a draw from the posterior"),
    "seed": ({"type": "integer", "minimum": 0, "maximum": MAX_SEED},
             "with mode=sample: a torch.Generator seed, for reproducible samples; checked but "
             "unused with mode=mean (the mean draws no noise)"),
    "scaled": ({"type": "boolean", "default": False},
               "latents times the model's scale factor (GET /info: the checkpoint's stored "
               "latent_stats value, else 0.3), as latent diffusion uses them; on /decode the "
               "latents are divided by it first"),
    "resize": ({"type": "string", "pattern": r"^\d+,\d+$", "example": "256,256"},
               "resize input maps to H,W (bilinear) when their size is not accepted"),
    "bits": ({"type": "integer", "enum": [8, 16], "default": 8},
             "bit depth of a PNG response"),
    "tiled": ({"type": "boolean"},
              "true: run maps larger than one tile (--tile, overlapping by --tile-overlap; GET "
              "/info: limits) as blended tiles; false: whole, within --max-pixels; default: "
              "tiled when over --max-pixels, up to --max-tiled-pixels. A tiled request costs "
              "tiles x tile pixels per map against the request budget"),
}

_BINARY = {"type": "string", "format": "binary"}
_BASE64 = {"type": "string", "format": "byte"}
_JSON_OUT = {"type": "object", "required": ["encoding", "data", "shape", "dtype"],
             "additionalProperties": False, "properties": {
    "encoding": {"type": "string", "enum": ["npy"]}, "data": _BASE64,
    "shape": {"type": "array", "items": {"type": "integer"}},
    "dtype": {"type": "string", "enum": ["float32"]}}}


def _description(op: Operation, ctx: Context) -> str:
    f, z = ctx.spec.downsample_factor, ctx.spec.latent_channels
    maps = ("float32 maps in [0, 1]: [H, W], [1, H, W] or a batch [N, 1, H, W]; or one 8/16-bit "
            "grayscale PNG")
    latents = f"float32 latents [{z}, H/{f}, W/{f}] or a batch [N, {z}, H/{f}, W/{f}]"
    takes = maps if op.takes == "map" else latents
    gives = ("maps in [0, 1], one per input, in the input's layout (npy), or one PNG"
             if op.gives == "map" else f"latents [{z}, H/{f}, W/{f}] per map (npy)")
    sizes = ctx.limits.accepted()
    if not ctx.limits.resolution:
        sizes += f"; {ctx.limits.tiling()} unless ?tiled=false"
    return (f"Takes {takes}. Accepted sizes: {sizes}; at most "
            f"{ctx.limits.max_request_maps} per request. Gives {gives}; `Accept: "
            f"{JSON}` wraps the npy in base64. Errors are JSON {{status, error, detail}}.")


def _json_in(op: Operation) -> dict:
    """The JSON request body server/payloads.py accepts: exactly `data` and `encoding` (latents
    come as npy only)."""
    encodings = ["npy", "png"] if op.takes == "map" else ["npy"]
    data = {"oneOf": [_BASE64, {"type": "array", "items": _BASE64, "minItems": 1}],
            "description": f"base64 of one .{' / .'.join(encodings)}, or a list of them (a "
                           "batch, one item each)"}
    return {"type": "object", "required": ["data", "encoding"], "additionalProperties": False,
            "properties": {"data": data, "encoding": {"type": "string", "enum": encodings}}}


def _openapi_extra(op: Operation) -> dict:
    content = {NPY: {"schema": _BINARY}, JSON: {"schema": _json_in(op)}}
    if op.takes == "map":
        content[PNG] = {"schema": _BINARY}
    params = [{"name": name, "in": "query", "required": False, "schema": _PARAMETERS[name][0],
               "description": _PARAMETERS[name][1]} for name in op.params]
    return {"requestBody": {"required": True, "content": content}, "parameters": params}


def _responses(op: Operation) -> dict:
    ok = {NPY: {"schema": _BINARY}, JSON: {"schema": _JSON_OUT}}
    if op.gives == "map":
        ok[PNG] = {"schema": _BINARY}
    errors = {400: "undecodable PNG, npy, JSON or base64", 401: "missing or wrong API key",
              406: "no acceptable response type",
              413: "body, pixel count (--max-pixels; tiled: --max-tiled-pixels) or batch over "
                   "the limit, or compute cost over the per-request budget, or a largest "
                   "pass whose working memory never fits (then with cost_megapixels and "
                   "budget_megapixels: send fewer maps or a smaller ?resize=)",
              415: "unsupported Content-Type",
              422: "wrong dtype, shape, size, NaN/Inf, values or query option",
              429: "the endpoint's queue is full (--max-queue, --max-queue-mb), or this client "
                   "already has a request budget's worth in progress; nothing was queued: retry "
                   "after Retry-After seconds",
              500: "the inference worker running the request died (it restarts)",
              503: "the endpoint's worker is still warming up or restarting, or the request's "
                   "working memory does not fit in what is free now; never started "
                   "(Retry-After)",
              504: "no answer within the deadline (--timeout from queueing): the request was "
                   "dropped unrun, not started because its batch would end too late, or its "
                   "batch was still running (its result is discarded)"}
    responses: dict = {200: {"description": "the result", "content": ok}}
    for status, text in errors.items():
        responses[status] = {"description": text,
                             "model": TooLargeBody if status == 413 else ErrorBody}
        if status in (429, 503):
            responses[status]["headers"] = {"Retry-After": _RETRY_AFTER}
    return responses


_RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer",
                                                                             "minimum": 1}}


# OpenAPI of the internal endpoints (server/app.py)

HEALTH_RESPONSES: dict = {200: {"model": HealthBody, "description": "every worker is ready"},
                          503: {"model": HealthBody, "description": "a worker is still loading "
                                                                     "the model or warming up"}}
INFO_RESPONSES: dict = {401: {"model": ErrorBody, "description": "missing or wrong API key"}}
METRICS_RESPONSES: dict = {200: {"description": "Prometheus text exposition format",
                                 "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}}
