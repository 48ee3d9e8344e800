"""Prometheus metrics of the ONNX Runtime server, in a registry of their own.

Each server instance gets its own ``CollectorRegistry`` so several can live in one process
(tests); ``start_metrics_server`` exposes it on its own port, as TorchServe does on 8082,
from the server's event loop with the same read deadlines as the inference port and a
connection limit (prometheus-client's own server starts a thread per connection and never
times one out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app

if TYPE_CHECKING:
    from serving.http.protocol import SideServer

MAX_METRICS_CONNECTIONS = 16

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """The server's counters, histograms and gauge, labelled by model and version."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ["model", "version"]
        self.requests = Counter(
            "onnx_server_requests", "Inference requests answered, by model, version and HTTP "
            "status code", labels + ["code"], registry=self.registry)
        self.latency = Histogram(
            "onnx_server_request_latency_seconds", "Time from receiving an inference request "
            "to sending its answer", labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram(
            "onnx_server_queue_wait_seconds", "Time a preprocessed image waited for a batch "
            "to start", labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.preprocess = Histogram(
            "onnx_server_preprocess_seconds", "Time to decode and preprocess one image",
            labels, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.inference = Histogram(
            "onnx_server_inference_seconds", "Time the engine took for one batch", labels,
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "onnx_server_batch_size", "Images per inference batch (dynamic batching)",
            labels, buckets=BATCH_BUCKETS, registry=self.registry)
        self.variant = Gauge(
            "onnx_server_model_variant", "1 for the engine variant (engine-precision, "
            "serving.engines) each served model version runs on", labels + ["variant"],
            registry=self.registry)
        self.in_flight = Gauge(
            "onnx_server_requests_in_flight", "Inference requests received and not yet "
            "answered", registry=self.registry)


async def start_metrics_server(metrics: ServerMetrics, host: str, port: int, *,
                               header_timeout_s: float, body_timeout_s: float) -> SideServer:
    """Serve ``GET /metrics`` (Prometheus text) on ``host:port`` from the running event loop,
    with the inference port's read deadlines and at most ``MAX_METRICS_CONNECTIONS``
    connections; ``.port`` is the port, ``await .stop()`` closes it."""
    from serving.http.protocol import start_side_server

    return await start_side_server(make_asgi_app(metrics.registry), host, port,
                                   header_timeout_s=header_timeout_s,
                                   body_timeout_s=body_timeout_s,
                                   max_connections=MAX_METRICS_CONNECTIONS)
