"""Fuzzing the server's app in process: image bytes, headers, multipart and KServe v2 bodies.

Whatever arrives, the answer is a 200 or a 4xx with the JSON error body; never a 500, and no
exception escapes the app (the test client re-raises any).
"""

from __future__ import annotations

import base64
import io
import json
import struct

import pytest
from conftest import jpeg_bytes, make_onnx_version
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.testclient import TestClient

from serving import Predictor
from serving.http.app import create_app
from serving.http.config import ServerConfig

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def _encoded(mode: str, fmt: str, size=(24, 16), **save) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 80, 20)).convert(mode).save(buf, format=fmt, **save)
    return buf.getvalue()


SEEDS = {
    "jpeg": jpeg_bytes(40, 30),
    "progressive": _encoded("RGB", "JPEG", progressive=True),
    "png": _encoded("RGBA", "PNG"),
    "png16": _encoded("I;16", "PNG"),
    "gif": _encoded("P", "GIF"),
    "bmp": _encoded("RGB", "BMP"),
    "tiff": _encoded("CMYK", "TIFF"),
    "webp": _encoded("RGB", "WEBP"),
    "pcx": _encoded("RGB", "PCX"),
}
BASE_URL = "http://127.0.0.1"  # the server checks that Host is a loopback name
# Where each format keeps its width and height: patched to fuzz the header.
DIMENSIONS = {"png": (16, ">II"), "gif": (6, "<HH"), "bmp": (18, "<ii")}


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    return make_onnx_version(tmp_path_factory.mktemp("fuzz_artifacts"))


@pytest.fixture(scope="module")
def client(version):
    app = create_app([Predictor.load(version)],
                     ServerConfig(metrics_port=None, preprocess_threads=1, max_body_bytes=2**20))
    with TestClient(app, base_url=BASE_URL) as c:
        yield c


def assert_answered(response) -> None:
    """A 200, or a 4xx with the ``{"code", "type", "message"}`` body (never the Host check's
    403: that would mean the fuzzed request never reached the routes)."""
    status = response.status_code
    assert status == 200 or (400 <= status < 500 and status != 403), (status, response.text[:500])
    if status != 200 and response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        assert body["code"] == status and body["message"], body


def test_the_seeds_reach_the_model(client):
    """The fuzzing starts from images the server answers (so it reaches the decoder)."""
    for name, data in SEEDS.items():
        response = client.post("/predictions/food", content=data)
        assert response.status_code == (415 if name == "pcx" else 200), (name, response.text)
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(SEEDS["png"]).decode()]}]}
    assert client.post("/v2/models/food/infer", json=body).status_code == 200


@st.composite
def image_bytes(draw) -> bytes:
    """Random bytes, or a valid image of some format flipped, truncated or re-sized."""
    kind = draw(st.sampled_from(["random", "flipped", "truncated", "dimensions"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    name = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[name])
    if kind == "truncated":
        return bytes(data[:draw(st.integers(0, len(data)))])
    if kind == "dimensions" and name in DIMENSIONS:
        offset, fmt = DIMENSIONS[name]
        limit = 2**15 - 1 if fmt[1] in "Hi" else 2**31 - 1
        # small enough to decode quickly, or far over the pixel budget
        w = draw(st.integers(0, 4000) | st.sampled_from([limit, 2**14]))
        h = draw(st.integers(0, 3000))
        data[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, w, h)
        return bytes(data)
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@FUZZ
@given(data=image_bytes())
def test_any_image_bytes(client, data):
    assert_answered(client.post("/predictions/food", content=data))


header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@FUZZ
@given(topk=header_text, query=header_text, content_type=st.one_of(
    header_text, st.sampled_from(["multipart/form-data", "multipart/form-data; boundary=",
                                  "application/x-www-form-urlencoded", "application/json",
                                  "image/jpeg"])))
def test_any_headers(client, topk, query, content_type):
    response = client.post("/predictions/food", params={"topk": query} if query else None,
                           content=SEEDS["jpeg"],
                           headers={"X-TopK": topk, "Content-Type": content_type})
    assert_answered(response)


@st.composite
def multipart(draw) -> tuple[bytes, str]:
    boundary = draw(st.text("abcdefXYZ0123456789-", min_size=1, max_size=20))
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["data", "body", "file", "topk", "x"]) | header_text)
        filename = draw(st.none() | header_text)
        content = draw(st.sampled_from([SEEDS["jpeg"], b"", b"3"]) | st.binary(max_size=200))
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
                     + content + b"\r\n")
    body = b"".join(parts) + (f"--{boundary}--\r\n".encode() if draw(st.booleans()) else b"")
    if draw(st.booleans()):
        body = body[:draw(st.integers(0, len(body)))]
    declared = draw(st.sampled_from([boundary, "other", ""]))
    return body, f"multipart/form-data; boundary={declared}"


@FUZZ
@given(case=multipart())
def test_any_multipart_body(client, case):
    body, content_type = case
    assert_answered(client.post("/predictions/food", content=body,
                                headers={"Content-Type": content_type}))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=20)
IMAGE_B64 = base64.b64encode(SEEDS["jpeg"]).decode()


@st.composite
def v2_input(draw) -> dict:
    datatype = draw(st.sampled_from(["BYTES", "FP32", "INT8"]) | st.text(max_size=5))
    n = draw(st.integers(0, 10))
    shape = draw(st.sampled_from([[n], [n, 3, 32, 32], [n, 1]]) | json_values)
    data = draw(st.sampled_from([[IMAGE_B64] * n, [[IMAGE_B64]] * n, [0.5] * (n * 3072),
                                 [[0.5] * 3072] * n]) | json_values)
    entry = {"name": draw(st.sampled_from(["image", "input"]) | json_values),
             "datatype": datatype, "shape": shape, "data": data}
    if draw(st.booleans()):
        entry["parameters"] = draw(json_values | st.fixed_dictionaries(
            {"binary_data_size": st.integers(-5, 10**6) | json_values}))
    if draw(st.booleans()):
        del entry[draw(st.sampled_from(sorted(entry)))]
    return entry


@st.composite
def v2_body(draw) -> tuple[bytes, dict]:
    if draw(st.integers(0, 5)) == 0:
        body = json.dumps(draw(json_values)).encode()
    else:
        request = {"inputs": draw(st.lists(v2_input(), max_size=2) | json_values)}
        if draw(st.booleans()):
            request["outputs"] = draw(st.lists(st.fixed_dictionaries(
                {"name": st.sampled_from(["probabilities", "label", "logits"]) | header_text}),
                max_size=3) | json_values)
        if draw(st.booleans()):
            request["parameters"] = draw(json_values)
        body = json.dumps(request).encode()  # NaN and Infinity as Python writes them
    headers = {}
    if draw(st.booleans()):
        tail = draw(st.binary(max_size=64))
        length = draw(st.sampled_from([str(len(body)), "\u00b2", "-1", "", "0x10"])
                      | st.text("0123456789\u00b2\u00b3\u00b9", max_size=4))  # latin-1
        headers["Inference-Header-Content-Length"] = length
        body += tail
    return body, headers


@FUZZ
@given(case=v2_body())
def test_any_v2_body(client, case):
    body, headers = case
    raw = {k: v.encode("latin-1") for k, v in headers.items()}  # as a client's bytes
    assert_answered(client.post("/v2/models/food/infer", content=body,
                                headers={"Content-Type": "application/json", **raw}))


def test_errors_do_not_echo_the_body(tmp_path, version, client):
    from serving.feedback import FeedbackSettings

    app = create_app([Predictor.load(version)], ServerConfig(
        metrics_port=None, feedback=FeedbackSettings(f"sqlite:///{tmp_path / 'f.db'}")))
    secret = "x" * 3000
    with TestClient(app, base_url=BASE_URL) as feedback_client:
        for content_type in ("application/x-www-form-urlencoded", "text/plain"):
            response = feedback_client.post("/feedback", content=f"label={secret}",
                                            headers={"Content-Type": content_type})
            assert response.status_code == 400, response.text[:300]
            assert secret[:200] not in response.text and len(response.text) < 1000
    response = client.post("/predictions/food", content=f"data={secret}",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400 and secret[:200] not in response.text
