"""The TorchServe handler called directly with TorchServe-shaped batches (no server)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, jpeg_bytes
from PIL import Image
from torchvision import transforms
from ts.context import Context, RequestProcessor

from handlers.food_handler import FoodHandler
from serving.preprocess import PreprocessSpec, preprocess_bytes
from training.archive import build_archive
from training.export import export_version
from training.models import load_eager
from training.version import load_version


@pytest.fixture(scope="module", params=["onnx", "torchscript"])
def model_dir(request, tiny_version, sample_images, tmp_path_factory) -> Path:
    """An unpacked .mar (what TorchServe hands the handler as model_dir), per format."""
    if not (tiny_version / "model.onnx").exists():
        export_version(tiny_version, images=sample_images)
    store = tmp_path_factory.mktemp(f"store-{request.param}")
    mar = build_archive(tiny_version, request.param, export_path=store)
    out = tmp_path_factory.mktemp(f"unpacked-{request.param}")
    with zipfile.ZipFile(mar) as z:
        z.extractall(out)
    return out


def make_context(model_dir: Path, batch: int, headers: list[dict] | None = None) -> Context:
    """A real ts.context.Context, set up the way TorchServe's Service.predict does."""
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    context = Context("food", str(model_dir), manifest, batch, None, "0.12.0",
                      model_yaml_config={"maxWorkers": 1, "handler": {"topk": 3}})
    context.request_processor = [RequestProcessor(h) for h in (headers or [{}] * batch)]
    return context


def loaded(model_dir: Path) -> FoodHandler:
    handler = FoodHandler()
    handler.initialize(make_context(model_dir, 1))
    return handler


def image_bytes(mode: str, size=(50, 40), fmt="PNG", **save) -> bytes:
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def bomb_png(size=(8000, 7000)) -> bytes:
    """A tiny file that decodes to 56 MP, over the 50 MP limit (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new("1", size).save(buf, format="PNG")
    return buf.getvalue()


def test_batch_matches_eager_model_and_json_shape(model_dir, tiny_version, sample_images):
    handler = loaded(model_dir)
    data = [{"body": p.read_bytes()} for p in sample_images[:4]]
    context = make_context(model_dir, len(data))
    answers = handler.handle(data, context)
    assert len(answers) == 4
    version = load_version(tiny_version)
    x = np.stack([preprocess_bytes(p.read_bytes(), version.spec) for p in sample_images[:4]])
    with torch.inference_mode():
        probs = torch.softmax(load_eager(version)(torch.from_numpy(x)), 1).numpy()
    for i, answer in enumerate(answers):
        assert context.get_response_status(i)[0] == 200
        assert context.get_response_content_type(i) == "application/json"
        got = json.loads(answer)
        assert [g["label"] for g in got] == [TINY_CLASSES[j] for j in np.argsort(-probs[i])]
        assert [g["probability"] for g in got] == pytest.approx(sorted(probs[i])[::-1],
                                                                abs=1e-5)


def test_mixed_batch_answers_each_request_on_its_own(model_dir, sample_images):
    handler = loaded(model_dir)
    good = sample_images[0].read_bytes()
    truncated = good[: len(good) // 2]
    bomb = bomb_png()
    data = [{"body": good}, {"body": b"not an image"}, {"data": bytearray(good)},
            {"body": truncated}, {"body": b""}, {}, {"body": bomb}, {"body": good}]
    context = make_context(model_dir, len(data))
    answers = handler.handle(data, context)
    statuses = [context.get_response_status(i)[0] for i in range(len(data))]
    assert statuses == [200, 400, 200, 400, 400, 400, 413, 200]
    for i in (1, 3, 4, 5, 6):
        body = json.loads(answers[i])
        assert body["code"] == statuses[i] and body["message"] and body["type"]
    assert json.loads(answers[0]) == json.loads(answers[2]) == json.loads(answers[7])
    assert json.loads(answers[4])["type"] == "EmptyBody"
    assert json.loads(answers[6])["type"] == "ImageTooLarge"


@pytest.mark.parametrize("mode,fmt,save", [
    ("CMYK", "JPEG", {}), ("P", "PNG", {}), ("RGBA", "PNG", {}), ("L", "PNG", {}),
    ("I;16", "PNG", {}), ("LA", "PNG", {}),
])
def test_convertible_modes_are_classified(model_dir, mode, fmt, save):
    handler = loaded(model_dir)
    context = make_context(model_dir, 1)
    answer = handler.handle([{"body": image_bytes(mode, fmt=fmt, **save)}], context)
    assert context.get_response_status(0)[0] == 200, answer
    assert len(json.loads(answer[0])) == 3


def test_unsupported_mode_is_415(model_dir):
    handler = loaded(model_dir)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 20), np.float32), "F").save(buf, format="TIFF")
    context = make_context(model_dir, 1)
    answer = handler.handle([{"body": buf.getvalue()}], context)
    assert context.get_response_status(0)[0] == 415
    assert json.loads(answer[0])["type"] == "UnsupportedImageMode"


def test_topk_from_field_header_and_default(model_dir, sample_images):
    handler = loaded(model_dir)
    img = sample_images[1].read_bytes()
    data = [{"body": img}, {"data": img, "topk": b"1"}, {"body": img, "topk": "2"},
            {"body": img}, {"body": img, "topk": "9"}, {"body": img, "topk": "x"}]
    headers = [{}, {}, {}, {"X-TopK": "2"}, {}, {}]
    context = make_context(model_dir, len(data), headers)
    answers = handler.handle(data, context)
    assert [len(json.loads(a)) for a in answers[:4]] == [3, 1, 2, 2]
    assert [context.get_response_status(i)[0] for i in (4, 5)] == [400, 400]
    assert "allowed: 1..3" in json.loads(answers[4])["message"]


def test_json_body_is_rejected_not_crashed(model_dir):
    handler = loaded(model_dir)
    context = make_context(model_dir, 1)
    answer = handler.handle([{"body": {"image": "abc"}}], context)
    assert context.get_response_status(0)[0] == 415
    assert "image bytes" in json.loads(answer[0])["message"]


def test_handler_preprocessing_matches_torchvision(model_dir, sample_images):
    """The handler's input tensor equals torchvision's eval transforms on the same images."""
    spec = PreprocessSpec.from_dict(json.loads((model_dir / "model_config.json").read_text())
                                    ["preprocessing"])
    handler = loaded(model_dir)
    reference = transforms.Compose([
        transforms.Resize(spec.resize_size), transforms.CenterCrop(spec.crop_size),
        transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    worst = 0.0
    for path in sample_images:
        ours, _ = handler.preprocess_one({"body": path.read_bytes()})
        theirs = reference(Image.open(path).convert("RGB")).numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
    print(f"max abs difference handler vs torchvision: {worst:.3g}")
    assert worst <= 1e-5


def test_handler_never_imports_captum(model_dir):
    import sys

    loaded(model_dir)
    assert "captum" not in sys.modules


def test_jpeg_of_odd_size_is_fine(model_dir):
    handler = loaded(model_dir)
    context = make_context(model_dir, 1)
    answer = handler.handle([{"body": jpeg_bytes(1, 300, seed=3)}], context)
    assert context.get_response_status(0)[0] == 200, answer
