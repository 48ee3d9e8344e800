"""The training stage: backbones, data, config validation, the loop, resume, reports, MLflow."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.preprocess import PreprocessSpec
from training import engine
from training import train as train_mod
from training.cli import main as cli_main
from training.config import ConfigError, TrainConfig, load_config
from training.data import eval_transform, load_splits, train_transform
from training.evaluate import compute_report
from training.models import SUPPORTED_ARCHS, build_model, calibrate_batchnorm, check_arch
from training.sample_data import CLASSES, generate
from training.version import CONTRACT_FILES, load_version

TINY = {"resize_size": 36, "crop_size": 32, "epochs": 2, "batch_size": 8, "workers": 0,
        "weights": "none", "freeze": "none", "lr": 0.003}


@pytest.fixture(scope="session")
def image_root(tmp_path_factory) -> Path:
    """The sample generator at 6 images a class, plus two files that are not images."""
    root = tmp_path_factory.mktemp("data") / "sample"
    generate(root, examples_dir=root.parent / "examples", per_class=6, seed=1)
    (root / CLASSES[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / CLASSES[1] / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A private MLflow store per test (sqlite, MLflow 3's default kind)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    monkeypatch.chdir(tmp_path)  # artifact store (./mlruns) lands in tmp too
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


def tiny_config(tmp_path: Path, data: Path, **overrides) -> TrainConfig:
    values = {**TINY, "data_dir": str(data), "artifacts_dir": str(tmp_path / "artifacts"),
              "checkpoint_dir": str(tmp_path / "checkpoints"), **overrides}
    return load_config("configs/sample.yaml" if Path("configs/sample.yaml").exists()
                       else _repo() / "configs/sample.yaml", values)


def _repo() -> Path:
    return Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- backbones
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_output_dim_is_num_classes_with_dropout_head(arch):
    model = build_model(arch, 7, weights="none").eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    head = [m for m in model.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Linear))]
    assert isinstance(head[-2], torch.nn.Dropout) and head[-2].p == 0.2
    assert head[-1].out_features == 7


def test_freeze_policies():
    first = build_model("mobilenet_v2", 3, freeze="first_n_blocks", freeze_blocks=10)
    frozen = [all(not p.requires_grad for p in b.parameters()) for b in first.features]
    assert frozen[:10] == [True] * 10 and not any(frozen[10:])
    head_only = build_model("mobilenet_v2", 3, freeze="all_but_head")
    trainable = {n for n, p in head_only.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.") for n in trainable)


def test_imagenet_weights_offline_fail_with_a_fix(monkeypatch, tmp_path):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="--weights none") as e:
        build_model("mobilenet_v2", 3, weights="imagenet")
    assert "mobilenet_v2" in str(e.value) and str(tmp_path) in str(e.value)


def test_weights_from_a_state_dict_file(tmp_path):
    source = build_model("mobilenet_v2", 4)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    loaded = build_model("mobilenet_v2", 4, weights=str(tmp_path / "w.pth"))
    for a, b in zip(source.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_calibrate_batchnorm_averages_batches_and_skips_singletons():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(2))
    batches = [torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.tensor([[4.0, 5.0]]),
               torch.tensor([[6.0, 7.0], [8.0, 9.0], [10.0, 11.0]])]
    out = calibrate_batchnorm(model, batches)
    bn = model[0]
    assert out is model and not model.training
    # the plain average of the two usable batch means (momentum None), not a running EMA
    assert torch.allclose(bn.running_mean, torch.tensor([(1.0 + 8.0) / 2, (2.0 + 9.0) / 2]))
    assert int(bn.num_batches_tracked) == 2


# ---------------------------------------------------------------- data
@settings(max_examples=25, deadline=None)
@given(w=st.integers(10, 200), h=st.integers(10, 200), crop=st.integers(8, 48))
def test_train_and_val_tensors_are_crop_by_crop(w, h, crop):
    spec = PreprocessSpec(resize_size=crop + 8, crop_size=crop)
    img = Image.new("RGB", (w, h), (120, 60, 30))
    assert train_transform(spec)(img).shape == (3, crop, crop)
    assert eval_transform(spec)(img).shape == (3, crop, crop)


def test_split_is_stratified_seeded_and_skips_non_images(image_root, tmp_path):
    splits = load_splits(tiny_config(tmp_path, image_root))
    assert splits.classes == sorted(CLASSES)
    assert sorted(Path(p).name for p in splits.skipped) == ["broken.jpg", "notes.txt"]
    for i in range(len(CLASSES)):  # every class on both sides
        assert any(y == i for _, y in splits.train) and any(y == i for _, y in splits.val)
    assert len(splits.val) == len(CLASSES) * round(6 * 0.2)  # 6 images a class, 20% each
    again = load_splits(tiny_config(tmp_path, image_root))
    assert again.val == splits.val and not set(splits.train) & set(splits.val)


def test_extra_data_dir_merges_classes_into_one_bijection(image_root, tmp_path):
    extra = tmp_path / "indian"
    for name in ("biryani", "dosa", "pizza"):  # "pizza" joins the existing class
        (extra / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 40, 90, 10)).save(extra / name / f"{i}.jpg")
    splits = load_splits(tiny_config(tmp_path, image_root, extra_data_dir=str(extra)))
    assert splits.classes == sorted(CLASSES) + ["biryani", "dosa"]
    mapping = splits.class_to_idx
    assert sorted(mapping.values()) == list(range(len(mapping)))
    labels = {y for _, y in splits.train + splits.val}
    assert labels == set(range(len(mapping)))
    pizza_extra = [y for p, y in splits.train + splits.val if "/indian/pizza/" in p]
    assert pizza_extra and set(pizza_extra) == {mapping["pizza"]}


def test_food101_offline_says_how_to_fix(monkeypatch, tmp_path):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Dataset not found or corrupted")

    monkeypatch.setattr(torchvision.datasets, "Food101", offline)
    config = tiny_config(tmp_path, tmp_path, dataset="food101")
    with pytest.raises(RuntimeError, match="food-101"):
        load_splits(config)


# ---------------------------------------------------------------- config validation
@pytest.mark.parametrize("override,needle", [
    (["--arch", "resnet9000"], "resnet9000"),
    (["--lr", "0"], "lr=0"),
    (["--lr", "-1e-3"], "lr=-0.001"),
    (["--data-dir", "/no/such/dir"], "/no/such/dir"),
    (["--epochs", "three"], "three"),
    (["--optimiser", "adam"], "optimiser"),
])
def test_bad_config_is_one_line_and_exit_2(override, needle, capsys, image_root):
    code = cli_main(["train", "--config", str(_repo() / "configs/sample.yaml"),
                     "--data-dir", str(image_root), *override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and needle in err


def test_config_validation_does_not_import_torch():
    code = ("import sys; from training.config import load_config; "
            "load_config(None, {'arch': 'resnet18', 'data_dir': '.'}, resume=True); "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=_repo(), capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_any_torchvision_classifier_passes_the_arch_check():
    check_arch("resnet18")  # not in SUPPORTED_ARCHS, still a torchvision classifier
    with pytest.raises(ConfigError, match="resnet9000"):
        check_arch("resnet9000")


def test_class_with_one_image_is_refused(tmp_path):
    for name, n in (("a", 3), ("b", 1)):
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / "d" / name / f"{i}.png")
    with pytest.raises(ConfigError, match=r"b \(1\)"):
        tiny_config(tmp_path, tmp_path / "d")


# ---------------------------------------------------------------- loop mechanics
def test_lr_halves_after_a_plateau():
    config = TrainConfig()
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = train_mod.make_scheduler(config, opt)
    lrs = []
    for _ in range(6):
        sched.step(1.0)  # the loss never improves
        lrs.append(opt.param_groups[0]["lr"])
    # first step sets the best; 3 bad epochs are tolerated; the 4th bad one halves it
    assert lrs[:4] == [1e-3] * 4 and lrs[4] == pytest.approx(5e-4)


def test_early_stopping_after_patience_epochs(image_root, tmp_path, tracking, monkeypatch):
    def flat_validate(model, loader, criterion, device):
        logits, labels = train_mod.run_inference(model, loader, device)
        return {"val_loss": 1.0, "val_acc": 0.5}, logits, labels

    monkeypatch.setattr(train_mod, "validate", flat_validate)
    config = tiny_config(tmp_path, image_root, epochs=10, early_stop_patience=2)
    version = train_mod.train(config)
    history = load_version(version).config["metrics"]
    assert history["epochs_run"] == 3  # one improvement, then two without


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 8), st.integers(1, 60), st.integers(0, 10_000))
def test_confusion_matrix_is_c_by_c_and_sums_to_n(c, n, seed):
    rng = np.random.default_rng(seed)
    report = compute_report(rng.normal(size=(n, c)), rng.integers(0, c, n),
                            [f"k{i}" for i in range(c)])
    cm = np.array(report["confusion_matrix"])
    assert cm.shape == (c, c) and cm.sum() == n
    assert np.trace(cm) == round(report["accuracy"] * n)
    assert report["top5"] >= report["top1"]


# ---------------------------------------------------------------- end to end
def test_train_writes_versions_tracks_and_registers(image_root, tmp_path, tracking):
    config = tiny_config(tmp_path, image_root)
    v1 = train_mod.train(config)
    assert v1.name == "v1" and (v1.parent / "latest").resolve() == v1.resolve()
    for name in CONTRACT_FILES:
        assert (v1 / name).is_file(), name
    version = load_version(v1)
    cfg = version.config
    assert cfg["num_classes"] == len(CLASSES) and cfg["version"] == 1
    assert set(cfg["preprocessing"]) == {"resize_size", "crop_size", "mean", "std",
                                         "interpolation"}
    assert sorted(Path(p).name for p in cfg["skipped_files"]) == ["broken.jpg", "notes.txt"]
    state = torch.load(v1 / "model.pth", weights_only=True)
    assert state["classifier.1.weight"].shape[0] == len(CLASSES)
    evaluation = json.loads((v1 / "evaluation.json").read_text())
    assert np.array(evaluation["confusion_matrix"]).sum() == evaluation["num_samples"]

    client = mlflow.MlflowClient()
    run_id = cfg["mlflow_run_id"]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    assert client.get_run(run_id).data.params["arch"] == "mobilenet_v2"
    artifacts = {a.path for a in client.list_artifacts(run_id, "version")}
    assert {f"version/{n}" for n in CONTRACT_FILES} <= artifacts
    mv = client.get_model_version_by_alias("food-classifier", "champion")
    assert int(mv.version) == 1 and mv.run_id == run_id

    v2 = train_mod.train(config)
    assert v2.name == "v2" and (v2.parent / "latest").resolve() == v2.resolve()


def test_tracking_failure_does_not_stop_training(image_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus-scheme://nowhere")
    mlflow.set_tracking_uri("bogus-scheme://nowhere")
    caplog.set_level(logging.WARNING)
    try:
        version = train_mod.train(tiny_config(tmp_path, image_root, epochs=1))
    finally:
        mlflow.set_tracking_uri(None)
    assert (version / "model.pth").is_file()
    assert load_version(version).config["mlflow_run_id"] is None
    warnings = [r for r in caplog.records if "MLflow tracking disabled" in r.getMessage()]
    assert len(warnings) == 1


def test_resume_after_interrupt_matches_an_uninterrupted_run(image_root, tmp_path, tracking,
                                                             monkeypatch):
    full = train_mod.train(tiny_config(tmp_path / "a", image_root, epochs=3))

    real_epoch = train_mod.train_one_epoch

    def interrupt_in_epoch_3(*args, **kwargs):
        if args[-1] == 3:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    config = tiny_config(tmp_path / "b", image_root, epochs=3)
    monkeypatch.setattr(train_mod, "train_one_epoch", interrupt_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(config)
    assert not (tmp_path / "b" / "artifacts" / "food").exists() or \
        not list((tmp_path / "b" / "artifacts" / "food").glob("v*"))
    monkeypatch.setattr(train_mod, "train_one_epoch", real_epoch)
    resumed = train_mod.train(config, resume=True)

    a = torch.load(full / "model.pth", weights_only=True)
    b = torch.load(resumed / "model.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = load_version(full).config["metrics"], load_version(resumed).config["metrics"]
    assert ma["val_acc"] == mb["val_acc"] and ma["epochs_run"] == mb["epochs_run"] == 3
    with pytest.raises(RuntimeError, match="already finished"):
        train_mod.train(config, resume=True)

    # kill -9 of a real training process after its first checkpoint, then --resume
    killed = tmp_path / "c"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {
        **TINY, "epochs": 3, "data_dir": image_root, "artifacts_dir": killed / "artifacts",
        "checkpoint_dir": killed / "checkpoints"}.items()]
    proc = subprocess.Popen([sys.executable, "-m", "training", "train", "--config",
                             str(_repo() / "configs/sample.yaml"), *args], cwd=_repo(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "food" / "last.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert engine.load_checkpoint(ckpt).epoch < 3, "the run ended before the kill"
    assert cli_main(["train", "--config", str(_repo() / "configs/sample.yaml"), "--resume",
                     "--checkpoint-dir", str(killed / "checkpoints")]) == 0
    c = torch.load(killed / "artifacts" / "food" / "v1" / "model.pth", weights_only=True)
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_checkpoint_round_trip_restores_rng(tmp_path):
    engine.seed_everything(7)
    state = engine.Checkpoint(
        config=TrainConfig().to_dict(), epoch=1, model={"x": torch.arange(3)}, optimizer={},
        scheduler={}, scaler={}, best_acc=0.5, best_state=None, stale_epochs=0, history=[],
        train_time=0.0, rng=engine.rng_state(), mlflow_run_id=None)
    engine.save_checkpoint(tmp_path / "c.pt", state)
    expected = (torch.rand(2), np.random.rand(), __import__("random").random())
    engine.seed_everything(99)
    engine.set_rng_state(engine.load_checkpoint(tmp_path / "c.pt").rng)
    got = (torch.rand(2), np.random.rand(), __import__("random").random())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


def test_checkpoint_is_a_typed_record_written_atomically(tmp_path, monkeypatch):
    ckpt = engine.Checkpoint(
        config=TrainConfig().to_dict(), epoch=2, model={"w": torch.ones(2)}, optimizer={},
        scheduler={}, scaler={}, best_acc=0.5, best_state={"w": torch.zeros(2)},
        stale_epochs=1, history=[{"epoch": 1}, {"epoch": 2}], train_time=1.5,
        rng=engine.rng_state(), mlflow_run_id="abc")
    path = tmp_path / "run" / "last.pt"
    engine.save_checkpoint(path, ckpt)
    back = engine.load_checkpoint(path)
    assert isinstance(back, engine.Checkpoint) and back.epoch == 2 and not back.finished
    assert torch.equal(back.best_state["w"], torch.zeros(2)) and back.mlflow_run_id == "abc"

    def crash(obj, f):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        engine.save_checkpoint(path, ckpt)
    assert engine.load_checkpoint(path).epoch == 2  # the previous checkpoint is whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]


def test_predict_and_evaluate_commands(image_root, tmp_path, tracking, capsys):
    version = train_mod.train(tiny_config(tmp_path, image_root, epochs=1))
    example = image_root.parent / "examples" / "pizza.jpg"
    assert cli_main(["predict", str(example), "--model", str(version.parent / "latest"),
                     "--topk", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("pizza.jpg") and len(out) == 3
    probs = [float(line.split()[-1]) for line in out[1:]]
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)

    (version / "evaluation.json").unlink()
    assert cli_main(["evaluate", "--model", str(version)]) == 0
    assert json.loads((version / "evaluation.json").read_text())["num_samples"] > 0
    shutil.rmtree(version.parent)
