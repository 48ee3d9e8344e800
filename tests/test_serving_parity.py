"""Identical JSON from the Predictor, the ONNX server and the TorchServe handler, from one .mar."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import requests
from conftest import jpeg_bytes
from test_server import run_server

from serving import Predictor

pytestmark = pytest.mark.integration


class FakeContext:
    """The parts of TorchServe's Context the handler reads, for an unpacked .mar."""

    def __init__(self, model_dir: Path, manifest: dict) -> None:
        self.system_properties = {"model_dir": str(model_dir), "batch_size": 8}
        self.manifest = manifest
        self.model_yaml_config = {}
        self.request_processor = None
        self.statuses: dict[int, int] = {}

    def set_response_status(self, code: int, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = code


@pytest.fixture(scope="module")
def mar(onnx_version, tmp_path_factory) -> Path:
    archive = pytest.importorskip("training.archive")
    try:
        return archive.build_archive(onnx_version, "onnx",
                                     export_path=tmp_path_factory.mktemp("model_store"))
    except archive.ArchiveError as e:
        pytest.skip(f"cannot build the .mar here: {e}")


def handler_answers(mar: Path, images: list[bytes], tmp_path: Path) -> list[str]:
    """Run the .mar's own handler in-process, as TorchServe would with one batch."""
    from handlers.food_handler import FoodHandler

    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as z:
        z.extractall(unpacked)
    manifest = json.loads((unpacked / "MAR-INF" / "MANIFEST.json").read_text())
    context = FakeContext(unpacked, manifest)
    handler = FoodHandler()
    handler.initialize(context)
    answers = handler.handle([{"body": image} for image in images], context)
    assert context.statuses == {}
    return answers


def test_predictor_server_and_handler_answer_identically(mar, sample_images, tmp_path):
    images = [p.read_bytes() for p in sample_images] + [jpeg_bytes(300, 200, seed=42)]
    predictor = Predictor.load(mar)
    from_predictor = [json.dumps([p.to_dict() for p in predictor.predict(i)]) for i in images]
    from_handler = handler_answers(mar, images, tmp_path)
    with run_server([str(mar)], tmp_path / "server.log") as server:
        from_server = [requests.put(f"{server.url}/predictions/food", data=i, timeout=30).text
                       for i in images]
    assert from_server == from_predictor
    assert [json.loads(a) for a in from_handler] == [json.loads(a) for a in from_predictor]
    assert from_handler == from_predictor  # byte for byte, not just equal JSON
    assert len(set(from_predictor)) > 1
