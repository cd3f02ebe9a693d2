"""Bad input against a real replica: every answer a 4xx or a 200, never a 5xx, no worker lost,
memory bounded. Hand-made hostile payloads first, then a property-based fuzz (hypothesis) over
every endpoint, then 1 GiB bodies that must be refused early, by the replica and by nginx."""
from __future__ import annotations

import base64
import contextlib
import json
from collections import Counter

import numpy as np
import pytest
import requests
from PIL import Image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.io import encode_npy
from tests.reliability.cluster import Replica, compose_replica_env
from tests.reliability.hostile import (decompression_bomb, npy_claiming, png_claiming, png_of,
                                       stream_until_answered, zeros_1gib)

pytestmark = pytest.mark.reliability

NPY, PNG, JSON = "application/x-npy", "image/png", "application/json"
ENDPOINTS = ("/encode", "/decode", "/reconstruct")
FUZZ_EXAMPLES = 300
RSS_GROWTH_LIMIT = 256 * 2**20
BODY_LIMIT = int(float(compose_replica_env()["RADIODIFF_MAX_BODY_MB"]) * 2**20)
REFUSED_WITHIN = BODY_LIMIT + 32 * 2**20  # the limit plus what socket buffers absorb


@contextlib.contextmanager
def survives(replica: Replica, figures: list[str], label: str):
    """The replica must come out with the same processes, healthy, and without a memory jump."""
    pids, rss = replica.pids(), replica.rss()
    yield
    assert replica.healthy(), f"{replica.name} unhealthy after {label}:\n{replica.log_tail()}"
    assert replica.pids() == pids, f"{replica.name} lost or replaced a process during {label}"
    growth = replica.rss() - rss
    figures.append(f"  {replica.name} RSS {rss / 2**20:.0f} -> {replica.rss() / 2**20:.0f} MiB, "
                   f"processes unchanged ({len(pids)})")
    assert growth < RSS_GROWTH_LIMIT, f"RSS grew by {growth / 2**20:.0f} MiB during {label}"


def send(replica: Replica, endpoint: str, body: bytes, content_type: str | None = NPY,
         query: dict | None = None, accept: str | None = None) -> int:
    """POST and check the answer is not a 5xx and, if an error, JSON naming what is wrong."""
    headers = {k: v for k, v in (("Content-Type", content_type), ("Accept", accept)) if v}
    r = requests.post(replica.url + endpoint, data=body, headers=headers, params=query,
                      timeout=90)
    assert r.status_code < 500, (f"{endpoint} {headers} {query} body[:64]={body[:64]!r} -> "
                                 f"{r.status_code}: {r.text[:300]}")
    if r.status_code >= 400:
        assert r.json().get("detail"), r.text
    return r.status_code


def _map(size: int = 64, value: float = 0.5) -> np.ndarray:
    return np.full((size, size), value, np.float32)


def hostile_cases() -> dict[str, tuple]:
    """name -> (endpoint, body, content type, query, the statuses that are right)."""
    good = encode_npy(_map())
    nan, inf = _map(), _map()
    nan[3, 3], inf[5, 5] = np.nan, np.inf
    z_nan = np.zeros((3, 16, 16), np.float32)
    z_nan[0, 0, 0] = np.nan
    nested = b"[" * 100_000 + b"]" * 100_000
    gray16 = np.full((64, 64), 40000, np.uint16)
    return {
        "decompression bomb PNG (20000x20000, 8-bit)": ("/encode", decompression_bomb(), PNG,
                                                        None, {413}),
        "PNG header claiming 2^31-1 x 2^31-1": ("/reconstruct", png_claiming(2**31 - 1, 2**31 - 1),
                                                PNG, None, {413}),
        "npy header claiming 10^6 x 10^6 float32": ("/encode", npy_claiming((10**6, 10**6)), NPY,
                                                    None, {400, 413}),
        "npy header claiming 2^62 latents": ("/decode", npy_claiming((2**62,)), NPY, None,
                                             {400, 413}),
        "npy of Python objects": ("/encode", npy_claiming((2,), "|O", b"\0" * 16), NPY, None,
                                  {400}),
        "NaN in a map": ("/reconstruct", encode_npy(nan), NPY, None, {422}),
        "Inf in a map": ("/encode", encode_npy(inf), NPY, None, {422}),
        "NaN in a latent": ("/decode", encode_npy(z_nan), NPY, None, {422}),
        "float64 map": ("/encode", encode_npy(_map().astype(np.float64)), NPY, None, {422}),
        "65 maps (limit 64)": ("/encode", encode_npy(np.zeros((65, 1, 64, 64), np.float32)), NPY,
                               None, {413}),
        "resize a 64x64 map to 2^20 x 2^20": ("/encode", good, NPY,
                                              {"resize": "1048576,1048576"}, {413}),
        "JSON nested 100000 deep": ("/encode", nested, JSON, None, {400}),
        "JSON with bad base64": ("/encode", b'{"data": "%%%", "encoding": "npy"}', JSON, None,
                                 {400}),
        "RGB PNG": ("/encode", png_of(Image.new("RGB", (64, 64))), PNG, None, {400, 422}),
        "16-bit PNG (valid)": ("/reconstruct", png_of(Image.fromarray(gray16)), PNG, None,
                               {200}),
    }


def test_hostile_payloads_get_their_4xx(cluster, figures):
    replica = cluster.replicas[1]
    cases = hostile_cases()
    with survives(replica, figures, "hostile payloads"):
        for name, (endpoint, body, kind, query, expected) in cases.items():
            status = send(replica, endpoint, body, kind, query)
            if status not in expected:
                pytest.fail(f"{name}: HTTP {status}, expected {sorted(expected)}")
    figures.insert(-1, f"hostile payloads: {len(cases)} cases, each answered as expected, no 5xx")


# ---- property-based fuzz ---------------------------------------------------------------

DTYPES = ["<f4", ">f4", "<f8", "<f2", "|u1", "|i1", "<i4", "<i8", "|b1", "<c8"]
SPECIAL = [np.nan, np.inf, -np.inf, -1.0, 2.0, 1e30]


WELL_FORMED = [(64, 64), (1, 64, 64), (2, 1, 64, 64), (16, 16), (3, 16, 16), (2, 3, 16, 16)]


@st.composite
def arrays(draw) -> np.ndarray:
    """Arrays of any rank, dtype and values, now and then with NaN/Inf/out-of-range; half of
    them float32 maps or latents of a shape the model takes, so the fuzz also gets past the
    first checks."""
    if draw(st.booleans()):
        shape, dtype = draw(st.sampled_from(WELL_FORMED)), "<f4"
    else:
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 15, 16, 17, 64, 65]),
                                    max_size=5)))
        dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.random(shape)
    if x.size and draw(st.integers(0, 3)) == 0:
        x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from(SPECIAL))
    with np.errstate(all="ignore"):
        return x.astype(dtype)


@st.composite
def pngs(draw) -> bytes:
    """PNGs of several modes and sizes: most are not an 8/16-bit gray map the model accepts."""
    mode = draw(st.sampled_from(["L", "I;16", "RGB", "1", "LA", "P"]))
    h, w = draw(st.sampled_from([1, 3, 16, 63, 64])), draw(st.sampled_from([1, 4, 16, 64, 65]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "I;16":
        return png_of(Image.fromarray(rng.integers(0, 65535, (h, w), dtype=np.uint16)))
    channels = {"RGB": 3, "LA": 2}.get(mode)
    pixels = rng.integers(0, 255, (h, w, channels) if channels else (h, w), dtype=np.uint8)
    return png_of(Image.fromarray(pixels).convert(mode))


def truncated(payloads: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.tuples(payloads, st.floats(0, 1)).map(lambda p: p[0][:int(len(p[0]) * p[1])])


npy_bodies = arrays().map(encode_npy)
lying_headers = st.one_of(
    st.builds(npy_claiming, st.lists(st.integers(0, 2**40), max_size=4).map(tuple),
              st.sampled_from(["<f4", "<f8", "|u1", "|O", "<U8"]), st.binary(max_size=64)),
    st.builds(png_claiming, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1),
              st.sampled_from([1, 8, 16]), st.binary(max_size=64)))
# (body, the Content-Type that goes with it)
npy_payloads = st.one_of(npy_bodies, truncated(npy_bodies),
                         lying_headers.filter(lambda b: b.startswith(b"\x93NUMPY")))
png_payloads = st.one_of(pngs(), truncated(pngs()),
                         lying_headers.filter(lambda b: b.startswith(b"\x89PNG")))
raw_bodies = st.one_of(st.binary(max_size=2048), npy_payloads, png_payloads)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=8)
json_bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda data, enc: json.dumps({"data": data, "encoding": enc}).encode(),
              st.one_of(raw_bodies.map(_b64), st.lists(raw_bodies.map(_b64), max_size=4),
                        st.text(max_size=20)),
              st.sampled_from(["npy", "png", "jpeg", None, 3])))
typed_bodies = st.one_of(npy_bodies.map(lambda b: (b, NPY)), npy_payloads.map(lambda b: (b, NPY)),
                         png_payloads.map(lambda b: (b, PNG)),
                         json_bodies.map(lambda b: (b, JSON)),
                         st.tuples(st.binary(max_size=2048), st.sampled_from([NPY, PNG, JSON])))

QUERY_VALUES = ["mean", "sample", "true", "false", "0", "1", "8", "16", "-1", "64,64", "4,4",
                "0,0", "1,1", "65,65", "100000,4", "8192,8192", "1048576,1048576", "1e9", "",
                "\x00"]
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                    exclude_characters="\x7f"), max_size=20).map(str.strip)


def mostly_none(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """None (the plain request) 3 times in 4, so most requests reach the payload checks."""
    return st.tuples(st.integers(0, 3), strategy).map(lambda t: t[1] if t[0] == 0 else None)


cases = st.tuples(
    st.sampled_from(ENDPOINTS),
    typed_bodies,
    mostly_none(st.one_of(st.sampled_from(["application/octet-stream", "text/plain",
                                           f"{NPY}; charset=binary", "IMAGE/PNG", ""]),
                          header_text)),
    mostly_none(st.dictionaries(
        st.sampled_from(["mode", "seed", "scaled", "resize", "bits", "junk"]),
        st.one_of(st.sampled_from(QUERY_VALUES), st.text(max_size=8)), max_size=3)),
    mostly_none(st.one_of(st.sampled_from([NPY, PNG, JSON, "*/*", "image/*", "text/html",
                                           f"{JSON};q=0", ""]), header_text)),
)


def test_property_based_fuzz_of_every_endpoint(cluster, figures):
    replica, statuses = cluster.replicas[1], Counter()

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def fuzz(case):
        endpoint, (body, natural_type), other_type, query, accept = case
        content_type = natural_type if other_type is None else other_type
        statuses[send(replica, endpoint, body, content_type, query, accept)] += 1

    with survives(replica, figures, "the fuzz"):
        fuzz()
    figures.insert(-1, f"fuzz: {sum(statuses.values())} cases over {', '.join(ENDPOINTS)}; "
                       f"answers {dict(sorted(statuses.items()))}")


# ---- 1 GiB bodies ------------------------------------------------------------------------

def test_a_1_gib_body_is_refused_early(cluster, figures):
    replica, nginx = cluster.replicas[1], cluster.nginx
    targets = {"replica, chunked": (replica, None),
               "replica, Content-Length 1 GiB": (replica, 2**30),
               "nginx, chunked": (nginx, None), "nginx, Content-Length 1 GiB": (nginx, 2**30)}
    results = {}
    with survives(replica, figures, "1 GiB bodies"):
        for label, (target, declared) in targets.items():
            host, port = target.url.removeprefix("http://").split(":")
            results[label] = stream_until_answered(host, int(port), "/reconstruct",
                                                   zeros_1gib(), declared)
    figures.insert(-1, "1 GiB bodies: " + "; ".join(
        f"{label}: HTTP {status} after {sent / 2**20:.0f} MiB" for label, (status, sent)
        in results.items()))
    for label, (status, sent) in results.items():
        assert status == 413, f"{label}: HTTP {status}"
        assert sent <= REFUSED_WITHIN, f"{label}: {sent / 2**20:.0f} MiB sent before the refusal"
