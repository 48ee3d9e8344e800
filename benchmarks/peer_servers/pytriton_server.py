"""Our ONNX model and preprocessing behind PyTriton (Triton's C++ HTTP front end and dynamic
batcher), for the serving benchmark:

    PYTHONPATH=<repo> <pytriton venv>/bin/python benchmarks/peer_servers/pytriton_server.py \\
        --model artifacts/food/latest --threads 2 --http-port 8000 --grpc-port 8001 \\
        --metrics-port 8002

Runs from its own virtualenv (PyTriton pins numpy<2) and imports only the torch-free
``serving`` package. The model ``food`` takes one BYTES input ``image`` (an encoded image file
per request, shape [1] after the batch dimension) and answers one BYTES output
``predictions``: the top-k JSON text our servers send, so both answers carry the same work.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from serving.predictor import Predictor, to_json

log = logging.getLogger("pytriton_server")


def make_infer(predictor: Predictor, topk: int):
    """The batched inference callable: decode each image, one ONNX run, encode each row."""

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        arrays = np.stack([predictor.decode(bytes(item[0])) for item in image])
        logits = predictor.infer(arrays)
        answers = [to_json(predictor.encode(row, topk)).encode() for row in logits]
        return {"predictions": np.array(answers, dtype=np.object_).reshape(-1, 1)}

    return infer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model version directory")
    p.add_argument("--name", default="food", help="model name in the URL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--threads", type=int, required=True,
                   help="ONNX Runtime intra-op threads, split over the instances")
    p.add_argument("--instances", type=int, default=1, help="model instances")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-queue-delay-us", type=int, default=0,
                   help="dynamic batcher's max_queue_delay_microseconds")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    per_instance = max(1, args.threads // args.instances)
    predictors = [Predictor.load(args.model, intra_op_threads=per_instance,
                                 allow_spinning=False) for _ in range(args.instances)]
    topk = predictors[0].default_topk
    config = TritonConfig(http_address=args.host, http_port=args.http_port,
                          grpc_address=args.host, grpc_port=args.grpc_port,
                          metrics_address=args.host, metrics_port=args.metrics_port,
                          allow_gpu_metrics=False, exit_on_error=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through Triton's __exit__
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=[make_infer(p, topk) for p in predictors],
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="predictions", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch_size,
                               batcher=DynamicBatcher(
                                   max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=True,
        )
        log.info("serving %s on http://%s:%d", args.name, args.host, args.http_port)
        triton.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
