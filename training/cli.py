"""``python -m training <command>``: one entry point for every stage before serving.

Each command imports its stage when it runs, so ``--help`` and a bad config answer at once
without loading torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import MISSING, fields

from training.config import ConfigError, TrainConfig, load_config

# Our loggers: progress and results. Everything else (onnx_ir and onnxscript during ONNX
# export, torch.onnx, MLflow, alembic, matplotlib) speaks at WARNING and up only.
OWN_LOGGERS = ("training", "serving")


def _train(args: argparse.Namespace, overrides: list[str]) -> int:
    from training.train import train

    try:
        config = load_config(args.config, overrides, resume=args.resume)
        train(config, resume=args.resume)  # checks the arch against torchvision first
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate_version

    report = evaluate_version(args.model, device=args.device, batch_size=args.batch_size)
    print(f"top1={report['top1']:.4f} top5={report['top5']:.4f} "
          f"macro_f1={report['macro_f1']:.4f} ({report['num_samples']} images)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from training.predict import predict_files

    for path, preds in predict_files(args.images, args.model, args.topk):
        print(path)
        for p in preds:
            print(f"  {p['label']:<24} {p['probability']:.4f}")
    return 0


def _sample_data(args: argparse.Namespace) -> int:
    from training.sample_data import generate

    try:
        summary = generate(args.root, examples_dir=args.examples, per_class=args.per_class,
                           seed=args.seed)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export_cli
    from training.triton import triton_cli

    return export_cli(args) or triton_cli(args)


def _archive(args: argparse.Namespace) -> int:
    from training.archive import archive_cli

    return archive_cli(args)


def _demo(args: argparse.Namespace) -> int:
    from training.demo import demo_cli

    return demo_cli(args)


def _config_help() -> str:
    lines = ["config keys (YAML) = overrides (--key value), with their defaults:"]
    for f in fields(TrainConfig):
        default = f.default if f.default is not MISSING else f.default_factory()
        lines.append(f"  --{f.name.replace('_', '-'):<22} {default}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune a backbone into artifacts/<name>/v<N>",
                       description="Train per a YAML config; every config key can be "
                                   "overridden on the command line (--epochs 3 --lr 1e-3).",
                       epilog=_config_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/sample.yaml", help="YAML config file")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run from its last checkpoint")
    p.set_defaults(func=_train, takes_overrides=True)

    p = sub.add_parser("evaluate", help="re-run evaluation of a version, rewrite its reports")
    p.add_argument("--model", default="artifacts/food/latest")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="print the top-k labels of images")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--model", default="artifacts/food/latest")
    p.add_argument("--topk", type=int, default=3)
    p.set_defaults(func=_predict)

    p = sub.add_parser("sample-data", help="generate the synthetic sample dataset")
    p.add_argument("root", nargs="?", default="data/sample")
    p.add_argument("--examples", default="examples", help="where held-out examples go")
    p.add_argument("--per-class", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_sample_data)

    p = sub.add_parser("export", help="TorchScript + ONNX with parity checks")
    p.add_argument("--model", default="artifacts/food/latest")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="also write model.int8.onnx (static QDQ quantization)")
    p.add_argument("--min-agreement", type=float, default=0.98,
                   help="refuse the int8 model under this top-1 agreement with float")
    p.add_argument("--triton-repo", default=None, metavar="DIR",
                   help="also add the ONNX model to a Triton model repository in DIR")
    p.add_argument("--triton-max-batch-size", type=int, default=8,
                   help="max_batch_size in the Triton config.pbtxt (0: no batching)")
    p.set_defaults(func=_export)

    p = sub.add_parser("archive", help="build model_store/<name>.mar for TorchServe")
    p.add_argument("--model", default="artifacts/food/latest")
    p.add_argument("--format", choices=["onnx", "torchscript"], default=None)
    p.add_argument("--name", default=None, help="model name inside the .mar")
    p.add_argument("--export-path", default="model_store")
    p.set_defaults(func=_archive)

    p = sub.add_parser("demo", help="train, export, archive, serve with TorchServe, classify")
    p.set_defaults(func=_demo)
    return parser


def configure_logging(verbose: bool = False) -> None:
    """Our own loggers at INFO (DEBUG with -v), third-party ones at WARNING: the ONNX
    exporter alone logs hundreds of INFO lines that would bury the results."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    # MLflow gives its loggers their own handler and level when it is imported (later,
    # and in the subprocesses of `demo`); this is its documented setting for that level.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if "mlflow" in sys.modules:  # already imported (in-process callers): set it directly
        logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    configure_logging(args.verbose)
    if getattr(args, "takes_overrides", False):
        return args.func(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)
