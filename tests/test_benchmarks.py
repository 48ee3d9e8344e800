"""The benchmark harness on a tiny model with short runs: valid reports, counted errors, and a
failing server showing up as errors, never as fast answers. No test asserts a latency."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import bench_serving, loadgen, report
from benchmarks.timing import measure, median_spread, summarize
from serving import engines
from serving.launch import free_port


# ------------------------------------------------------------------ statistics
@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=10, allow_nan=False), min_size=1,
                max_size=200))
def test_summarize_percentiles_are_ordered_and_bounded(values):
    s = summarize(values)
    assert s["n"] == len(values)
    assert min(values) * 1000 - 1e-3 <= s["p50_ms"] <= s["p90_ms"] <= s["p95_ms"] \
        <= s["p99_ms"] <= max(values) * 1000 + 1e-3


def test_summarize_known_values_and_empty():
    s = summarize([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert s["p50_ms"] == pytest.approx(50.5)
    assert s["p99_ms"] == pytest.approx(99.01)
    assert summarize([])["p50_ms"] is None and summarize([])["n"] == 0


def test_median_spread_and_measure_count_calls():
    assert median_spread([3.0, 1.0, 2.0, None]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    calls = []
    result = measure(lambda: calls.append(1), items_per_call=4, warmup=2, iters=5, repeats=3)
    assert len(calls) == 2 + 15 and result["calls"] == 15 and result["repeats"] == 3
    assert result["items_per_s"] > 0


# ------------------------------------------------------------------ servers that misbehave
class _Failing(BaseHTTPRequestHandler):
    """Answers every POST at once: 500 (status mode) or 200 with a non-JSON body."""

    mode = "500"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"code": 500}' if self.mode == "500" else b"<html>oops</html>"
        self.send_response(500 if self.mode == "500" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(params=["500", "garbage"])
def failing_server(request):
    handler = type("Handler", (_Failing,), {"mode": request.param})
    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/predictions/food", request.param
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_failing_server_counts_as_errors_not_fast_answers(failing_server, sample_images):
    url, mode = failing_server
    result = bench_serving.loadgen(url, sample_images[:2], "closed", duration=1.0,
                                   concurrency=4, warmup=1)
    assert result["sent"] > 0
    assert result["ok"] == 0 and result["errors"] == result["sent"]
    expected = "http_500" if mode == "500" else "bad_body"
    assert result["error_kinds"] == {expected: result["sent"]}
    assert result["rps"] == 0 and result["p50_ms"] is None


def test_harness_reports_failing_server_without_open_loop(failing_server, sample_images):
    url, _ = failing_server
    out = bench_serving.load_server("broken", url, sample_images[:2], concurrencies=(1, 4),
                                    duration=0.5)
    assert [r["concurrency"] for r in out["closed"]] == [1, 4]
    assert all(r["errors"] > 0 and r["ok"] == 0 for r in out["closed"])
    assert out["open"] == [] and out["max_rate_p99_under_100ms"] is None


def test_nothing_listening_is_counted_as_connection_errors(sample_images):
    url = f"http://127.0.0.1:{free_port()}/predictions/food"
    result = loadgen.run(url, sample_images[:1], "open", rate=20, duration=0.5, timeout=5)
    assert result["sent"] > 0 and result["ok"] == 0 and result["errors"] == result["sent"]


def test_loadgen_refuses_non_loopback_targets(sample_images):
    with pytest.raises(ValueError, match="loopback"):
        loadgen.run("http://example.com/predictions/food", sample_images[:1], "closed",
                    duration=0.1)
    rc = loadgen.main(["--url", "http://10.0.0.1:9/x", "--image", str(sample_images[0])])
    assert rc == 2


# ------------------------------------------------------------------ the real server, tiny model
@pytest.mark.integration
def test_run_against_our_server_writes_json_table_and_plot(onnx_version, sample_images,
                                                            tmp_path):
    not_an_image = tmp_path / "not-an-image.txt"
    not_an_image.write_text("this is not a JPEG")
    with bench_serving.start("onnx-server-fp32", onnx_version, tmp_path, threads=1,
                             max_batch_size=4) as server:
        measured = bench_serving.load_server("onnx-server-fp32", server.url,
                                             sample_images[:3], server.settings,
                                             concurrencies=(1, 4), duration=0.7,
                                             open_fractions=(0.3, 0.6), repeats=2,
                                             metrics_url=server.metrics_url)
        bad = bench_serving.loadgen(server.url, [not_an_image], "closed", duration=0.5,
                                    concurrency=2, warmup=1)
    closed = measured["closed"]
    assert [r["concurrency"] for r in closed] == [1, 4]
    assert all(r["ok"] > 0 and r["errors"] == 0 and r["p50_ms"] > 0 for r in closed)
    # each point is the median of its runs, every run kept
    assert all(len(r["runs"]) == 2 and r["rps"] == pytest.approx(
        sum(run["rps"] for run in r["runs"]) / 2, abs=0.01) for r in closed)
    assert all(1 <= r["mean_batch"] <= 4 for r in closed)  # from the server's /metrics
    assert server.settings["variant_running"] == "onnxruntime-fp32"
    assert measured["open"] and all("rate" in r for r in measured["open"])
    # a bad image is a 4xx from the server and an error for the harness
    assert bad["ok"] == 0 and set(bad["error_kinds"]) == {"http_400"}

    section = {"model": "tiny", "image": "tiny", "threads": 1, "servers": [
        measured, {"name": "torchserve-stock", "error": "not started", "closed": [],
                   "open": [], "max_rate_p99_under_100ms": None}],
        "ceiling": {"fp32": bench_serving.ceiling(onnx_version, sample_images[:3], cores=1,
                                                  batches=(1, 4))}}
    paths = report.write_run({"serving": section}, tmp_path / "results", quick=True)
    data = json.loads(paths["json"].read_text())
    assert data["machine"]["cores"] >= 1 and data["machine"]["versions"]["onnxruntime"]
    assert data["serving"]["servers"][0]["closed"][0]["ok"] == closed[0]["ok"]
    by_name = {t["target"]: t for t in data["targets"]}
    assert by_name["our server (fp32) vs stock TorchServe, 16 clients"]["met"] is None
    ceiling = data["serving"]["ceiling"]["fp32"]
    assert ceiling["variant"] == "onnxruntime-fp32" and ceiling["preprocess_core_ms"] > 0
    one, four = ceiling["per_batch"]["1"], ceiling["per_batch"]["4"]
    # 1 core: images/s = 1000 / (preprocess + inference core-ms per image)
    assert one["images_per_s"] == pytest.approx(
        1000 / (ceiling["preprocess_core_ms"] + one["inference_core_ms_per_image"]), rel=0.01)
    assert report.ceiling_at(ceiling, 5.2) == four["images_per_s"]
    assert report.ceiling_at(ceiling, 2.0) == one["images_per_s"]
    md = paths["md"].read_text()
    assert "### Closed loop" in md and "| onnx-server-fp32 | 4 |" in md
    assert "FAILED: not started" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_server_that_dies_at_startup_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="exited"), \
            bench_serving.start("onnx-server-fp32", tmp_path / "missing", tmp_path, threads=1):
        pass


def test_engines_rows_for_a_tiny_exported_version(tiny_version, sample_images, tmp_path):
    import shutil

    from benchmarks import bench_engines
    from training.export import export_version

    version = tmp_path / "v1"
    shutil.copytree(tiny_version, version, symlinks=True)  # keep an export link a link
    export_version(version, images=sample_images, quantize="int8", min_agreement=0.0)
    rows = bench_engines.bench_engines({"mobilenet_v2": version}, sample_images[:2],
                                       threads=1, quick=True)
    runnable = [e for e in bench_engines.ENGINES
                if e not in engines.BY_NAME or not engines.unavailable(engines.BY_NAME[e])]
    assert {(r["engine"], r["batch"]) for r in rows} == {
        (e, b) for e in runnable for b in bench_engines.BATCH_SIZES}
    assert all(r["items_per_s"] > 0 and r["calls"] >= 3 for r in rows)
    result = {"timestamp": "t", "mode": "quick", "machine": report.machine(),
              "load_average": {"before": [0.0], "after": [0.0]},
              "engines": {"threads": 1, "archs": ["mobilenet_v2"], "rows": rows,
                          "preprocess": [],
                          "variant_agreement": {"measured": False, "why": "tiny"}}}
    targets = {t["target"]: t for t in report.targets(result)}
    best = targets["best variant vs ONNX Runtime fp32 in process, batch 8 (mobilenet_v2)"]
    fp32 = next(r for r in rows if r["engine"] == "onnxruntime-fp32" and r["batch"] == 8)
    fastest = max((r for r in rows if r["batch"] == 8 and "-" in r["engine"]
                   and r["engine"] != "onnxruntime-fp32"), key=lambda r: r["items_per_s"])
    assert best["measured"] == pytest.approx(fastest["items_per_s"] / fp32["items_per_s"],
                                             rel=1e-2)
    assert fastest["engine"] in best["detail"]
    assert "| mobilenet_v2 | onnxruntime-int8 | 8 |" in report.markdown(result)
    ratio = best["measured"]
    assert np.isfinite(ratio)
