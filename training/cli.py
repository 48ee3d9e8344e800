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
    from training.locks import Busy
    from training.train import RunConflict, train

    try:
        config = load_config(args.config, overrides, resume=args.resume)
        train(config, resume=args.resume)  # checks the arch against torchvision first
    except (ConfigError, RunConflict, Busy) as e:
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


def _promote(args: argparse.Namespace) -> int:
    from training.registry import promote_cli

    return promote_cli(args)


def _rollback(args: argparse.Namespace) -> int:
    from training.registry import rollback_cli

    return rollback_cli(args)


def _models(args: argparse.Namespace) -> int:
    from training.registry import models_cli

    return models_cli(args)


def _deploy(args: argparse.Namespace) -> int:
    from training.deploy import deploy_cli

    return deploy_cli(args)


def _retrain(args: argparse.Namespace, overrides: list[str]) -> int:
    from training.retrain import retrain_cli

    return retrain_cli(args, overrides)


def _lifecycle_demo(args: argparse.Namespace, overrides: list[str]) -> int:
    from training.lifecycle_demo import demo_cli

    return demo_cli(args, overrides)


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
    p.add_argument("--variants", default=None, metavar="NAME[,NAME]|all",
                   help="also validate these engine variants against onnxruntime-fp32 "
                        "(onnxruntime-int8, openvino-bf16, openvino-int8, or all) and record "
                        "those that pass in model_config.json; servers pick the fastest")
    p.add_argument("--min-agreement", type=float, default=0.99,
                   help="top-1 agreement with float a variant (or the int8 model) needs "
                        "on the validation split (default %(default)s)")
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

    registered = TrainConfig.registered_model
    p = sub.add_parser("promote", help="make a registered version the champion, by hand")
    p.add_argument("--version", type=int, required=True, help="registry version number")
    p.add_argument("--reason", required=True, help="why (kept as a registry tag)")
    p.add_argument("--registered-model", default=registered)
    p.set_defaults(func=_promote)

    p = sub.add_parser("rollback", help="move the champion back (default: to the version it "
                                        "replaced)")
    p.add_argument("--to", type=int, default=None, help="registry version number")
    p.add_argument("--reason", required=True, help="why (kept as a registry tag)")
    p.add_argument("--registered-model", default=registered)
    p.set_defaults(func=_rollback)

    p = sub.add_parser("models", help="registered versions, their metrics, the champion")
    p.add_argument("--registered-model", default=registered)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_models)

    p = sub.add_parser("deploy", help="switch a running TorchServe to a version (management "
                                      "API, no failed request)")
    p.add_argument("--torchserve", required=True, metavar="URL",
                   help="TorchServe's management API, e.g. http://127.0.0.1:8081")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", default="artifacts/food/latest", help="version directory")
    source.add_argument("--version", type=int, default=None,
                        help="registry version number (instead of --model)")
    p.add_argument("--name", default=None, help="model name in TorchServe (default: the "
                                                "version's name)")
    p.add_argument("--model-store", default="model_store",
                   help="TorchServe's model_store directory (the .mar is placed there)")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    p.add_argument("--inference", default=None, metavar="URL",
                   help="TorchServe's inference API: warm the new version up before the switch")
    p.add_argument("--token", default=None, help="management token, when token "
                                                 "authorization is on")
    p.add_argument("--drain-seconds", type=float, default=2.0,
                   help="time the old version's workers get to finish their batches")
    p.add_argument("--registered-model", default=registered)
    p.set_defaults(func=_deploy)

    p = sub.add_parser("retrain", help="train on feedback, promote if better, deploy; with "
                                       "--if-needed only when it is time",
                       description="Config keys can be overridden as for train.",
                       epilog="cron: 0 3 * * * cd /srv/food && python -m training retrain "
                              "--if-needed --min-new-labels 200 --max-age-days 7 "
                              "--feedback sqlite:///feedback.db")
    p.add_argument("--config", default="configs/sample.yaml", help="YAML config file")
    p.add_argument("--feedback", default=None, metavar="URL",
                   help="feedback store (sets the config key feedback)")
    p.add_argument("--if-needed", action="store_true",
                   help="train only with enough new labels or a champion that is too old")
    p.add_argument("--min-new-labels", type=int, default=100)
    p.add_argument("--max-age-days", type=float, default=30.0)
    p.add_argument("--deploy-torchserve", default=None, metavar="URL",
                   help="after a promotion, switch this TorchServe (management API) to it")
    p.add_argument("--model-store", default="model_store",
                   help="TorchServe's model_store directory, for --deploy-torchserve")
    p.add_argument("--inference", default=None, metavar="URL",
                   help="TorchServe's inference API, for the warm-up request")
    p.add_argument("--export", action="store_true",
                   help="export the new version (model.onnx, model.ts) into its registry "
                        "version: what an ONNX server following the alias loads")
    p.set_defaults(func=_retrain, takes_overrides=True)

    p = sub.add_parser("lifecycle-demo", help="serve the champion, collect confirmed labels, "
                                              "retrain, promote if better, switch under load",
                       description="The learning loop end to end on the sample data, in "
                                   "--workdir. Config keys can be overridden as for train "
                                   "(both versions).")
    p.add_argument("--workdir", default="lifecycle",
                   help="MLflow store (unless MLFLOW_TRACKING_URI is set), artifacts, feedback "
                        "database, stored photos, server log")
    p.add_argument("--config", default="configs/sample.yaml", help="YAML config file")
    p.add_argument("--quick", action="store_true",
                   help="tiny models and data (what the test runs): a few minutes at most")
    p.add_argument("--photos", type=int, default=None,
                   help="photos the app confirms before the retrain (default 200; quick 40)")
    p.add_argument("--photos-after", type=int, default=None,
                   help="photos confirmed after the switch (default 100; quick 20)")
    p.add_argument("--min-new-labels", type=int, default=None,
                   help="retrain --if-needed threshold (default 100; quick 20)")
    p.add_argument("--v1-epochs", type=int, default=None,
                   help="epochs of v1 when there is no champion yet: an early model "
                        "(default 10; quick 1; 0: the config's)")
    p.set_defaults(func=_lifecycle_demo, takes_overrides=True)
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
