"""A small Python client for the server: numpy in, numpy out.

    from server.client import Client
    vae = Client("http://localhost:8000", api_key=None)
    z = vae.encode(maps, mode="sample", seed=0, scaled=True)   # [N, 1, H, W] -> [N, z, h, w]
    maps = vae.decode(z, scaled=True)

Maps are float arrays in [0, 1]: one [H, W] or [1, H, W], or a batch [N, 1, H, W] (a list of
[H, W] maps is stacked into one). A single in gives a single out. Only numpy and requests are
needed, so the downstream diffusion code can import it without torch or litserve.
"""
from __future__ import annotations

import io
import time
from typing import Any, Optional, Sequence, Union

import numpy as np
import requests

NPY = "application/x-npy"
RETRIED = (429, 503)
Arrays = Union[np.ndarray, Sequence[np.ndarray]]


class ServerError(RuntimeError):
    """The server refused or failed a request; `status` and `detail` are the server's."""

    def __init__(self, status: int, detail: str, url: str):
        super().__init__(f"{status} from {url}: {detail}")
        self.status, self.detail, self.url = status, detail, url


class Client:
    """HTTP client for /encode, /decode, /reconstruct (npy on the wire)."""

    def __init__(self, url: str, api_key: Optional[str] = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 0.5, max_wait: float = 30.0):
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_wait = max_wait  # the longest Retry-After the client sleeps
        self.session = requests.Session()
        if api_key is not None:
            self.session.headers["X-API-Key"] = api_key

    def encode(self, maps: Arrays, mode: str = "mean", seed: Optional[int] = None,
               scaled: bool = False, tiled: Optional[bool] = None) -> np.ndarray:
        """Maps -> latents (the posterior mean, or a sample; times the scale factor if scaled).
        tiled: True/False forces tiling on/off; None lets the server tile maps over its
        --max-pixels (docs/server.md, "Large maps: tiling")."""
        params = {"mode": mode, "scaled": _flag(scaled), **_seed(seed), **_tiled(tiled)}
        return self._post("/encode", _maps(maps), params)

    def decode(self, latents: np.ndarray, scaled: bool = False,
               tiled: Optional[bool] = None) -> np.ndarray:
        """Latents [z, h, w] or [N, z, h, w] -> maps in [0, 1] ([1, H, W] or [N, 1, H, W])."""
        return self._post("/decode", np.asarray(latents, np.float32),
                          {"scaled": _flag(scaled), **_tiled(tiled)})

    def reconstruct(self, maps: Arrays, mode: str = "mean", seed: Optional[int] = None,
                    tiled: Optional[bool] = None) -> np.ndarray:
        return self._post("/reconstruct", _maps(maps), {"mode": mode, **_seed(seed),
                                                        **_tiled(tiled)})

    def info(self) -> dict[str, Any]:
        """The server's model, accepted shapes, limits and versions (GET /info)."""
        return self._request("GET", "/info").json()

    def ready(self) -> bool:
        """True once the server has loaded the model and warmed up (GET /health)."""
        try:
            return self.session.get(self.url + "/health", timeout=self.timeout).status_code == 200
        except requests.ConnectionError:
            return False

    def _post(self, path: str, array: np.ndarray, params: dict) -> np.ndarray:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        response = self._request("POST", path, data=buf.getvalue(), params=params,
                                 headers={"Content-Type": NPY, "Accept": NPY})
        return np.load(io.BytesIO(response.content), allow_pickle=False)

    def _request(self, method: str, path: str, **kwargs) -> requests.Response:
        """One request, retried on connection errors, 429 (queue full) and 503 (a server
        starting, restarting, draining, or short of memory for it now): after the server's
        Retry-After when it sends one (at most max_wait), else with exponential backoff. The
        endpoints are pure functions, so a retry cannot do anything twice; a 500 (the worker
        running it died) is not retried: the request may be what killed it."""
        url, attempt = self.url + path, 0
        while True:
            wait = self.backoff * 2**attempt
            try:
                response = self.session.request(method, url, timeout=self.timeout, **kwargs)
            except requests.ConnectionError:
                if attempt >= self.retries:
                    raise
            else:
                if response.status_code == 200:
                    return response
                if response.status_code not in RETRIED or attempt >= self.retries:
                    raise ServerError(response.status_code, _detail(response), url)
                wait = _retry_after(response, wait, self.max_wait)
            time.sleep(wait)
            attempt += 1


def _maps(maps: Arrays) -> np.ndarray:
    if isinstance(maps, np.ndarray):
        return maps.astype(np.float32, copy=False)
    return np.stack([np.asarray(m, np.float32) for m in maps])[:, None]


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _seed(seed: Optional[int]) -> dict:
    return {} if seed is None else {"seed": str(seed)}


def _tiled(tiled: Optional[bool]) -> dict:
    return {} if tiled is None else {"tiled": _flag(tiled)}


def _retry_after(response: requests.Response, default: float, longest: float) -> float:
    """The server's Retry-After in seconds (capped at `longest`), else `default`."""
    value = response.headers.get("Retry-After", "")
    return min(float(value), longest) if value.strip().isdigit() else default


def _detail(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500] or response.reason
    return str(body.get("detail", body)) if isinstance(body, dict) else str(body)
