"""Hostile input against the real ONNX server on loopback: each budget, with a small crafted
input built here, and the server's resident memory read the way an operator reads it
(/proc/<pid>/status VmRSS). Also the TorchServe handler's share of the same budget."""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import threading
import time
import zlib
from http.client import HTTPResponse
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from conftest import jpeg_bytes, make_onnx_version
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from serving.launch import Launched, start_onnx_server

# ---------------------------------------------------------------- crafted inputs


def encoded(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def gif_screen(width: int, height: int) -> bytes:
    """A 1x1 GIF whose header claims a ``width`` x ``height`` logical screen (37 bytes)."""
    data = bytearray(encoded(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def flat_png(width: int, height: int, bit_depth: int = 8, color_type: int = 0) -> bytes:
    """A black PNG of any size, compressed row block by row block (it never exists whole)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color_type]
    row = b"\0" + bytes(width * channels * bit_depth // 8)
    per_block = max(1, (1 << 20) // len(row))
    z, parts, left = zlib.compressobj(9), [], height
    while left:
        n = min(per_block, left)
        parts.append(z.compress(row * n))
        left -= n
    parts.append(z.flush())
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))


def _jpeg_scans(data: bytes) -> tuple[list[tuple[int, int]], int]:
    """The (start, end) of every scan (SOS header + entropy-coded data), and where EOI is."""
    pos, scans = 2, []
    while data[pos + 1] != 0xD9:
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if data[pos + 1] == 0xDA:
            while True:  # entropy data runs to the next marker that is not stuffing or RST
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
            scans.append((pos, end))
        pos = end
    return scans, pos


def many_scan_jpeg(side: int, scans: int) -> bytes:
    """A grey progressive JPEG whose smallest AC scan is repeated up to ``scans`` scans:
    each repeat is a few bytes and costs a pass over the whole image."""
    data = encoded(Image.new("L", (side, side), 128), "JPEG", progressive=True, optimize=True)
    found, eoi = _jpeg_scans(data)
    start, end = min(found[1:], key=lambda s: s[1] - s[0])
    return data[:eoi] + data[start:end] * (scans - len(found)) + data[eoi:]


def many_frame_gif(frames: int) -> bytes:
    images = [Image.fromarray(np.full((4, 4), i % 251, np.uint8), "L").convert("P")
              for i in range(frames)]
    return encoded(images[0], "GIF", save_all=True, append_images=images[1:])


OTHER_FORMATS = {
    "PCX": lambda: encoded(Image.new("RGB", (16, 16)), "PCX"),
    "ICO": lambda: encoded(Image.new("RGB", (16, 16)), "ICO"),
    "PPM": lambda: encoded(Image.new("RGB", (16, 16)), "PPM"),
    "EPS": lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n",
    "FITS": lambda: (b"SIMPLE  =                    T" + b" " * 50
                     + b"BITPIX  =                    8" + b" " * 50 + b"END" + b" " * 77),
}

# ---------------------------------------------------------------- watching the server


def rss_mb(pid: int) -> float:
    """Resident memory of a process, as ``top`` shows it (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class PeakRSS:
    """The most resident memory a process added while the ``with`` block ran (polled)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.added_mb, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 - a plain class, not subclassed
        self.base = rss_mb(self.pid)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.added_mb = max(self.added_mb, rss_mb(self.pid) - self.base)
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.added_mb = max(self.added_mb, rss_mb(self.pid) - self.base)


def metric(server: Launched, family: str, sample: str) -> float:
    text = requests.get(server.metrics_url, timeout=10).text
    for f in text_string_to_metric_families(text):
        if f.name == family:
            return sum(s.value for s in f.samples if s.name == sample)
    return 0.0


def decoded_images(server: Launched) -> float:
    return metric(server, "onnx_server_preprocess_seconds", "onnx_server_preprocess_seconds_count")


def post_image(server: Launched, data: bytes) -> requests.Response:
    return requests.post(f"{server.url}/predictions/food", data=data, timeout=60)


def v2_images(images: list[bytes], **extra) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(i).decode() for i in images]}], **extra}


def post_v2(server: Launched, body: dict | bytes, headers: dict | None = None
            ) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(f"{server.url}/v2/models/food/infer", data=data, headers=headers,
                         timeout=60)


def assert_error(response: requests.Response, status: int, kind: str | None = None) -> str:
    assert response.status_code == status, response.text[:500]
    body = response.json()
    assert body["code"] == status and body["message"]
    if kind is not None:
        assert body["type"] == kind, body
    return body["message"]


# ---------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def version(tmp_path_factory) -> Path:
    return make_onnx_version(tmp_path_factory.mktemp("hostile_artifacts"))


@pytest.fixture(scope="module")
def server(version, tmp_path_factory):
    """Default budgets; one decode thread, so queued work is visible."""
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    with start_onnx_server([str(version)], log, extra_args=(
            "--preprocess-threads", "1", "--max-queue", "6", "--management-port", "0")) as s:
        yield s


@pytest.fixture(scope="module")
def strict(version, tmp_path_factory):
    """Short deadlines and small limits, to watch them act within a test's time."""
    log = tmp_path_factory.mktemp("strict") / "server.log"
    with start_onnx_server([str(version)], log, extra_args=(
            "--preprocess-threads", "1", "--max-queue", "2", "--decode-timeout-s", "0.2",
            "--header-timeout-s", "1", "--body-timeout-s", "5", "--max-connections", "8",
            "--timeout-s", "3", "--management-port", "0")) as s:
        yield s


def assert_log_clean(server: Launched) -> None:
    text = server.log_path.read_text()
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-3000:]


# ---------------------------------------------------------------- the decode budget


@pytest.mark.parametrize("fmt", list(OTHER_FORMATS))
def test_formats_outside_the_allowlist_are_415(server, fmt):
    message = assert_error(post_image(server, OTHER_FORMATS[fmt]()), 415,
                           "UnsupportedImageFormat")
    assert fmt in message and "JPEG, PNG, WebP, BMP, GIF or TIFF" in message
    assert_error(post_image(server, b"plain text, not a photo"), 400, "InvalidImage")


def test_gif_logical_screen_costs_one_rgb_copy_not_four(server):
    data = gif_screen(7071, 7071)  # 37 bytes, 50 MP screen: inside the default budget
    with PeakRSS(server.proc.pid) as rss:
        response = post_image(server, data)
    assert response.status_code == 200, response.text
    assert rss.added_mb < 450, rss.added_mb  # was ~1000 MB: P -> RGBA -> composite -> RGB


def test_pixels_over_the_budget_are_413_before_decoding(server):
    data = flat_png(8000, 7000)  # 56 MP in ~60 KB
    with PeakRSS(server.proc.pid) as rss:
        message = assert_error(post_image(server, data), 413, "ImageTooLarge")
    assert "8000x7000" in message and "50000000" in message
    assert rss.added_mb < 60, rss.added_mb


def test_gif_screen_over_the_budget_is_413(server):
    message = assert_error(post_image(server, gif_screen(10000, 10000)), 413, "ImageTooLarge")
    assert "10000x10000" in message


def test_sixteen_bit_png_converts_in_strips(server):
    data = flat_png(7000, 7000, bit_depth=16)  # 49 MP, 16-bit grey, ~100 KB
    with PeakRSS(server.proc.pid) as rss:
        response = post_image(server, data)
    assert response.status_code == 200, response.text
    assert rss.added_mb < 500, rss.added_mb  # was ~1200 MB through a float64 copy


def test_progressive_jpeg_with_too_many_scans_is_413(server):
    data = many_scan_jpeg(1024, 600)
    message = assert_error(post_image(server, data), 413, "ImageTooLarge")
    assert "scans" in message and "500" in message
    assert post_image(server, many_scan_jpeg(64, 20)).status_code == 200


def test_thin_image_is_cropped_before_the_resize(server):
    data = flat_png(1, 200_000, color_type=2)  # short side 1: the resize would be 40 x 8M
    with PeakRSS(server.proc.pid) as rss:
        response = post_image(server, data)
    assert response.status_code == 200, response.text
    assert rss.added_mb < 150, rss.added_mb  # was ~1500 MB


def test_more_than_32_bits_per_pixel_is_415(server):
    data = encoded(Image.fromarray(np.zeros((64, 64), np.float32), "F"), "TIFF")
    assert "'F'" in assert_error(post_image(server, data), 415, "UnsupportedImageMode")


def test_only_the_first_frame_is_decoded(server):
    assert post_image(server, many_frame_gif(300)).status_code == 200


def test_a_decode_past_its_time_is_abandoned_with_413(strict):
    data = many_scan_jpeg(4096, 480)  # within the scan limit, about half a second to decode
    message = assert_error(post_image(strict, data), 413, "DecodeTimeout")
    assert "0.2s" in message
    assert post_image(strict, jpeg_bytes()).status_code == 200


# ---------------------------------------------------------------- KServe v2 at the edge


def test_v2_more_images_than_max_batch_size_is_400_before_any_decode(server):
    before = decoded_images(server)
    message = assert_error(post_v2(server, v2_images([jpeg_bytes()] * 2000)), 400,
                           "InvalidInferenceRequest")
    assert "2000 images" in message and "max_batch_size" in message
    assert decoded_images(server) == before


def test_v2_200000_empty_elements_are_400_at_once(server):
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [200_000],
                        "data": [""] * 200_000}]}
    before = decoded_images(server)
    with PeakRSS(server.proc.pid) as rss:
        assert_error(post_v2(server, body), 400, "InvalidInferenceRequest")
    assert decoded_images(server) == before
    assert rss.added_mb < 150, rss.added_mb  # was ~860 MB


@pytest.mark.parametrize("shape,count", [([3], 1), ([1], 2), ([2, 1], 1)])
def test_v2_shape_must_agree_with_the_data(server, shape, count):
    body = v2_images([jpeg_bytes()] * count)
    body["inputs"][0]["shape"] = shape
    assert "shape" in assert_error(post_v2(server, body), 400)


FP32_DATA = [0.0] * (3 * 32 * 32)
MALFORMED = {
    "deep nesting": (b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], '
                     b'"data": ' + b"[" * 5000 + b"]" * 5000 + b"}]}", None, "body"),
    "shallow nesting past the shape": (
        json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "data": [[[["eA=="]]]]}]}).encode(), None, "inputs.0.data"),
    "shape Infinity": ((b'{"inputs": [{"name": "input", "datatype": "FP32", '
                        b'"shape": [Infinity], "data": [1.0]}]}'), None, "inputs.0.shape"),
    "negative shape": (json.dumps({"inputs": [{"name": "input", "datatype": "FP32",
                                               "shape": [-1, 3, 32, 32],
                                               "data": FP32_DATA}]}).encode(), None,
                       "inputs.0.shape"),
    "parameters as a list": (
        json.dumps({**v2_images([jpeg_bytes()]), "parameters": [1, 2]}).encode(), None,
        "parameters"),
    "outputs: 5": (json.dumps({**v2_images([jpeg_bytes()]), "outputs": 5}).encode(), None,
                   "outputs"),
    "unknown output": (
        json.dumps({**v2_images([jpeg_bytes()]), "outputs": [{"name": "x"}]}).encode(),
        None, "outputs.0.name"),
    "Unicode digit header length": (json.dumps(v2_images([jpeg_bytes()])).encode(),
                                    {"Inference-Header-Content-Length": "\u00b2"},
                                    "Inference-Header-Content-Length"),
    "binary size past the body": (
        json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "parameters": {"binary_data_size": 99}}]}).encode(), "tail",
        "binary_data_size"),
    "datatype": (json.dumps({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1],
                                         "data": [1]}]}).encode(), None, "inputs.0.datatype"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_v2_malformed_fields_are_400_naming_the_field(server, case):
    body, headers, field = MALFORMED[case]
    if headers == "tail":
        headers, body = {"Inference-Header-Content-Length": str(len(body))}, body + b"\0" * 8
    before = decoded_images(server)
    message = assert_error(post_v2(server, body, headers), 400, "InvalidInferenceRequest")
    assert field in message, message
    assert decoded_images(server) == before  # refused before any image was decoded


def test_v2_images_take_one_admission_slot_each(server):
    message = assert_error(post_v2(server, v2_images([jpeg_bytes()] * 7)), 503,
                           "ServiceUnavailableException")  # max_queue=6, max_batch_size=8
    assert "max_queue=6" in message
    assert post_v2(server, v2_images([jpeg_bytes()] * 6)).status_code == 200


def slow_jpeg(seed: int) -> bytes:
    """A noisy 2000 x 1500 JPEG: tens of milliseconds to decode."""
    return jpeg_bytes(2000, 1500, seed=seed)


def test_v2_one_bad_image_cancels_the_others(server):
    before = decoded_images(server)
    images = [b"not an image"] + [slow_jpeg(i) for i in range(5)]
    assert_error(post_v2(server, v2_images(images)), 400, "InvalidImage")
    time.sleep(2)  # any image still decoding would be counted by now
    assert decoded_images(server) - before <= 1  # all 5 decoded before


def test_v2_answers_the_graph_output_and_lists_it(server, version):
    from serving import Predictor

    predictor = Predictor.load(version)
    images = [jpeg_bytes(50, 40, seed=s) for s in range(3)]
    answer = post_v2(server, v2_images(images, outputs=[{"name": "logits"}])).json()
    [out] = answer["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [3, 3]
    want = predictor.infer(np.stack([predictor.decode(i) for i in images]))
    assert np.allclose(np.reshape(out["data"], (3, 3)), want, atol=1e-4)
    metadata = requests.get(f"{server.url}/v2/models/food", timeout=10).json()
    assert {"name": "logits", "datatype": "FP32", "shape": [-1, 3]} in metadata["outputs"]


def raw_request(port: int, path: str, body: bytes, sent: int | None = None,
                headers: str = "Content-Type: application/octet-stream\r\n") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
              f"{headers}\r\n".encode() + body[:sent])
    return s


def test_a_client_that_leaves_has_its_queued_work_dropped(server):
    before = decoded_images(server)
    body = json.dumps(v2_images([slow_jpeg(10 + i) for i in range(6)])).encode()
    s = raw_request(server.port, "/v2/models/food/infer", body,
                    headers="Content-Type: application/json\r\n")
    time.sleep(0.05)
    s.close()  # the whole body sent, then gone
    time.sleep(3)
    assert decoded_images(server) - before <= 2  # all 6 decoded before
    records = [json.loads(line.split("serving.access ", 1)[1])
               for line in server.log_path.read_text().splitlines() if "serving.access" in line]
    assert any(r["status"] == 499 and r["path"] == "/v2/models/food/infer" for r in records)
    assert_log_clean(server)


# ---------------------------------------------------------------- slow clients


def test_trickling_uploads_hold_no_queue_slot(strict):
    image = jpeg_bytes()
    trickles = [raw_request(strict.port, "/predictions/food", image, 10) for _ in range(4)]
    try:
        time.sleep(0.3)  # max_queue=2: before, the first two took both slots
        for _ in range(3):
            assert post_image(strict, image).status_code == 200
    finally:
        for s in trickles:
            s.close()


def closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("payload", [
    b"",
    b"POST /predictions/food HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    b"POST /predictions/food HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\nab",
    b"POST /predictions/nosuchmodel HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n\r\n",
], ids=["silent", "unfinished headers", "unfinished body", "body after an early 404"])
def test_connections_that_do_not_deliver_are_closed(strict, payload):
    s = socket.create_connection(("127.0.0.1", strict.port))
    try:
        s.sendall(payload)
        assert closed_within(s, 15)  # header deadline 1 s, body deadline 5 s
    finally:
        s.close()
    assert "not received within" in strict.log_path.read_text()


def test_a_body_still_arriving_at_the_request_timeout_is_408(strict):
    s = raw_request(strict.port, "/predictions/food", jpeg_bytes(), 10)
    try:
        response = HTTPResponse(s)
        response.begin()  # the request timeout (3 s) passes before the body deadline (5 s)
        assert response.status == 408
        assert json.loads(response.read())["type"] == "RequestTimeout"
    finally:
        s.close()


def test_connection_limit_answers_503(strict):
    idle = [socket.create_connection(("127.0.0.1", strict.port)) for _ in range(8)]
    try:
        assert post_image(strict, jpeg_bytes()).status_code == 503
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert post_image(strict, jpeg_bytes()).status_code == 200


def test_metrics_listener_has_the_same_deadlines_and_a_limit(strict):
    port = urlsplit(strict.metrics_url).port
    silent = socket.create_connection(("127.0.0.1", port))
    try:
        assert closed_within(silent, 15)
    finally:
        silent.close()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(16)]
    try:
        assert requests.get(strict.metrics_url, timeout=10).status_code == 503
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert requests.get(strict.metrics_url, timeout=10).status_code == 200


def test_a_disconnect_mid_upload_is_logged_as_such(strict):
    s = raw_request(strict.port, "/predictions/food", jpeg_bytes(), 100)
    time.sleep(0.3)
    s.close()
    time.sleep(0.5)
    records = [json.loads(line.split("serving.access ", 1)[1])
               for line in strict.log_path.read_text().splitlines() if "serving.access" in line]
    assert any(r["status"] == 499 for r in records), records
    assert_log_clean(strict)


# ---------------------------------------------------------------- the TorchServe handler


def handler_context(version: Path, batch: int, handler_config: dict, workers: int = 1):
    from ts.context import Context, RequestProcessor

    context = Context("food", str(version), {"model": {"serializedFile": "model.onnx"}},
                      batch, None, "0.12.0",
                      model_yaml_config={"maxWorkers": workers, "handler": handler_config})
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    return context


def test_handler_applies_the_budget_and_answers_each_request_alone(version, monkeypatch):
    from handlers.food_handler import FoodHandler

    handler = FoodHandler()
    handler.initialize(handler_context(version, 1, {"max_pixels": 1_000_000}))
    good = jpeg_bytes()
    boom = b"\x89PNG raise"
    decode = handler.predictor.decode
    monkeypatch.setattr(handler.predictor, "decode", lambda data: (
        (_ for _ in ()).throw(RuntimeError("a bug")) if data == boom else decode(data)))
    data = [{"body": good}, {"body": gif_screen(2000, 2000)}, {"body": OTHER_FORMATS["PCX"]()},
            {"body": many_scan_jpeg(64, 600)}, {"body": boom}, {"body": good}]
    context = handler_context(version, len(data), {})
    answers = handler.handle(data, context)
    statuses = [context.get_response_status(i)[0] for i in range(len(data))]
    assert statuses == [200, 413, 415, 413, 500, 200]
    assert json.loads(answers[4])["type"] == "InternalServerException"
    assert json.loads(answers[0]) == json.loads(answers[5])


def test_handler_inference_failure_answers_each_request_with_500(version, monkeypatch):
    from handlers.food_handler import FoodHandler

    handler = FoodHandler()
    handler.initialize(handler_context(version, 1, {}))
    monkeypatch.setattr(handler.predictor, "infer", lambda batch: 1 / 0)
    data = [{"body": jpeg_bytes()}, {"body": b"junk"}, {"body": jpeg_bytes(seed=2)}]
    context = handler_context(version, len(data), {})
    answers = handler.handle(data, context)
    assert [context.get_response_status(i)[0] for i in range(3)] == [500, 400, 500]
    assert all(json.loads(a)["code"] == s for a, s in zip(answers, (500, 400, 500)))


def test_handler_threads_follow_affinity_and_cgroup_quota(version, monkeypatch):
    import serving.predictor
    from handlers.food_handler import FoodHandler

    monkeypatch.setattr(serving.predictor.os, "sched_getaffinity", lambda pid: set(range(8)),
                        raising=False)
    monkeypatch.setattr(serving.predictor, "cgroup_cpu_quota", lambda: 2.5)
    assert serving.predictor.default_threads() == 3
    handler = FoodHandler()
    handler.initialize(handler_context(version, 1, {}, workers=3))
    assert handler.predictor.threads == 1
    monkeypatch.setattr(serving.predictor, "cgroup_cpu_quota", lambda: None)
    handler.initialize(handler_context(version, 1, {}, workers=2))
    assert handler.predictor.threads == 4
