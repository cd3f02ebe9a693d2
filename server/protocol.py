"""The HTTP API's vocabulary: endpoints, query options, content types, Accept, refusals."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Optional

NPY, PNG, JSON = "application/x-npy", "image/png", "application/json"
MAX_SEED = 2**63 - 1


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP code, `detail` says what was expected;
    `fields` go into the JSON body next to it, `headers` into the response."""

    def __init__(self, status: int, detail: str, fields: Optional[dict] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(detail)
        self.status, self.detail = status, detail
        self.fields, self.headers = fields or {}, headers


@dataclass(frozen=True)
class Operation:
    """One endpoint: what it takes, what it gives, which query options it reads."""
    name: str
    takes: Literal["map", "latent"]
    gives: Literal["map", "latent"]
    params: tuple[str, ...]

    @property
    def path(self) -> str:
        return f"/{self.name}"

    @property
    def content_types(self) -> tuple[str, ...]:
        return (PNG, NPY, JSON) if self.takes == "map" else (NPY, JSON)

    @property
    def accept_types(self) -> tuple[str, ...]:
        return (NPY, PNG, JSON) if self.gives == "map" else (NPY, JSON)


OPERATIONS = {op.name: op for op in (
    Operation("encode", "map", "latent", ("mode", "seed", "scaled", "resize", "tiled")),
    Operation("decode", "latent", "map", ("scaled", "bits", "tiled")),
    Operation("reconstruct", "map", "map", ("mode", "seed", "resize", "bits", "tiled")),
)}


@dataclass(frozen=True)
class Options:
    mode: Literal["mean", "sample"] = "mean"
    seed: Optional[int] = None
    scaled: bool = False
    resize: Optional[tuple[int, int]] = None
    bits: int = 8
    tiled: Optional[bool] = None  # None: tiled when the map is over --max-pixels


def parse_options(op: Operation, query: Mapping[str, str]) -> Options:
    """Query string -> Options; an unknown name or bad value is a 422 listing what is allowed."""
    unknown = sorted(set(query) - set(op.params))
    if unknown:
        raise RequestError(422, f"unknown query parameter {unknown[0]!r}; {op.path} takes "
                                f"{', '.join(op.params)}")
    values: dict = {}
    if "mode" in query:
        values["mode"] = _choice(query["mode"], "mode", ("mean", "sample"))
    if "seed" in query:  # checked always, used by mode=sample only (the mean has no noise)
        seed = _integer(query["seed"], "seed", 0, MAX_SEED)
        if values.get("mode") == "sample":
            values["seed"] = seed
    for name in ("scaled", "tiled"):
        if name in query:
            values[name] = _choice(query[name].lower(), name,
                                   ("true", "false", "1", "0")) in ("true", "1")
    if "resize" in query:
        parts = query["resize"].split(",")
        if len(parts) != 2:
            raise RequestError(422, "resize: expected H,W such as 256,256, got "
                                    f"{query['resize']!r}")
        values["resize"] = tuple(_integer(p, "resize", 1, 1 << 20) for p in parts)
    if "bits" in query:
        values["bits"] = int(_choice(query["bits"], "bits", ("8", "16")))
    return Options(**values)


def _choice(value: str, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise RequestError(422, f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _integer(value: str, name: str, low: int, high: int) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise RequestError(422, f"{name}: expected an integer in {low}..{high}, got {value!r}")
    return number


def media_type(header: Optional[str]) -> str:
    """'Application/JSON; charset=utf-8' -> 'application/json'."""
    return (header or "").split(";", 1)[0].strip().lower()


def check_content_type(op: Operation, header: Optional[str]) -> str:
    kind = media_type(header)
    if kind not in op.content_types:
        got = f"{header!r}" if header else "no Content-Type"
        raise RequestError(415, f"{op.path} takes Content-Type {', '.join(op.content_types)}; "
                                f"got {got}")
    return kind


def negotiate(op: Operation, accept: Optional[str]) -> str:
    """The response type: the client's preferred one among the op's (npy if it does not mind)."""
    ranked = []
    for position, item in enumerate((accept or "*/*").split(",")):
        kind, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            if param.replace(" ", "").startswith("q="):
                try:
                    q = float(param.split("=", 1)[1])
                except ValueError:
                    q = 0.0
        if kind and q > 0:
            ranked.append((-q, position, kind.lower()))
    for _, _, kind in sorted(ranked):
        for offered in op.accept_types:
            if kind in (offered, "*/*", offered.split("/")[0] + "/*"):
                return offered
    raise RequestError(406, f"{op.path} answers with {', '.join(op.accept_types)}; "
                            f"the request accepts only {accept!r}")
