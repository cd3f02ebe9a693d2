"""The OpenAPI document tells the truth: schemathesis against the real server, offline /docs.

One real server (`python -m server`, tiny model, CPU, loopback) for the module. schemathesis
generates requests from the served /openapi.json, schema-valid and schema-invalid ones
(derandomized, MAX_EXAMPLES per operation and mode, no shrinking), and runs every built-in
check on each answer: no 5xx, status codes, content types, headers and JSON bodies as
documented, schema-invalid requests refused, schema-valid ones accepted. Random bytes are
never a valid npy or PNG, which no schema can say: fuzzed payloads may get a documented 4xx
(layer 1), while requests whose payload is swapped for a valid one must succeed (layer 2).
What it found is pinned by the tests after it.
"""
from __future__ import annotations

import base64
import re
from functools import partial
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from model.io import encode_npy, encode_png
from tests.test_server import JSON, KEY, NPY, PNG, running_server, save_tiny_checkpoint

pytestmark = pytest.mark.server

MAX_EXAMPLES = 25  # per operation and generation mode
OPERATIONS = [("POST", "/encode"), ("POST", "/decode"), ("POST", "/reconstruct"),
              ("GET", "/health"), ("GET", "/info"), ("GET", "/metrics")]
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
# schema-valid requests to every operation; schema-invalid ones where there is something to
# get wrong (the GETs take no parameters)
CASES = [(method, path, POSITIVE) for method, path in OPERATIONS] + [
    (method, path, NEGATIVE) for method, path in OPERATIONS if method == "POST"]
# Layer 1, anything the schema allows: a body valid for it ({"type": "string", "format":
# "binary"} for npy and PNG, base64 in JSON) is still random bytes, which the server answers 400
# (not a decodable npy/PNG) or 413/422 (an array of the wrong dtype, shape or size). No JSON
# Schema can say "a float32 npy of [N, 1, H, W]", so schema-valid requests may get those
# documented answers here; layer 2 holds them to a 2xx.
EXPECTED_WITH_RANDOM_BYTES = ["2xx", "400", "401", "404", "406", "413", "415", "422", "429"]
MAP = np.random.default_rng(0).random((1, 32, 32), dtype=np.float32)  # within --max-pixels 4096
VALID_BYTES = {("map", "npy"): encode_npy(MAP), ("map", "png"): encode_png(MAP[0]),
               ("latent", "npy"): encode_npy(np.zeros((3, 8, 8), np.float32)),
               ("latent", "png"): encode_png(MAP[0])}  # refused: only a schema saying so is true


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("openapi")
    save_tiny_checkpoint(root)
    env = {"RADIODIFF_TEST_KEY": KEY, "RADIODIFF_BATCH_TIMEOUT": "0.01"}
    args = ["--api-key-env", "RADIODIFF_TEST_KEY", "--max-body-mb", "1", "--max-pixels", "4096",
            "--max-batch-size", "4", "--timeout", "30"]
    with running_server(root, args, env) as (url, _, _, _):
        yield url


def _load(url: str, checks: dict) -> schemathesis.BaseSchema:
    """The served /openapi.json as schemathesis reads it; every built-in check enabled."""
    config = schemathesis.Config.from_dict({"request-timeout": 60, "checks": checks})
    return schemathesis.openapi.from_url(url + "/openapi.json", config=config)


@pytest.fixture(scope="module")
def fuzzed_schema(server_url: str) -> schemathesis.BaseSchema:
    return _load(server_url, {"positive_data_acceptance": {
        "expected-statuses": EXPECTED_WITH_RANDOM_BYTES}})


@pytest.fixture(scope="module")
def strict_schema(server_url: str) -> schemathesis.BaseSchema:
    return _load(server_url, {})


def test_the_fuzzed_operations_are_all_there_are(fuzzed_schema):
    served = [(op.ok().method.upper(), op.ok().path) for op in fuzzed_schema.get_all_operations()]
    assert sorted(served) == sorted(OPERATIONS)


def _run(strategy, check) -> None:
    """`check` on MAX_EXAMPLES generated cases: derandomized, no example database, no shrinking
    (the first failing case is reported as schemathesis found it)."""
    @given(case=strategy)
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        check(case)

    run()


def _validate(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"X-API-Key": KEY})


# schemathesis' pytest plugin (schema.parametrize / pytest.from_fixture) cannot load a schema
# from a fixture under pytest 9 (it sets Function._nodeid, gone there): its documented strategy
# API (APIOperation.as_strategy) drives hypothesis here instead.
@pytest.mark.parametrize("method,path,mode", CASES, ids=[f"{m} {p} {g.value}" for m, p, g in CASES])
def test_every_operation_behaves_as_its_openapi_says(fuzzed_schema, method, path, mode):
    _run(fuzzed_schema[path][method].as_strategy(generation_mode=mode), _validate)


def _valid_strategy(schema: schemathesis.BaseSchema, path: str):
    """Generated JSON requests whose payload is decodable and of an accepted size: a valid item
    in place of each generated `data` item (for the generated `encoding`), and ?resize= at that
    size. All else (query options, the body's shape) is generated as the schema says; the raw
    npy / PNG bodies are covered by layer 1 and tests/test_server.py."""
    takes = "latent" if path == "/decode" else "map"
    strategy = schema[path]["POST"].as_strategy().filter(lambda case: case.media_type == JSON)
    return strategy.map(partial(_with_valid_payload, takes))


def _with_valid_payload(takes: str, case: schemathesis.Case) -> schemathesis.Case:
    item = base64.b64encode(VALID_BYTES[takes, case.body["encoding"]]).decode()
    data = case.body["data"]
    case.body["data"] = [item] * len(data) if isinstance(data, list) else item
    if case.query and "resize" in case.query:
        case.query["resize"] = "32,32"
    return case


@pytest.mark.parametrize("path", ["/encode", "/decode", "/reconstruct"])
def test_schema_valid_requests_with_valid_payloads_succeed(strict_schema, path):
    _run(_valid_strategy(strict_schema, path), _validate)


# ---- what schemathesis found, pinned ---------------------------------------------------------

def test_openapi_declares_what_the_server_really_does(server_url):
    spec = requests.get(server_url + "/openapi.json", timeout=10).json()
    paths = spec["paths"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [
        requests.get(server_url + "/metrics", timeout=10).headers["content-type"]]
    for path, encodings in (("/encode", ["npy", "png"]), ("/decode", ["npy"])):
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["additionalProperties"] is False
        assert body["properties"]["encoding"]["enum"] == encodings


def test_a_wrong_method_gets_405_with_allow(server_url):
    r = requests.get(server_url + "/encode", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.headers
    assert r.json()["status"] == 405
    r = requests.post(server_url + "/health", timeout=10)
    assert r.status_code == 405 and r.headers["allow"] == "GET", r.headers


def test_seed_is_accepted_and_unused_with_mode_mean(server_url):
    maps = encode_npy(np.random.default_rng(0).random((1, 1, 32, 32), dtype=np.float32))

    def encode(params: dict) -> bytes:
        r = requests.post(server_url + "/encode", data=maps, params=params, timeout=60,
                          headers={"Content-Type": NPY, "X-API-Key": KEY})
        assert r.status_code == 200, r.text
        return r.content

    assert encode({"seed": "3"}) == encode({}) == encode({"mode": "mean", "seed": "9"})
    r = requests.post(server_url + "/encode", data=maps, params={"seed": "-1"}, timeout=60,
                      headers={"Content-Type": NPY, "X-API-Key": KEY})
    assert r.status_code == 422 and "seed" in r.json()["detail"]


# ---- /docs and /redoc without internet ------------------------------------------------------

class _Assets(HTMLParser):
    """The URLs a page loads: script src, link href, img src, and url(...) in inline code."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        wanted = {"script": "src", "link": "href", "img": "src"}.get(tag)
        self.urls += [value for name, value in attrs if name == wanted and value]

    def handle_data(self, data: str) -> None:
        self.urls += re.findall(r"""(?:url\(|["'])((?:https?:)?//[^"')\s]+)""", data)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_only_assets_the_server_serves(server_url, page):
    r = requests.get(server_url + page, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    parser = _Assets()
    parser.feed(r.text)
    assert len(parser.urls) >= 2, r.text  # the UI's script and the favicon, at least
    origin = urlsplit(server_url).netloc
    for url in parser.urls:
        absolute = urljoin(server_url + page, url)
        assert urlsplit(absolute).netloc == origin, f"{page} loads {url} from elsewhere"
        asset = requests.get(absolute, timeout=10)
        assert asset.status_code == 200 and asset.content, f"{page}: {url} -> {asset.status_code}"
    assert "/openapi.json" in r.text
