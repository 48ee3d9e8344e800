"""notebooks/train_food101_gpu.ipynb, executed on the CPU against a tiny generated sample.

The notebook's parameters cell is followed by an injected cell (as papermill does) with a
tiny config, the sample's directory and the install step turned off; every other cell runs
as committed, in a real Jupyter kernel of this interpreter.
"""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "train_food101_gpu.ipynb"
EXECUTION_TIMEOUT_S = 600


def load():
    import nbformat

    return nbformat.read(NOTEBOOK, as_version=4)


def test_committed_without_outputs_and_with_a_parameters_cell():
    nb = load()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for name in ("INSTALL", "CONFIG", "DATA_DIR", "EPOCHS", "OVERRIDES"):
        assert f"\n{name} = " in "\n" + tagged[0].source, name
    install = next(c for c in code if '"-m", "pip"' in c.source)
    assert "[train,serve,torchserve]" in install.source and "if INSTALL" in install.source


def with_parameters(nb, values: dict):
    """A copy of ``nb`` with a cell assigning ``values`` right after its parameters cell."""
    import copy

    import nbformat

    nb = copy.deepcopy(nb)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


def test_notebook_trains_exports_archives_and_predicts_on_the_sample(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    from training.cli import main as training_cli

    data = tmp_path / "data" / "sample"
    assert training_cli(["sample-data", str(data), "--per-class", "6",
                         "--examples", str(tmp_path / "examples")]) == 0
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": "imagefolder", "data_dir": str(data), "name": "food",
        "arch": "mobilenet_v2", "weights": "none", "freeze": "none", "resize_size": 40,
        "crop_size": 32, "epochs": 1, "batch_size": 16, "workers": 0}))
    work = tmp_path / "work"
    nb = with_parameters(load(), {
        "INSTALL": False, "PROJECT_DIR": str(REPO), "CONFIG": str(config),
        "DATA_DIR": str(data), "EPOCHS": 1, "OVERRIDES": ["--seed", "1"],
        "WORKDIR": str(work), "NUM_PREDICT": 3})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    client = NotebookClient(nb, timeout=EXECUTION_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the cell's traceback on failure

    version = work / "artifacts" / "food" / "v1"
    for produced in (version / "model.onnx", version / "model.ts",
                     work / "model_store" / "food.mar",
                     work / "triton_repo" / "food" / "config.pbtxt",
                     work / "triton_repo" / "food" / "1" / "model.onnx"):
        assert produced.is_file(), produced
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.outputs)
    assert "$ python -m training train --config" in outputs
    assert outputs.count(" true ") == 3  # one line per predicted validation image
