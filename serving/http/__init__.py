"""The fallback HTTP server: TorchServe's inference API and KServe v2 over ONNX Runtime.

``app.py`` builds the FastAPI app (lifespan, the one error mapping); ``dataplane.py`` is the
protocol-free path of a request (model table, admission, timeout, batching, metrics, access
log); ``torchserve_api.py`` and ``kserve_v2.py`` are thin routers, one per protocol.
"""
