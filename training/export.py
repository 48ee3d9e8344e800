"""Export a model version to TorchScript and ONNX, refusing to write either unless it matches
eager PyTorch on real images; optionally add a static int8 ONNX model.

``python -m training export --model artifacts/food/latest [--quantize int8]`` writes
``model.ts`` and ``model.onnx`` (and ``model.int8.onnx``) into the version directory as ONE
unit: all of them are written and checked in a staging directory, which is published as
``.export-<n>/`` (with ``export.json``: what was written, its sha256 and parity) and made
current by swapping one symlink, ``export -> .export-<n>`` (``training.version.write_export``).
``model.onnx`` and friends in the version directory are links through ``export/``, so a reader
never sees a model.ts of one export beside a model.onnx of another, whenever a run is killed;
``serving.artifacts`` resolves ``export`` once per load. The previous export is kept for
readers still loading it; older ones, and a killed export's leftovers, go at the next export.

ONNX uses torch's dynamo exporter (the default since torch 2.9; the TorchScript-based one is
deprecated) with ``external_data=False`` so the weights stay inside the one ``.onnx`` file
(fine below protobuf's 2 GB limit) and a dynamic batch dimension exported from a batch of 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from serving import engines
from serving.artifacts import MODEL_FILES
from serving.atomic import atomic_write, write_json
from serving.engines import ort_session
from serving.predictor import default_threads
from serving.preprocess import InputError, PreprocessSpec, preprocess_bytes
from training.models import load_eager
from training.version import EXPORT_MANIFEST, ModelVersion, load_version, write_export

log = logging.getLogger(__name__)

RTOL, ATOL = 1e-3, 1e-4
PARITY_BATCH_SIZES = (1, 8)
MAX_PARITY_IMAGES = 32
MAX_CALIBRATION_IMAGES = 128
MAX_INT8_EVAL_IMAGES = 2000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class ExportError(RuntimeError):
    """The export was refused (parity or quantization agreement broken); nothing written."""


@dataclass
class ParityResult:
    """How far one runtime's logits are from eager PyTorch at one batch size."""

    runtime: str
    batch_size: int
    max_abs_diff: float
    max_rel_diff: float
    top1_mismatches: int
    num_images: int
    ok: bool

    def __str__(self) -> str:
        status = "ok" if self.ok else "FAILED"
        return (f"{self.runtime:<11} batch {self.batch_size}: max|diff| {self.max_abs_diff:.3g}, "
                f"max rel {self.max_rel_diff:.3g}, top-1 mismatches {self.top1_mismatches}/"
                f"{self.num_images} (rtol {RTOL}, atol {ATOL}) {status}")


@dataclass
class ExportReport:
    """What export wrote and the checks behind it."""

    files: list[Path] = field(default_factory=list)
    parity: list[ParityResult] = field(default_factory=list)
    quantization: dict | None = None
    variants: dict | None = None  # engines.VARIANTS measured against onnxruntime-fp32


def dataset_root(version: ModelVersion) -> Path | None:
    """The data directory the version was trained on (``dataset.root`` in its config)."""
    root = (version.config.get("dataset") or {}).get("root")
    return Path(root) if root else None


def validation_images(version: ModelVersion) -> list[tuple[Path, str]]:
    """(path, true label) of the version's validation images that still exist, from the
    ``predictions.csv`` training wrote."""
    return [(Path(p), label) for p, label in version.validation_samples() if Path(p).is_file()]


def training_images(version: ModelVersion, limit: int = MAX_CALIBRATION_IMAGES) -> list[Path]:
    """Up to ``limit`` images of the version's dataset that are not validation images, spread
    evenly over the sorted file list: the int8 calibration set."""
    root = dataset_root(version)
    if root is None or not root.is_dir():
        return []
    held_out = {p.resolve() for p, _ in validation_images(version)}
    files = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.resolve() not in held_out)
    if len(files) > limit:
        files = [files[i] for i in np.linspace(0, len(files) - 1, limit).astype(int)]
    return files


def load_images(paths: list[Path], spec: PreprocessSpec) -> np.ndarray:
    """Image files as one (N, 3, H, W) float32 batch with the serving preprocessing;
    unreadable files are skipped with a warning."""
    arrays = []
    for path in paths:
        try:
            arrays.append(preprocess_bytes(Path(path).read_bytes(), spec))
        except (InputError, OSError) as e:
            log.warning("skipping %s: %s", path, e)
    if not arrays:
        raise ExportError("no readable images to check the exported models with")
    return np.stack(arrays)


def export_torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Trace ``model`` to TorchScript (what TorchServe's torch.jit.load reads)."""
    with warnings.catch_warnings():
        # torch 2.14 marks torch.jit deprecated; TorchScript is still what TorchServe loads.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
    traced.save(str(path))


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX with input ``input`` (N,3,H,W), output ``logits`` and a dynamic batch dim."""
    import onnx

    if example.shape[0] < 2:
        raise ValueError("export ONNX from a batch of at least 2, or the batch dim may be fixed")
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (example,), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_shapes=({0: batch},), dynamo=True,
                      external_data=False, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)


def run_onnx(path: Path, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Logits from ONNX Runtime, fed ``batch_size`` images at a time."""
    session = ort_session(path, default_threads())
    return np.concatenate([session.run(["logits"], {"input": x[i:i + batch_size]})[0]
                           for i in range(0, len(x), batch_size)])


def compare(runtime: str, batch_size: int, reference: np.ndarray,
            got: np.ndarray) -> ParityResult:
    """Parity of ``got`` against eager logits: allclose(rtol, atol) and identical top-1."""
    diff = np.abs(got - reference)
    rel = diff / np.maximum(np.abs(reference), 1e-12)
    mismatches = int((got.argmax(1) != reference.argmax(1)).sum())
    ok = bool(np.allclose(got, reference, rtol=RTOL, atol=ATOL)) and mismatches == 0
    return ParityResult(runtime, batch_size, float(diff.max()), float(rel.max()), mismatches,
                        len(reference), ok)


def check_parity(model: nn.Module, ts_path: Path, onnx_path: Path,
                 images: np.ndarray) -> list[ParityResult]:
    """TorchScript and ONNX Runtime against eager PyTorch at batch 1 and batch 8."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation, as above
        ts_module = torch.jit.load(str(ts_path), map_location="cpu").eval()
    session = ort_session(onnx_path, default_threads())
    results = []
    for bs in PARITY_BATCH_SIZES:
        chunks = [images[i:i + bs] for i in range(0, len(images), bs)]
        with torch.inference_mode():
            eager = np.concatenate([model(torch.from_numpy(c)).numpy() for c in chunks])
            scripted = np.concatenate([ts_module(torch.from_numpy(c)).numpy() for c in chunks])
        onnx_out = np.concatenate([session.run(["logits"], {"input": c})[0] for c in chunks])
        results.append(compare("torchscript", bs, eager, scripted))
        results.append(compare("onnxruntime", bs, eager, onnx_out))
    return results


class _Calibration:
    """onnxruntime CalibrationDataReader over preprocessed training images, one at a time."""

    def __init__(self, images: np.ndarray) -> None:
        self._iter = iter(images)

    def get_next(self) -> dict | None:
        image = next(self._iter, None)
        return None if image is None else {"input": image[None]}


def quantize_int8(onnx_path: Path, out_path: Path, calibration: np.ndarray,
                  validation: np.ndarray, labels: np.ndarray | None,
                  min_agreement: float) -> dict:
    """Static QDQ int8 quantization calibrated on ``calibration``; writes ``out_path`` only if
    top-1 agreement with the float model on ``validation`` is at least ``min_agreement``."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    report: dict = {}

    def write_checked(tmp_out: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            pre = Path(scratch) / "pre.onnx"
            quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(tmp_out), _Calibration(calibration),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        float_top1 = run_onnx(onnx_path, validation, 8).argmax(1)
        int8_top1 = run_onnx(tmp_out, validation, 8).argmax(1)
        report.update(agreement=float((float_top1 == int8_top1).mean()),
                      num_images=len(validation), calibration_images=len(calibration),
                      min_agreement=float(min_agreement))
        if labels is not None:
            report["float_accuracy"] = float((float_top1 == labels).mean())
            report["int8_accuracy"] = float((int8_top1 == labels).mean())
        if report["agreement"] < min_agreement:
            raise ExportError(f"int8 top-1 agreement {report['agreement']:.2%} with the float "
                              f"model is under --min-agreement {min_agreement:.2%}; "
                              f"{out_path.name} not written")

    atomic_write(out_path, write_checked)  # renamed into place only if the check passed
    return report


def measure_variants(stage: Path, names: list[str], validation: np.ndarray,
                     min_agreement: float, threads: int | None = None,
                     rounds: int = 3) -> dict:
    """Each variant in ``names`` against ``onnxruntime-fp32``, on the files in ``stage``:
    top-1 agreement on ``validation`` and images/s in process at batch 1 and 8 (same
    threads). Those reaching ``min_agreement`` are "passed" (a server may pick them), the
    others "refused"; variants this machine cannot run, or whose file is missing, "skipped".

    Speed is timed in ``rounds`` rounds that visit every variant in turn, and each figure is
    the median over rounds: a neighbour's load then slows all variants alike instead of
    whichever happened to be measured during it.
    """
    threads = threads or default_threads()
    batch8 = np.resize(validation, (8, *validation.shape[1:]))
    table = {"reference": engines.REFERENCE.name, "min_agreement": float(min_agreement),
             "num_images": len(validation), "threads": threads, "cpu": engines.cpu_model(),
             "passed": {}, "refused": {}, "skipped": {}}
    compiled: dict[str, engines.Engine] = {}
    for name in [engines.REFERENCE.name, *names]:
        variant = engines.variant_named(name)
        why = engines.unavailable(variant)
        if why is None and not (stage / MODEL_FILES[variant.model_format]).is_file():
            why = f"no {MODEL_FILES[variant.model_format]} (its int8 quantization was refused)"
        if why:
            table["skipped"][name] = why
            log.info("variant %s skipped: %s", name, why)
        elif name not in compiled:
            model = (stage / MODEL_FILES[variant.model_format]).read_bytes()
            compiled[name] = engines.build(model, variant, threads)
    top1 = {name: np.concatenate([e.infer(validation[i:i + 8])
                                  for i in range(0, len(validation), 8)]).argmax(1)
            for name, e in compiled.items()}
    rates: dict[str, dict[str, list[float]]] = {n: {"1": [], "8": []} for n in compiled}
    for _ in range(rounds):
        for name, engine in compiled.items():
            for size, x in (("1", batch8[:1]), ("8", batch8)):
                rates[name][size].append(engines.images_per_second(engine.infer, x,
                                                                   seconds=0.4, repeats=1))
    speed = {name: {"images_per_s_batch1": float(np.median(r["1"])),
                    "images_per_s_batch8": float(np.median(r["8"]))}
             for name, r in rates.items()}
    reference = speed[engines.REFERENCE.name]
    for name in compiled:
        entry = {**speed[name],
                 "speedup": speed[name]["images_per_s_batch8"] / reference["images_per_s_batch8"],
                 "speedup_batch1": speed[name]["images_per_s_batch1"]
                 / reference["images_per_s_batch1"]}
        if name == engines.REFERENCE.name:
            table["passed"][name] = entry
            continue
        entry["agreement"] = float((top1[name] == top1[engines.REFERENCE.name]).mean())
        passed = entry["agreement"] >= min_agreement
        table["passed" if passed else "refused"][name] = entry
        log.info("variant %s: agreement %.2f%%, %.2fx at batch 8 %s", name,
                 100 * entry["agreement"], entry["speedup"], "passed" if passed else "REFUSED")
    return table


def record_variants(version_dir: Path, published: Path, table: dict) -> None:
    """Write the variant table into the version's ``model_config.json`` (atomically), tied
    to the export it was measured on: a reader that resolves another export ignores it."""
    config_file = version_dir / "model_config.json"
    config = json.loads(config_file.read_text())
    config["variants"] = {"export": published.name, **table}
    write_json(config_file, config)


def log_to_mlflow(version: ModelVersion, onnx_path: Path, files: list[Path],
                  example: np.ndarray, logits: np.ndarray) -> None:
    """Log the ONNX model (with a signature) and the exported files into the version's MLflow
    run, under ``version/`` so the registered model carries them; warn and go on if that
    fails."""
    run_id = version.config.get("mlflow_run_id")
    if not run_id:
        log.warning("no mlflow_run_id in %s/model_config.json: exported files not logged to "
                    "MLflow", version.path)
        return
    try:
        import mlflow
        import onnx
        from mlflow.models import infer_signature

        with mlflow.start_run(run_id=run_id):
            mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="onnx",
                                  signature=infer_signature(example, logits))
            for path in files:
                mlflow.log_artifact(str(path), "version")
    except Exception as e:  # noqa: BLE001 (tracking is a record, not a precondition)
        log.warning("could not log the export to MLflow run %s: %s", run_id, e)


def export_version(model_dir: str | Path, images: list[Path] | None = None,
                   quantize: str | None = None, min_agreement: float = 0.99,
                   calibration_images: list[Path] | None = None,
                   variants: list[str] | None = None) -> ExportReport:
    """Write ``model.ts`` and ``model.onnx`` (and ``model.int8.onnx``) into ``model_dir``.

    ``images`` are the parity (and int8 validation) images; by default the version's
    validation images from ``predictions.csv``. ``calibration_images`` default to the
    training images of the version's dataset, then to the validation images. Raises
    :class:`ExportError` (nothing written) when parity or int8 agreement fails.
    ``variants`` (names from ``serving.engines.VARIANTS``, or ``["all"]``) are measured
    against ONNX Runtime fp32 and recorded in ``model_config.json`` (int8 ones imply
    ``quantize="int8"``); one under ``min_agreement`` is refused, the export goes on.
    """
    version = load_version(model_dir)
    spec = version.spec
    if images is None:
        images = [p for p, _ in validation_images(version)[:MAX_PARITY_IMAGES]]
    if not images:
        raise ExportError(f"no validation images for parity: {version.path}/predictions.csv "
                          f"lists none that exist; pass images explicitly")
    batch = load_images(images[:MAX_PARITY_IMAGES], spec)
    if len(batch) < max(PARITY_BATCH_SIZES):  # batch 8 needs 8 images: cycle the ones we have
        batch = np.resize(batch, (max(PARITY_BATCH_SIZES), *batch.shape[1:]))
    model = load_eager(version)
    example = torch.from_numpy(batch[:2].copy())

    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize {quantize!r}: only 'int8' is supported")
    if variants == ["all"]:
        variants = [v.name for v in engines.VARIANTS]
    for name in variants or ():
        if engines.variant_named(name).precision == "int8":
            quantize = "int8"
    report = ExportReport()
    version_dir = version.path

    def fill(stage: Path) -> None:
        export_onnx(model, example, stage / "model.onnx")
        export_torchscript(model, example, stage / "model.ts")
        report.parity = check_parity(model, stage / "model.ts", stage / "model.onnx", batch)
        if not all(r.ok for r in report.parity):
            raise ExportError("parity check failed, model.ts/model.onnx not written:\n"
                              + "\n".join(str(r) for r in report.parity))
        # Agreement and accuracy on the whole validation split (not just the parity
        # batch): at 32 images one flipped answer would already be 3%.
        val = validation_images(version)[:MAX_INT8_EVAL_IMAGES]
        val_paths = [p for p, _ in val] or list(images)
        if quantize == "int8":
            truth = np.array([version.class_to_idx[label] for _, label in val]) if val else None
            chosen = calibration_images or training_images(version) or images
            calibration = load_images(chosen[:MAX_CALIBRATION_IMAGES], spec)
            try:
                report.quantization = quantize_int8(
                    stage / "model.onnx", stage / "model.int8.onnx", calibration,
                    load_images(val_paths, spec), truth, min_agreement)
            except ExportError:
                if not variants:  # --quantize int8 alone: the int8 model was the request
                    raise
                log.warning("int8 quantization refused; its variants are skipped")
        if variants:
            report.variants = measure_variants(stage, variants, load_images(val_paths, spec),
                                               min_agreement)
        write_json(stage / EXPORT_MANIFEST, manifest(stage, report))

    published = write_export(version_dir, fill)
    if report.variants is not None:
        record_variants(version_dir, published, report.variants)
    report.files = [version_dir / name for name in ("model.ts", "model.onnx", "model.int8.onnx")
                    if (version_dir / name).is_file()]
    onnx_path = version_dir / "model.onnx"

    with torch.inference_mode():
        logits = model(example).numpy()
    log_to_mlflow(version, onnx_path, report.files + [version_dir / "model_config.json"],
                  example.numpy(), logits)
    return report


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(stage: Path, report: ExportReport) -> dict:
    """``export.json``: the files of this export with their sizes and sha256, and its checks."""
    files = {name: {"bytes": (stage / name).stat().st_size, "sha256": _sha256(stage / name)}
             for name in ("model.ts", "model.onnx", "model.int8.onnx")
             if (stage / name).is_file()}
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files,
            "parity": [vars(r) for r in report.parity], "quantization": report.quantization,
            "variants": report.variants}


def export_cli(args) -> int:
    """``python -m training export``: print the parity table; exit 1 when refused."""
    try:
        report = export_version(args.model, quantize=args.quantize,
                                min_agreement=args.min_agreement,
                                variants=args.variants.split(",") if args.variants else None)
    except ExportError as e:
        print(f"export refused: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for result in report.parity:
        print(result)
    if report.quantization:
        q = report.quantization
        line = (f"int8: top-1 agreement with float {q['agreement']:.2%} on {q['num_images']} "
                f"images (calibrated on {q['calibration_images']})")
        if "int8_accuracy" in q:
            line += f", val accuracy int8 {q['int8_accuracy']:.2%} / float "
            line += f"{q['float_accuracy']:.2%}"
        print(line)
    if report.variants:
        table = report.variants
        for status in ("passed", "refused"):
            for name, v in table[status].items():
                print(f"{name:<17} {status:<7} top-1 agreement {v.get('agreement', 1.0):7.2%}, "
                      f"{v['images_per_s_batch8']:7.1f} images/s at batch 8 "
                      f"({v['speedup']:.2f}x), batch 1 {v['speedup_batch1']:.2f}x")
        for name, why in table["skipped"].items():
            print(f"{name:<17} skipped: {why}")
        print(f"(--min-agreement {table['min_agreement']:.2%} on {table['num_images']} "
              f"validation images, {table['threads']} threads; recorded in model_config.json)")
    for path in report.files:
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
