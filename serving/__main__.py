"""``python -m serving --model artifacts/food/latest``: the ONNX Runtime fallback server."""

from __future__ import annotations

import argparse
import logging
import sys

from serving.preprocess import DEFAULT_MAX_PIXELS

DEFAULTS_HELP = "(default: %(default)s)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve model versions through ONNX Runtime with TorchServe's inference API "
                    "(POST /predictions/<model>[/<version>]) and KServe v2 (/v2/...).")
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]PATH",
                   help="a version directory (artifacts/food/latest), a .mar built with "
                        "--format onnx, or an MLflow URI (models:/food-classifier@champion); "
                        "repeat to serve several models or versions. NAME overrides the "
                        "name in model_config.json. The newest version of a name is its "
                        "default.")
    p.add_argument("--host", default="127.0.0.1", help=f"interface to listen on {DEFAULTS_HELP}")
    p.add_argument("--port", type=int, default=8080, help=f"inference port {DEFAULTS_HELP}")
    p.add_argument("--metrics-port", type=int, default=8082,
                   help=f"Prometheus /metrics port, 0 to disable {DEFAULTS_HELP}")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help=f"most images per ONNX batch {DEFAULTS_HELP}")
    p.add_argument("--max-batch-delay-ms", type=float, default=5.0,
                   help=f"longest wait for a batch to fill while more requests are being "
                        f"preprocessed; a lone request never waits {DEFAULTS_HELP}")
    p.add_argument("--max-queue", type=int, default=64,
                   help=f"requests admitted per model version before answering 503 "
                        f"{DEFAULTS_HELP}")
    p.add_argument("--max-body-mb", type=float, default=20.0,
                   help=f"largest request body, 413 beyond {DEFAULTS_HELP}")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest decoded image (width x height), 413 beyond {DEFAULTS_HELP}")
    p.add_argument("--timeout-s", type=float, default=30.0,
                   help=f"per-request timeout, 504 beyond {DEFAULTS_HELP}")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads (default: model_config.json's "
                        "intra_op_threads, else the CPU count)")
    p.add_argument("--preprocess-threads", type=int, default=None,
                   help="threads decoding and preprocessing images (default: CPU count)")
    p.add_argument("--spinning", action="store_true",
                   help="let ONNX Runtime threads spin while idle (lower latency when ORT has "
                        "the cores to itself; off by default because decoding shares them)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import uvicorn

    from serving.predictor import Predictor, default_threads
    from serving.server import ServerConfig, create_app

    predictors = []
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or ":" in name:
            name, path = "", spec
        try:
            predictor = Predictor.load(path, intra_op_threads=args.threads,
                                       allow_spinning=args.spinning,
                                       max_pixels=args.max_pixels)
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"error: --model {spec}: {e}", file=sys.stderr)
            return 2
        if name:
            predictor.name = name
        predictors.append(predictor)

    config = ServerConfig(
        max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
        max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        max_pixels=args.max_pixels, request_timeout_s=args.timeout_s,
        preprocess_threads=args.preprocess_threads or default_threads(),
        metrics_host=args.host, metrics_port=args.metrics_port or None)
    try:
        app = create_app(predictors, config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in predictors:
        print(f"serving {p.name} v{p.version} from {p.source}: "
              f"http://{args.host}:{args.port}/predictions/{p.name}", file=sys.stderr)
    # uvicorn finishes in-flight requests on SIGTERM/SIGINT, then runs the app's shutdown,
    # which lets the batchers drain.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=False, timeout_graceful_shutdown=int(args.timeout_s) + 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
