"""``train --feedback`` and ``retrain --if-needed``: a real SQLite feedback store with stored
images, a real MLflow store, a tiny real training run.

The app's fresh photos come from the sample generator on a random stream of their own, so
they are never copies of the training images. The champion the retrain has to beat always
answers a class no image has, so it scores exactly 0 on any evaluation set and a trained
candidate is promoted.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from serving.feedback import FeedbackStore
from serving.preprocess import PreprocessSpec
from training.cli import main as cli_main
from training.models import build_model
from training.registry import CHAMPION, promote_if_better, register_version
from training.sample_data import CLASSES, draw, generate
from training.version import create_version, make_model_config, write_json

REPO = Path(__file__).resolve().parents[1]
MODEL = "food-classifier"
FEEDBACK_STREAM = 7  # sample_data uses 0 (training images) and 1 (examples)
TINY = {"resize_size": 36, "crop_size": 32, "epochs": 3, "batch_size": 8, "workers": 0,
        "weights": "none", "freeze": "none", "lr": 0.003}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "sample"
    generate(root, examples_dir=root.parent / "examples", per_class=8, seed=1)
    return root


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> mlflow.MlflowClient:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(tmp_path)
    yield mlflow.MlflowClient()
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def app_photo(label: str, i: int, seed: int = 3) -> bytes:
    """A fresh photo of ``label`` as a user would send it."""
    rng = np.random.default_rng([seed, FEEDBACK_STREAM, CLASSES.index(label), i])
    buf = io.BytesIO()
    draw(label, rng, (160, 120)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def confirm(url: str, images: Path, n: int, start: int = 0) -> None:
    """The app: n predictions of v1 with stored images, each confirmed by its user."""
    with FeedbackStore(url, images_dir=images) as store:
        store.register_model("food", "1", list(CLASSES))
        ids = []
        for i in range(start, start + n):
            label = CLASSES[i % len(CLASSES)]
            ids.append((store.log_prediction("food", "1", [{"label": "soup",
                                                            "probability": 0.9}],
                                             image=app_photo(label, i)), label))
        assert store.flush(30)
        for pid, label in ids:
            store.add_feedback(pid, label)


def never_right_champion(client, root: Path) -> None:
    """Register v1 as champion: a model that always answers a class no image belongs to."""
    classes = sorted(CLASSES) + ["zzz_nothing"]
    model = build_model("mobilenet_v2", len(classes), weights="none").eval()
    torch.nn.init.zeros_(model.classifier[-1].weight)
    with torch.no_grad():
        model.classifier[-1].bias.copy_(torch.eye(len(classes))[-1] * 10)
    class_to_idx = {c: i for i, c in enumerate(classes)}

    def write(tmp: Path, number: int) -> None:
        torch.save(model.state_dict(), tmp / "model.pth")
        write_json(tmp / "class_to_idx.json", class_to_idx)
        write_json(tmp / "model_config.json", make_model_config(
            "food", number, "mobilenet_v2", class_to_idx, PreprocessSpec(36, 32), topk=3))
        (tmp / "predictions.csv").write_text("path,true_label,predicted_label,confidence\n")

    version = create_version(root / "food", write)
    run = client.create_run(client.create_experiment("the-old-champion"))
    mv = register_version(MODEL, run.info.run_id, str(version), version, {"val_acc": 0.9},
                          client)
    assert promote_if_better(MODEL, int(mv.version), version).promoted


def retrain_args(tmp_path: Path, image_root: Path, url: str, *extra: str) -> list[str]:
    overrides = {**TINY, "data_dir": image_root, "artifacts_dir": tmp_path / "artifacts",
                 "checkpoint_dir": tmp_path / "checkpoints"}
    return ["retrain", "--config", str(REPO / "configs/sample.yaml"), "--feedback", url,
            *extra, *(f"--{k.replace('_', '-')}={v}" for k, v in overrides.items())]


def retrain_runs(client) -> list:
    experiment = client.get_experiment_by_name("nutrilearn-food-training")
    return client.search_runs([experiment.experiment_id], "attributes.run_name = 'retrain'",
                              order_by=["attributes.start_time ASC"])


def test_retrain_if_needed_skips_then_trains_on_feedback_and_promotes(
        tmp_path, tracking, image_root, capsys):
    client = tracking
    url = f"sqlite:///{tmp_path}/feedback.db"
    never_right_champion(client, tmp_path / "artifacts")
    when = ["--if-needed", "--min-new-labels", "10", "--max-age-days", "7"]

    confirm(url, tmp_path / "images", 4)
    assert cli_main(retrain_args(tmp_path, image_root, url, *when)) == 0
    out = capsys.readouterr().out
    assert out.startswith("no retrain:") and "4 new confirmed label(s)" in out and "< 10" in out
    assert not (tmp_path / "artifacts" / "food" / "v2").exists()

    confirm(url, tmp_path / "images", 16, start=4)
    assert cli_main(retrain_args(tmp_path, image_root, url, *when)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["promoted"] is True and summary["candidate"] == 2, summary
    assert "20 new confirmed label(s)" in summary["reason"]
    assert int(client.get_model_version_by_alias(MODEL, CHAMPION).version) == 2

    version_dir = Path(summary["version_dir"])
    evaluation = json.loads((version_dir / "evaluation.json").read_text())
    assert evaluation["num_samples"] > 0 and "top1" in evaluation  # the validation split
    feedback = evaluation["feedback"]
    assert 0 < feedback["num_samples"] < 20 and 0 <= feedback["top1"] <= 1
    trained_on = json.loads((version_dir / "model_config.json").read_text())["dataset"]
    assert trained_on["feedback"]["train"] + trained_on["feedback"]["eval"] == 20
    training_run = client.get_run(client.get_model_version(MODEL, "2").run_id)
    assert training_run.data.metrics["feedback_top1"] == pytest.approx(feedback["top1"])
    tags = client.get_model_version(MODEL, "2").tags
    assert float(tags["promotion_champion_accuracy"]) == 0.0
    assert float(tags["promotion_candidate_accuracy"]) > 0.0
    assert int(tags["promotion_eval_feedback_samples"]) == feedback["num_samples"]

    # right after a retrain nothing new has arrived: skip again
    assert cli_main(retrain_args(tmp_path, image_root, url, *when)) == 0
    assert "0 new confirmed label(s)" in capsys.readouterr().out
    runs = retrain_runs(client)
    assert [r.data.tags["retrain_decision"] for r in runs] == ["skip", "train", "skip"]
    assert runs[1].data.tags["promoted"] == "true" and runs[1].info.status == "FINISHED"
    assert runs[1].data.metrics["new_labels"] == 20

    # a champion (or last retrain) older than --max-age-days is reason enough on its own
    from datetime import datetime, timedelta, timezone

    from training.config import load_config
    from training.retrain import check

    config = load_config(REPO / "configs/sample.yaml",
                         {"data_dir": str(image_root), "feedback": url})
    later = datetime.now(timezone.utc) + timedelta(days=8)
    due = check(config, min_new_labels=10, max_age_days=7, client=client, now=later)
    assert due.needed and "days ago (>= 7)" in due.reason and due.new_labels == 0
    assert not check(config, 10, 9, client=client, now=later).needed
