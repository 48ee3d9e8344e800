"""Our ONNX model and preprocessing behind LitServe with its dynamic batching, for the
serving benchmark:

    PYTHONPATH=<repo> python benchmarks/peer_servers/litserve_server.py \\
        --model artifacts/food/latest --threads 2 --port 8000

``POST /predict`` takes the image as multipart field ``data`` (LitServe hands a form to
``decode_request``; it has no raw-body input) and answers the top-k JSON our servers send.
The Predictor's stages map one to one onto LitAPI's: decode_request -> decode, batch ->
stack, predict -> infer, unbatch -> rows, encode_response -> encode.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import litserve as ls
import numpy as np

from serving.predictor import Predictor, to_json

log = logging.getLogger("litserve_server")


class FoodAPI(ls.LitAPI):
    """One model version's stages as a LitAPI; the model loads in the inference worker."""

    def __init__(self, model: Path, threads: int, **options) -> None:
        super().__init__(**options)
        self.model, self.threads = model, threads

    def setup(self, device: str) -> None:
        self.predictor = Predictor.load(self.model, intra_op_threads=self.threads,
                                        allow_spinning=False)
        self.topk = self.predictor.default_topk

    def decode_request(self, request) -> np.ndarray:
        return self.predictor.decode(request["data"].file.read())  # the uploaded file

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.predictor.infer(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> list[dict]:
        return json.loads(to_json(self.predictor.encode(output, self.topk)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model version directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, required=True, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-timeout-s", type=float, default=0.005)
    p.add_argument("--workers", type=int, default=1, help="inference workers (processes)")
    p.add_argument("--api-servers", type=int, default=1, help="HTTP server processes")
    p.add_argument("--fast-queue", action="store_true", help="ZeroMQ between the processes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    api = FoodAPI(args.model, max(1, args.threads // args.workers),
                  max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout_s)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=args.workers,
                          fast_queue=args.fast_queue)
    server.run(host=args.host, port=args.port, num_api_servers=args.api_servers,
               generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
