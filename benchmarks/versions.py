"""What the benchmarks run on: test images and exported model versions, built once into
``benchmarks/scratch`` and reused.

Latency does not depend on the weights, so the backbones are measured as random-weight
versions at the production preprocessing (resize 256, crop 224, 101 classes like Food-101):
ImageNet weights and Food-101 cannot be downloaded here. Their BatchNorm statistics are set
from a few real images so activations (and int8 calibration ranges) are of a realistic
scale. int8 *agreement* does depend on the weights, so it is measured on a trained version
(``artifacts/food/latest`` by default) when there is one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from serving.atomic import atomic_write, write_json

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / "benchmarks" / "scratch"
BACKBONES = ("mobilenet_v2", "efficientnet_b0", "resnet50")
NUM_CLASSES = 101
RESIZE, CROP = 256, 224
PHONE_SIZE = (4000, 3000)


def bench_images(scratch: Path = SCRATCH) -> dict[str, list[Path]]:
    """``{"small": [five ~500x375 JPEGs], "phone": [one 4000x3000 JPEG], "train": [...]}``.

    The small ones are the sample generator's held-out examples; the phone one is an example
    upscaled with a little noise (decoding cost grows with pixels, not with content).
    """
    from training.sample_data import generate

    sample, images = scratch / "sample", scratch / "images"
    if not (images / "pizza.jpg").is_file() or not sample.is_dir():
        shutil.rmtree(sample, ignore_errors=True)
        generate(sample, examples_dir=images, per_class=24, seed=0)
    phone = images / "phone_4000x3000.jpg"
    if not phone.is_file():
        rng = np.random.default_rng(0)
        big = np.asarray(Image.open(images / "pizza.jpg").convert("RGB")
                         .resize(PHONE_SIZE, Image.BICUBIC), dtype=np.float32)
        big = np.clip(big + rng.normal(0, 4, big.shape), 0, 255).astype(np.uint8)
        atomic_write(phone, lambda tmp: Image.fromarray(big).save(tmp, format="JPEG",
                                                                  quality=85))
    small = sorted(p for p in images.glob("*.jpg") if p != phone)
    train = sorted(sample.rglob("*.jpg"))
    return {"small": small, "phone": [phone], "train": train, "sample_root": [sample]}


def backbone_version(arch: str, images: list[Path], root: Path = SCRATCH / "models",
                     int8: bool = True, resize: int = RESIZE, crop: int = CROP,
                     num_classes: int = NUM_CLASSES) -> Path:
    """``root/<arch>/v1``: a random-weight version with model.ts, model.onnx (and
    model.int8.onnx and every engine variant recorded), exported and parity-checked by
    ``training.export``; reused if there."""
    from serving.preprocess import PreprocessSpec
    from training.export import export_version, load_images

    path = root / f"{arch}-{crop}" / "v1"
    wanted = ["model.ts", "model.onnx"] + (["model.int8.onnx"] if int8 else [])
    if all((path / f).is_file() for f in wanted) and (not int8 or "variants" in json.loads(
            (path / "model_config.json").read_text())):
        return path
    import torch

    from training.models import build_model, calibrate_batchnorm
    from training.version import create_version, make_model_config

    shutil.rmtree(path.parent, ignore_errors=True)
    spec = PreprocessSpec(resize_size=resize, crop_size=crop)
    torch.manual_seed(0)
    model = build_model(arch, num_classes, weights="none")
    batch = load_images(images, spec)
    mirrored = np.concatenate([batch, batch[..., ::-1].copy()])
    calibrate_batchnorm(model, (mirrored[i:i + 8] for i in range(0, len(mirrored), 8)))
    class_to_idx = {f"class_{i:03d}": i for i in range(num_classes)}

    def write(tmp: Path, number: int) -> None:
        torch.save(model.state_dict(), tmp / "model.pth")
        write_json(tmp / "class_to_idx.json", class_to_idx)
        write_json(tmp / "model_config.json",
                   make_model_config("food", number, arch, class_to_idx, spec, topk=5,
                                     weights="random (benchmark)"))

    path = create_version(root / f"{arch}-{crop}", write)
    log.info("exporting %s to %s", arch, path)
    # Random weights give near-ties, so agreement here means nothing: accept any variant
    # (agreement is measured on a trained version: variant_agreement).
    export_version(path, images=images, quantize="int8" if int8 else None, min_agreement=0.0,
                   calibration_images=images, variants=["all"] if int8 else None)
    return path


def variant_agreement(trained: Path | None, scratch: Path = SCRATCH) -> dict:
    """Top-1 agreement of every engine variant with ONNX Runtime fp32 on a trained version's
    validation images (and int8 accuracy), as ``export --variants all`` measures it.

    The version is copied to scratch and exported there (the original is not touched); its
    int8 model is calibrated on its training images, as ``make export`` would.
    """
    from training.export import export_version
    from training.version import load_version

    if trained is None or not (Path(trained) / "model_config.json").is_file():
        return {"measured": False,
                "why": f"no trained version at {trained}: run `make train` first"}
    source = load_version(trained)
    copy = scratch / "trained" / f"{source.name}-v{source.version}"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for f in source.path.iterdir():
        if f.is_file() and f.suffix in {".pth", ".json", ".csv"}:
            shutil.copyfile(f, copy / f.name)
    # The copy is not the registered model: keep export from logging into its MLflow run.
    config = json.loads((copy / "model_config.json").read_text())
    config.pop("mlflow_run_id", None)
    config.pop("variants", None)
    write_json(copy / "model_config.json", config)
    report = export_version(copy, min_agreement=0.0, variants=["all"])
    if not report.variants or report.variants["num_images"] == 0:
        return {"measured": False, "why": f"{trained} lists no validation images"}
    table = report.variants
    q = report.quantization or {}
    return {"measured": True, "version": str(source.path), "arch": source.config["arch"],
            "crop": source.spec.crop_size, "num_images": table["num_images"],
            "agreement": {name: round(v.get("agreement", 1.0), 4)
                          for name, v in table["passed"].items()},
            "skipped": table["skipped"],
            "float_accuracy": q.get("float_accuracy"), "int8_accuracy": q.get("int8_accuracy")}
