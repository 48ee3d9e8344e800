"""Feedback as training data, promotion on the same evaluation set, promote/rollback/models.

The promotion tests use constant predictors (a mobilenet_v2 whose head has zero weights and a
one-hot bias) so every score is known exactly: a model that always answers "pizza" is right
on every pizza image and on nothing else, whatever the image looks like.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest
from conftest import jpeg_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.feedback import FeedbackStore
from training.cli import main as cli_main
from training.feedback_data import in_eval_slice, load_feedback
from training.registry import (
    CHAMPION,
    FEEDBACK_PREDICTIONS,
    champion_version,
    promote_if_better,
    register_version,
)

CLASSES = ["pizza", "salad", "sushi"]
MODEL = "food-classifier"


# ---------------------------------------------------------------- feedback as training data
@settings(max_examples=50, deadline=None)
@given(key=st.text(min_size=1, max_size=40), seed=st.integers(0, 2**31),
       fraction=st.floats(0, 0.99))
def test_eval_slice_membership_depends_only_on_key_seed_and_fraction(key, seed, fraction):
    assert in_eval_slice(key, seed, fraction) == in_eval_slice(key, seed, fraction)
    assert not in_eval_slice(key, seed, 0.0)
    if in_eval_slice(key, seed, fraction):  # a bigger slice keeps every member
        assert in_eval_slice(key, seed, min(0.99, fraction + 0.2))


def fill_store(url: str, images: Path, labels: list[str], *, stored: bool = True,
               seed: int = 0, new_class: bool = False) -> list[str]:
    """Log one prediction per label (with a distinct image) and confirm it."""
    ids = []
    with FeedbackStore(url, images_dir=images if stored else None) as store:
        store.register_model("food", "1", CLASSES)
        for i, label in enumerate(labels):
            answer = [{"label": "pizza", "probability": 0.6}, {"label": "salad",
                                                               "probability": 0.4}]
            ids.append(store.log_prediction("food", "1", answer,
                                            image=jpeg_bytes(40, 40, seed=seed * 1000 + i)))
        assert store.flush(30)
        for pid, label in zip(ids, labels):
            store.add_feedback(pid, label, allow_new_class=new_class)
    return ids


def test_feedback_split_is_seeded_disjoint_and_skips_what_cannot_be_trained(tmp_path):
    url = f"sqlite:///{tmp_path}/feedback.db"
    labels = [CLASSES[i % 3] for i in range(60)]
    fill_store(url, tmp_path / "images", labels)
    fill_store(url, tmp_path / "images", ["salad"] * 4, stored=False, seed=1)
    fill_store(url, tmp_path / "images", ["ramen"] * 3, seed=2, new_class=True)

    a = load_feedback(url, "food", CLASSES, seed=42, eval_fraction=0.25)
    assert a.skipped == {"no_image": 4, "missing_file": 0, "unknown_class": 3,
                         "over_source_cap": 0}
    assert a.classes == CLASSES
    assert len(a.train) + len(a.eval) == 60
    assert not {p for p, _ in a.train} & {p for p, _ in a.eval}
    assert 5 <= len(a.eval) <= 25  # about a quarter of 60
    for path, y in a.train + a.eval:
        assert Path(path).is_file() and 0 <= y < 3
    assert load_feedback(url, "food", CLASSES, seed=42, eval_fraction=0.25).eval == a.eval
    assert load_feedback(url, "food", CLASSES, seed=7, eval_fraction=0.25).eval != a.eval

    with_new = load_feedback(url, "food", CLASSES, seed=42, eval_fraction=0.25,
                             allow_new_classes=True)
    assert with_new.classes == CLASSES + ["ramen"]
    ramen = [y for _, y in with_new.train + with_new.eval if y == 3]
    assert len(ramen) == 3 and with_new.skipped["unknown_class"] == 0
    # more feedback later never moves an evaluation image to the training side
    fill_store(url, tmp_path / "images", labels[:30], seed=3)
    later = load_feedback(url, "food", CLASSES, seed=42, eval_fraction=0.25)
    assert set(a.eval) <= set(later.eval) and set(a.train) <= set(later.train)


# ---------------------------------------------------------------- promotion
@pytest.fixture
def tracking(tmp_path, monkeypatch) -> mlflow.MlflowClient:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(tmp_path)
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(None)


def constant_version(root: Path, answer: str, evaluated_on: dict[str, list[str]],
                     classes: list[str] = CLASSES, feedback: list[str] = ()) -> Path:
    """A version that always answers ``answer``, whose own evaluation set is
    ``evaluated_on`` (label -> image paths) plus a ``feedback`` slice of image paths."""
    import torch

    from serving.preprocess import PreprocessSpec
    from training.models import build_model
    from training.version import create_version, make_model_config, write_json

    model = build_model("mobilenet_v2", len(classes), weights="none").eval()
    head = model.classifier[-1]
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(classes.index(answer)),
                                                    len(classes)).float() * 10)
    class_to_idx = {c: i for i, c in enumerate(classes)}

    def predictions(path: Path, items: list[tuple[str, str]]) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "true_label", "predicted_label", "confidence"])
            w.writerows([p, label, answer, "1.0"] for p, label in items)

    def write(tmp: Path, number: int) -> None:
        torch.save(model.state_dict(), tmp / "model.pth")
        write_json(tmp / "class_to_idx.json", class_to_idx)
        write_json(tmp / "model_config.json", make_model_config(
            "food", number, "mobilenet_v2", class_to_idx, PreprocessSpec(36, 32), topk=3))
        predictions(tmp / "predictions.csv",
                    [(p, label) for label, paths in evaluated_on.items() for p in paths])
        if feedback:
            predictions(tmp / FEEDBACK_PREDICTIONS, [(p, "ramen") for p in feedback])

    return create_version(root / "food", write)


@pytest.fixture
def images(tmp_path) -> dict[str, list[str]]:
    out = {}
    for i, label in enumerate(CLASSES + ["ramen"]):
        (tmp_path / "img" / label).mkdir(parents=True)
        out[label] = []
        for j in range(4):
            p = tmp_path / "img" / label / f"{j}.jpg"
            p.write_bytes(jpeg_bytes(48, 40, seed=10 * i + j))
            out[label].append(str(p))
    return out


def register(client, version_dir: Path, val_acc: float) -> int:
    run = client.create_run(client.create_experiment(f"e-{version_dir.name}"))
    mv = register_version(MODEL, run.info.run_id, str(version_dir), version_dir,
                          {"val_acc": val_acc}, client)
    return int(mv.version)


def test_candidate_is_judged_on_its_own_set_against_the_reevaluated_champion(
        tmp_path, tracking, images):
    client = tracking
    artifacts = tmp_path / "artifacts"
    # v1 always says salad; on its own (all-salad) validation set it scored 1.0
    v1 = constant_version(artifacts, "salad", {"salad": images["salad"]})
    assert promote_if_better(MODEL, register(client, v1, 1.0), v1).promoted  # first: no champion

    # v2 always says pizza and was validated on pizza + sushi: 0.5 on its set, lower than v1's
    # recorded 1.0, yet on v2's set v1 scores 0.0, so v2 is better on the same images
    v2 = constant_version(artifacts, "pizza", {"pizza": images["pizza"],
                                               "sushi": images["sushi"]})
    d2 = promote_if_better(MODEL, register(client, v2, 0.5), v2)
    assert d2.promoted and d2.candidate_score["accuracy"] == 0.5
    assert d2.champion_score["accuracy"] == 0.0 and d2.champion == 1
    assert int(champion_version(MODEL, client).version) == 2

    # v3 always says sushi, recorded 0.99 on some other set; on v3's set (pizza + sushi, and a
    # feedback slice of "ramen", a class only v3 has) it ties v2: a tie keeps the champion
    v3 = constant_version(artifacts, "sushi", {"pizza": images["pizza"],
                                               "sushi": images["sushi"]},
                          classes=CLASSES + ["ramen"], feedback=images["ramen"][:2])
    d3 = promote_if_better(MODEL, register(client, v3, 0.99), v3)
    assert not d3.promoted and d3.champion == 2
    assert d3.candidate_score == {**d3.candidate_score, "accuracy": 4 / 10,
                                  "feedback_samples": 2, "feedback_accuracy": 0.0}
    assert d3.champion_score["accuracy"] == 4 / 10 and d3.champion_score["unknown_labels"] == 2
    assert int(champion_version(MODEL, client).version) == 2
    tags = client.get_model_version(MODEL, "3").tags
    assert tags["promotion_decision"] == "rejected"
    assert float(tags["promotion_candidate_accuracy"]) == float(
        tags["promotion_champion_accuracy"]) == 0.4
    assert tags["promotion_champion_version"] == "2" and "not better" in tags["promotion_reason"]

    # with a negative minimum gain, "not worse by more than 0.1" is enough
    v4 = constant_version(artifacts, "sushi", {"pizza": images["pizza"],
                                               "sushi": images["sushi"]})
    assert promote_if_better(MODEL, register(client, v4, 0.5), v4, min_gain=-0.1).promoted
    champ = champion_version(MODEL, client)
    assert int(champ.version) == 4 and champ.tags["champion_previous"] == "2"
    assert champ.tags["champion_by"] == "auto"


def test_promote_rollback_and_models_record_reasons(tmp_path, tracking, images, capsys):
    client = tracking
    for i, answer in enumerate(["salad", "pizza", "sushi"]):
        v = constant_version(tmp_path / "artifacts", answer, {answer: images[answer]})
        number = register(client, v, 0.5 + i / 10)
        if i == 0:
            promote_if_better(MODEL, number, v)

    assert cli_main(["promote", "--version", "3", "--reason", "canary looked good"]) == 0
    assert "champion is now v3 (was v1)" in capsys.readouterr().out
    assert int(client.get_model_version_by_alias(MODEL, CHAMPION).version) == 3
    tags = client.get_model_version(MODEL, "3").tags
    assert tags["champion_reason"] == "canary looked good" and tags["champion_by"] == "manual"
    assert "canary looked good" in client.get_registered_model(MODEL).tags["champion_change"]

    assert cli_main(["rollback", "--reason", "complaints about sushi"]) == 0
    assert "from v3 to v1" in capsys.readouterr().out
    assert int(client.get_model_version_by_alias(MODEL, CHAMPION).version) == 1
    assert "complaints about sushi" in client.get_model_version(MODEL, "3").tags["rolled_back"]
    assert client.get_model_version(MODEL, "1").tags["champion_by"] == "rollback"

    assert cli_main(["rollback", "--to", "2", "--reason", "try v2"]) == 0
    assert int(client.get_model_version_by_alias(MODEL, CHAMPION).version) == 2
    capsys.readouterr()

    assert cli_main(["promote", "--version", "9", "--reason", "x"]) == 2
    err = capsys.readouterr().err
    assert "no version 9" in err and "1, 2, 3" in err
    assert cli_main(["promote", "--version", "1", "--reason", " "]) == 2
    assert "reason" in capsys.readouterr().err
    assert int(client.get_model_version_by_alias(MODEL, CHAMPION).version) == 2

    assert cli_main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [(line[:2].strip(), int(line[2:].split()[0])) for line in lines[1:]
            if line[2:].split()[:1] and line[2:].split()[0].isdigit()]
    assert rows == [("", 3), ("*", 2), ("", 1)]
    assert any("try v2" in line for line in lines)
    assert cli_main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in listed] == [3, 2, 1]
    assert [r["champion"] for r in listed] == [False, True, False]
    assert [r["val_acc"] for r in listed] == pytest.approx([0.7, 0.6, 0.5])
