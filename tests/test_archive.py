"""The .mar: what torch-model-archiver packs, names and versions, both formats."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import TINY_CLASSES, jpeg_bytes

from training import archive
from training.export import export_version


@pytest.fixture(scope="module")
def exported(tiny_version, sample_images):
    if not (tiny_version / "model.onnx").exists():
        export_version(tiny_version, images=sample_images)
    return tiny_version


@pytest.mark.parametrize("fmt,model_file", [("onnx", "model.onnx"),
                                            ("torchscript", "model.ts")])
def test_mar_is_self_contained(exported, tmp_path, fmt, model_file):
    mar = archive.build_archive(exported, fmt, export_path=tmp_path)
    assert mar == tmp_path / "food.mar"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["food.mar"]  # no temp leftovers
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        assert names == {"MAR-INF/MANIFEST.json", "food_handler.py", model_file,
                         "index_to_name.json", "model_config.json", "model-config.yaml",
                         *(f"serving/{m}" for m in archive.CARRIED_MODULES)}
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
        labels = json.loads(z.read("index_to_name.json"))
        serving = yaml.safe_load(z.read("model-config.yaml"))
        handler_src = z.read("food_handler.py").decode()
    assert manifest["modelName"] == "food" and manifest["modelVersion"] == "1"
    assert manifest["serializedFile"] == model_file
    assert manifest["handler"] == "food_handler.py"
    assert labels == {str(i): c for i, c in enumerate(TINY_CLASSES)}
    assert serving["batchSize"] >= 1 and serving["maxBatchDelay"] >= 0
    assert serving["minWorkers"] >= 1 and serving["responseTimeout"] > 0
    assert serving["handler"]["topk"] == 3  # from the version's model_config.json
    assert "import captum" not in handler_src and "torch.load(" not in handler_src


def test_name_override_and_missing_export(exported, tmp_path, tiny_version):
    mar = archive.build_archive(exported, "onnx", name="dishes", export_path=tmp_path)
    with zipfile.ZipFile(mar) as z:
        assert json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelName"] == "dishes"
    with pytest.raises(archive.ArchiveError, match="--format"):
        archive.build_archive(exported, "pickle", export_path=tmp_path)


def test_archive_without_export_says_what_to_run(tmp_path):
    from conftest import make_tiny_version

    version = make_tiny_version(tmp_path / "artifacts")
    with pytest.raises(archive.ArchiveError, match="python -m training export"):
        archive.build_archive(version, "onnx", export_path=tmp_path / "store")


HANDLER_IN_MAR = """
import json, sys
from pathlib import Path
import food_handler
from ts.utils.util import list_classes_from_module

# TorchServe refuses a handler module that defines more than one class.
assert list_classes_from_module(food_handler) == [food_handler.FoodHandler]

class Context:
    system_properties = {"model_dir": "."}
    manifest = json.loads(Path("MAR-INF/MANIFEST.json").read_text())
    model_yaml_config = {}
    request_processor = None

    def set_response_status(self, code, phrase="", idx=0):
        raise AssertionError(code)

handler = food_handler.FoodHandler()
handler.initialize(Context())
print(handler.handle([{"body": sys.stdin.buffer.read()}], Context())[0])
ours = tuple(f"{sys.argv[1]}/{package}/" for package in ("serving", "handlers", "training"))
leaked = sorted(name for name, m in sys.modules.items()
                if (getattr(m, "__file__", None) or "").startswith(ours))
assert not leaked, f"imported from the repository, not the .mar: {leaked}"
"""


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_handler_runs_on_what_the_mar_carries(exported, tmp_path, fmt):
    """Unpacked as TorchServe does, the handler answers with only the .mar's own modules."""
    mar = archive.build_archive(exported, fmt, export_path=tmp_path / "store")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as z:
        z.extractall(unpacked)
    repo = str(Path(archive.__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", HANDLER_IN_MAR, repo], cwd=unpacked,
                         input=jpeg_bytes(), capture_output=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    answer = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert sorted(a["label"] for a in answer) == TINY_CLASSES
