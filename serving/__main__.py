"""``python -m serving --model artifacts/food/latest``: the ONNX Runtime fallback server."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from serving import engines
from serving.preprocess import DEFAULT_MAX_PIXELS

DEFAULTS_HELP = "(default: %(default)s)"


def _default(field: str) -> object:
    """ServerConfig's default for ``field``, so the CLI never restates it."""
    from serving.http.config import ServerConfig

    f = next(f for f in dataclasses.fields(ServerConfig) if f.name == field)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m serving``; defaults come from ServerConfig."""
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
    p.add_argument("--host", default=_default("host"),
                   help=f"interface to listen on {DEFAULTS_HELP}")
    p.add_argument("--port", type=int, default=_default("port"),
                   help=f"inference port {DEFAULTS_HELP}")
    p.add_argument("--metrics-port", type=int, default=_default("metrics_port"),
                   help=f"Prometheus /metrics port, 0 to disable {DEFAULTS_HELP}")
    p.add_argument("--max-batch-size", type=int, default=_default("max_batch_size"),
                   help=f"most images per ONNX batch {DEFAULTS_HELP}")
    p.add_argument("--max-batch-delay-ms", type=float, default=_default("max_batch_delay_ms"),
                   help=f"longest wait for a batch to fill while more requests are being "
                        f"preprocessed; a lone request never waits {DEFAULTS_HELP}")
    p.add_argument("--max-queue", type=int, default=_default("max_queue"),
                   help=f"requests admitted per model version before answering 503 "
                        f"{DEFAULTS_HELP}")
    p.add_argument("--max-body-mb", type=float, default=_default("max_body_bytes") / 2**20,
                   help=f"largest request body, 413 beyond {DEFAULTS_HELP}")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"largest decoded image (width x height), 413 beyond {DEFAULTS_HELP}")
    p.add_argument("--timeout-s", type=float, default=_default("request_timeout_s"),
                   help=f"per-request timeout, 504 beyond {DEFAULTS_HELP}")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads (default: model_config.json's "
                        "intra_op_threads, else the CPU count)")
    p.add_argument("--preprocess-threads", type=int, default=_default("preprocess_threads"),
                   help=f"threads decoding and preprocessing images, the CPU count unless "
                        f"given {DEFAULTS_HELP}")
    p.add_argument("--engine", choices=("auto", *engines.ENGINES), default=_default("engine"),
                   help="engine running the model (default auto: the fastest variant that "
                        "`python -m training export --variants` validated and this machine "
                        "can run)")
    p.add_argument("--precision", choices=("auto", *engines.PRECISIONS),
                   default=_default("precision"),
                   help="precision of that engine (default auto, as --engine); fp32 with "
                        "onnxruntime is always allowed")
    p.add_argument("--streams", type=int, default=_default("streams"),
                   help="batches run at once per model, each on threads/streams threads "
                        "(default %(default)s: one batch on all threads, as measured)")
    p.add_argument("--jpeg-draft", type=int, default=None, metavar="FACTOR",
                   help="decode JPEGs in draft mode (libjpeg's reduced DCT) down to FACTOR "
                        "x the resize size: 2-6x faster on phone photos, not bit-identical "
                        "to a full decode; off by default (benchmarks/README.md says why)")
    p.add_argument("--spinning", action="store_true",
                   help="let ONNX Runtime threads spin while idle (lower latency when ORT has "
                        "the cores to itself; off by default because decoding shares them)")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    _add_feedback_args(p)
    _add_management_args(p)
    _add_limit_args(p)
    p.add_argument("--drain-s", type=float, default=_default("drain_s"),
                   help=f"on SIGTERM, seconds in-flight requests get to finish; the process "
                        f"exits a few seconds later at most, inside Kubernetes' default 30 s "
                        f"grace period {DEFAULTS_HELP}")
    from serving.http.security import add_arguments

    add_arguments(p)
    return p


def _add_limit_args(p: argparse.ArgumentParser) -> None:
    """The budgets that bound what one request or connection may cost (README: limits)."""
    from serving.preprocess import DEFAULT_DECODE_TIMEOUT_S, DEFAULT_MAX_JPEG_SCANS

    g = p.add_argument_group(
        "limits on untrusted input",
        "Each image is decoded under a budget checked on its header before any pixel exists "
        "(with --max-pixels); each connection must deliver its request in time.")
    g.add_argument("--max-jpeg-scans", type=int, default=DEFAULT_MAX_JPEG_SCANS,
                   help=f"most scans in a progressive JPEG, 413 beyond {DEFAULTS_HELP}")
    g.add_argument("--decode-timeout-s", type=float, default=DEFAULT_DECODE_TIMEOUT_S,
                   help=f"longest decode of one image, 413 beyond; 0: no limit "
                        f"{DEFAULTS_HELP}")
    g.add_argument("--header-timeout-s", type=float, default=_default("header_timeout_s"),
                   help=f"a connection's request line and headers must arrive within this "
                        f"many seconds, else it is closed {DEFAULTS_HELP}")
    g.add_argument("--body-timeout-s", type=float, default=_default("body_timeout_s"),
                   help=f"a request's body must arrive within this many seconds of its "
                        f"headers, else the connection is closed {DEFAULTS_HELP}")
    g.add_argument("--max-connections", type=int, default=_default("max_connections"),
                   help=f"open connections (and requests in progress) before new requests get "
                        f"503 {DEFAULTS_HELP}")


def _duration(text: str) -> float:
    from serving.follow import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_management_args(p: argparse.ArgumentParser) -> None:
    """The management API and alias-following options; defaults from ManagementSettings."""
    from serving.http.management_api import ManagementSettings

    defaults = ManagementSettings()
    g = p.add_argument_group(
        "model management",
        "TorchServe's management API on its own loopback port (GET /models, POST /models?url="
        "<path>, PUT /models/<name>/<version>/set-default, DELETE /models/<name>/<version>), "
        "and following an MLflow alias: versions switch without dropping a request.")
    g.add_argument("--management-port", type=int, default=defaults.port,
                   help=f"management API port, 0 to disable {DEFAULTS_HELP}")
    g.add_argument("--management-host", default=defaults.host,
                   help=f"management API interface, loopback only {DEFAULTS_HELP}")
    g.add_argument("--model-dir-allowed", action="append", metavar="DIR", default=None,
                   help="a directory the management API may register versions from "
                        "(repeatable; default: the directories holding the --model paths)")
    g.add_argument("--follow", type=_duration, metavar="INTERVAL", default=None,
                   help="with --model models:/<name>@<alias>: ask the MLflow registry every "
                        "INTERVAL (30s, 2m, or seconds) which version the alias names, and "
                        "switch to it when it moves (default: off)")


def _add_feedback_args(p: argparse.ArgumentParser) -> None:
    """The prediction log and feedback options; defaults come from FeedbackSettings."""
    from serving.feedback import FeedbackSettings

    defaults = FeedbackSettings()
    g = p.add_argument_group(
        "prediction log and feedback",
        "With --feedback-db every answer of /predictions is logged (id, time, model, version, "
        "top-k, image sha256) and its id sent in the X-Prediction-Id header; POST /feedback "
        "attaches the confirmed label, GET /feedback/stats sums them up.")
    g.add_argument("--feedback-db", metavar="URL", default=None,
                   help="SQLAlchemy URL of the store: sqlite:///feedback.db (one file, several "
                        "servers may share it) or postgresql://user@host/db (default: off)")
    g.add_argument("--store-images", metavar="DIR", default=None,
                   help="also keep each request's image under DIR (people's photos: off by "
                        "default; needed to retrain on confirmed labels)")
    g.add_argument("--image-retention-days", type=float, default=defaults.image_max_age_days,
                   help=f"delete stored images older than this {DEFAULTS_HELP}")
    g.add_argument("--max-images", type=int, default=defaults.max_images,
                   help=f"keep at most this many stored images, newest first {DEFAULTS_HELP}")
    g.add_argument("--prediction-retention-days", type=float,
                   default=defaults.prediction_max_age_days,
                   help="delete logged predictions without feedback older than this "
                        "(default: keep them)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import uvicorn

    from serving.follow import Followed, FollowSettings, alias_target, registry_version
    from serving.http.app import create_app
    from serving.http.config import ServerConfig
    from serving.http.protocol import http_protocol
    from serving.http.security import settings_from_args
    from serving.predictor import Predictor
    from serving.preprocess import DecodeBudget

    try:
        budget = DecodeBudget(args.max_pixels, args.max_jpeg_scans, args.decode_timeout_s or None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    predictors, followed, model_dirs = [], [], []
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or "/" in name or ":" in name:
            name, path = "", spec
        target = alias_target(path, name or None) if args.follow else None
        if target is None and ":/" not in path:
            model_dirs.append(os.path.dirname(os.path.abspath(path)))
        try:
            if target is not None:  # pinned, so the follower knows what is served
                pinned = registry_version(target)
                path = target.version_uri(pinned)
            predictors.append(Predictor.load(path, intra_op_threads=args.threads,
                                             allow_spinning=args.spinning,
                                             budget=budget, name=name or None,
                                             engine=args.engine, precision=args.precision,
                                             streams=args.streams,
                                             draft_factor=args.jpeg_draft))
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"error: --model {spec}: {e}", file=sys.stderr)
            return 2
        except Exception as e:  # noqa: BLE001 - the registry: say what failed, no traceback
            print(f"error: --model {spec}: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        if target is not None:
            p = predictors[-1]
            followed.append(Followed(target, pinned, p.name, p.version))
    if args.follow and not followed:
        print("error: --follow needs a --model models:/<name>@<alias> to follow",
              file=sys.stderr)
        return 2
    feedback = None
    if args.feedback_db:
        from serving.feedback import FeedbackSettings

        feedback = FeedbackSettings(
            url=args.feedback_db, images_dir=args.store_images,
            image_max_age_days=args.image_retention_days, max_images=args.max_images,
            prediction_max_age_days=args.prediction_retention_days)
    elif args.store_images:
        print("error: --store-images needs --feedback-db", file=sys.stderr)
        return 2
    try:
        from serving.http.management_api import ManagementSettings

        management = ManagementSettings(
            host=args.management_host, port=args.management_port,
            allowed_dirs=tuple(args.model_dir_allowed or dict.fromkeys(model_dirs)),
        ) if args.management_port else None
        config = ServerConfig(
            host=args.host, port=args.port, metrics_port=args.metrics_port or None,
            max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
            max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 2**20),
            request_timeout_s=args.timeout_s, preprocess_threads=args.preprocess_threads,
            engine=args.engine, precision=args.precision, streams=args.streams,
            header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
            max_connections=args.max_connections,
            feedback=feedback, management=management,
            follow=FollowSettings(args.follow, tuple(followed)) if followed else None,
            security=settings_from_args(args), drain_s=args.drain_s)
        app = create_app(predictors, config)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in predictors:
        print(f"serving {p.name} v{p.version} from {p.source} on {p.runtime} "
              f"({p.threads} threads, {p.streams} stream{'s' * (p.streams > 1)}): "
              f"http://{config.host}:{config.port}/predictions/{p.name}", file=sys.stderr)
    # uvicorn finishes in-flight requests on SIGTERM/SIGINT, then runs the app's shutdown,
    # which lets the batchers drain.
    # uvicorn bounds nothing while a request arrives: the protocol class adds header and
    # body deadlines; limit_concurrency answers 503 past --max-connections.
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level,
                access_log=False, timeout_graceful_shutdown=max(1, round(config.drain_s)),
                http=http_protocol(config.header_timeout_s, config.body_timeout_s),
                limit_concurrency=config.max_connections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
