"""Distributed training on CPU: two gloo processes on this machine, tiny models, tiny data.

The unit-level checks drive the engine's epoch and the DDP wrapping directly in processes
started by ``torch.multiprocessing.spawn``; the end-to-end ones run the real command under
``torchrun`` (``python -m torch.distributed.run``), as a user would.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from serving.launch import free_port
from training import distributed, engine
from training.config import ConfigError, TrainConfig, load_config
from training.data import eval_transform, load_splits, make_loader, train_transform
from training.evaluate import compute_report
from training.models import build_model
from training.sample_data import generate
from training.train import scaled_lr

REPO = Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = REPO / "configs" / "sample.yaml"
TINY = {"resize_size": 36, "crop_size": 32, "epochs": 3, "batch_size": 4, "workers": 0,
        "weights": "none", "freeze": "none", "lr": 0.003}
WORLD = 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """50 sample images (10 a class): 40 to train (20 a rank), 10 to validate."""
    root = tmp_path_factory.mktemp("ddp_data") / "sample"
    generate(root, examples_dir=root.parent / "examples", per_class=10, seed=3)
    return root


def _join(rank: int, port: int) -> distributed.Context:
    """What torchrun would put in a worker's environment, then the training's own setup."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    return distributed.setup("cpu")


def _spawn(worker, *args) -> None:
    mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD, join=True)


# ---------------------------------------------------------------- without processes
def test_one_process_is_the_plain_run(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = distributed.setup("cpu")
    assert (ctx.world_size, ctx.rank, ctx.backend, ctx.is_main) == (1, 0, None, True)
    assert not torch.distributed.is_initialized()
    model = nn.Linear(2, 2)
    assert distributed.wrap_model(model, ctx, sync_batchnorm=True) is model
    assert distributed.train_sampler(list(range(10)), ctx, seed=1) is None
    assert distributed.all_reduce_mean({"a": 1.5}) == {"a": 1.5}
    assert distributed.broadcast({"x": 1}) == {"x": 1}
    # rank 0 seeds like the single process did (seed + epoch); other ranks differ
    assert distributed.epoch_seed(42, 3, 0) == 45
    assert len({distributed.epoch_seed(42, e, r) for e in range(1, 50) for r in range(8)}) \
        == 49 * 8


def test_lr_scaling_rule_and_its_validation():
    assert scaled_lr(TrainConfig(lr=0.01, lr_scaling="none"), 4) == 0.01
    assert scaled_lr(TrainConfig(lr=0.01, lr_scaling="linear"), 4) == pytest.approx(0.04)
    assert scaled_lr(TrainConfig(lr=0.01, lr_scaling="linear"), 1) == 0.01
    with pytest.raises(ConfigError, match="lr_scaling='sqrt'"):
        load_config(None, {"lr_scaling": "sqrt", "data_dir": "."}, resume=True)


def test_sync_batchnorm_on_cpu_is_refused_with_the_fix():
    ctx = distributed.Context(device=torch.device("cpu"), rank=0, world_size=2,
                              backend="gloo")
    with pytest.raises(ConfigError, match="sync_batchnorm=false"):
        distributed.wrap_model(nn.Sequential(nn.BatchNorm1d(2)), ctx, sync_batchnorm=True)


def test_a_job_refuses_a_device_it_cannot_share(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="device='mps'"):
        distributed.setup("mps")


# ---------------------------------------------------------------- two spawned processes
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 2, 2, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(3)]


def _epoch(model, loader, config: TrainConfig) -> dict:
    """Three SGD steps through the engine's own epoch (grad clipping on, as configured)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return engine.train_one_epoch(model, loader, nn.CrossEntropyLoss(), opt, scaler,
                                  torch.device("cpu"), config, 1, progress=False)


def _step_worker(rank: int, port: int, out: str) -> None:
    ctx = _join(rank, port)
    model = _mlp()
    half = 8 // WORLD
    shard = [(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
             for x, y in _batches()]
    stats = distributed.all_reduce_mean(_epoch(distributed.wrap_model(model, ctx), shard,
                                               TrainConfig(grad_clip=0.5)))
    mean = distributed.all_reduce_mean({"rank": float(rank), "const": 2.0})
    torch.save({"state": model.state_dict(), "stats": stats, "mean": mean},
               Path(out) / f"rank{rank}.pt")
    distributed.cleanup()


def test_two_process_steps_equal_one_process_steps_on_the_concatenated_batch(tmp_path):
    _spawn(_step_worker, str(tmp_path))
    single = _mlp()
    initial = {k: v.clone() for k, v in single.state_dict().items()}
    stats = _epoch(single, _batches(), TrainConfig(grad_clip=0.5))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in single.state_dict().items():
            assert not torch.equal(value, initial[key]), key  # the steps moved it
            torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6)
        # per-rank means of equal shards, averaged = the mean over the whole batch
        assert got["stats"]["train_loss"] == pytest.approx(stats["train_loss"], rel=1e-5)
        assert got["stats"]["train_acc"] == pytest.approx(stats["train_acc"])
        assert got["mean"] == {"rank": 0.5, "const": 2.0}


def _mobilenet_worker(rank: int, port: int, data_dir: str, out: str) -> None:
    ctx = _join(rank, port)
    config = load_config(SAMPLE_CONFIG, {**TINY, "data_dir": data_dir})
    splits = load_splits(config)
    torch.manual_seed(100 + rank)  # different initial weights: DDP must make them one
    model = build_model("mobilenet_v2", len(splits.classes), weights="none")  # BN, dropout
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}
    sampler = distributed.train_sampler(splits.train, ctx, config.seed)
    sampler.set_epoch(1)
    torch.manual_seed(distributed.epoch_seed(config.seed, 1, rank))
    loader = make_loader(splits.train, train_transform(config.spec, config.random_crop_scale),
                         config.batch_size, 0, shuffle=True, sampler=sampler)
    ddp = distributed.wrap_model(model, ctx)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    engine.train_one_epoch(ddp, loader, nn.CrossEntropyLoss(), opt,
                           torch.amp.GradScaler("cpu", enabled=False), ctx.device, config, 1,
                           progress=False)
    torch.save({"params": {k: v.detach() for k, v in model.named_parameters()},
                "initial": initial, "indices": list(sampler), "steps": len(loader),
                "num_train": len(splits.train)}, Path(out) / f"rank{rank}.pt")
    distributed.cleanup()


def test_after_n_steps_both_ranks_hold_identical_parameters(data_root, tmp_path):
    _spawn(_mobilenet_worker, str(data_root), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["steps"] == r1["steps"] >= 4
    assert any(not torch.equal(r0["initial"][k], r1["initial"][k]) for k in r0["initial"])
    for key, value in r0["params"].items():
        assert torch.equal(value, r1["params"][key]), key
    assert any(not torch.equal(v, r0["initial"][k]) for k, v in r0["params"].items())
    # the DistributedSampler gave each rank its own half of the training set
    assert not set(r0["indices"]) & set(r1["indices"])
    assert sorted(r0["indices"] + r1["indices"]) == list(range(r0["num_train"]))


# ---------------------------------------------------------------- torchrun, end to end
def _torchrun(run_dir: Path, data_root: Path, *extra: str) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node=2 -m training train`` with its own MLflow
    store (sqlite) and artifact root under ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {
        **TINY, "data_dir": data_root, "artifacts_dir": run_dir / "artifacts",
        "checkpoint_dir": run_dir / "checkpoints"}.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir}/mlflow.db"}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={WORLD}", "-m", "training", "train", "--config",
         str(SAMPLE_CONFIG), *args, *extra],
        cwd=run_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]


@pytest.fixture(scope="module")
def full_run(data_root, tmp_path_factory) -> Path:
    """One uninterrupted 2-process run, 3 epochs."""
    run_dir = tmp_path_factory.mktemp("ddp_full")
    _finish(_torchrun(run_dir, data_root))
    return run_dir


def _runs(run_dir: Path) -> tuple[mlflow.MlflowClient, list]:
    client = mlflow.MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments)


def _versions(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "artifacts" / "food").glob("v*"))


def test_a_two_process_run_writes_one_version_and_one_mlflow_run(full_run):
    assert _versions(full_run) == ["v1"]
    client, runs = _runs(full_run)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    params = run.data.params
    assert (params["world_size"], params["global_batch_size"], params["batch_size"]) == \
        ("2", "8", "4")
    assert (params["lr_scaling"], params["optimizer_lr"]) == ("none", "0.003")
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "images_per_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == \
            [1, 2, 3], key  # logged once per epoch, not once per rank
    assert [int(v.version) for v in client.search_model_versions("name='food-classifier'")] \
        == [1]
    config = json.loads((full_run / "artifacts/food/v1/model_config.json").read_text())
    assert config["mlflow_run_id"] == run.info.run_id


def test_evaluation_equals_a_single_process_evaluation_of_the_same_weights(full_run,
                                                                          data_root):
    version = full_run / "artifacts" / "food" / "v1"
    config = load_config(SAMPLE_CONFIG, {**TINY, "data_dir": str(data_root)})
    splits = load_splits(config)
    model = build_model("mobilenet_v2", len(splits.classes), weights="none")
    model.load_state_dict(torch.load(version / "model.pth", weights_only=True))
    loader = make_loader(splits.val, eval_transform(config.spec), config.batch_size, 0,
                         shuffle=False)
    logits, labels = engine.run_inference(model, loader, torch.device("cpu"))
    report = compute_report(logits, labels, splits.classes)
    written = json.loads((version / "evaluation.json").read_text())
    assert written["num_samples"] == len(splits.val) == len(labels)  # no padded duplicates
    assert (written["top1"], written["top5"]) == (report["top1"], report["top5"])
    assert written["macro_f1"] == pytest.approx(report["macro_f1"])
    with open(version / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    predicted = [splits.classes[i] for i in logits.argmax(1)]
    assert [r["predicted_label"] for r in rows] == predicted


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(full_run, data_root,
                                                                      tmp_path):
    proc = _torchrun(tmp_path, data_root)
    ckpt = tmp_path / "checkpoints" / "food" / "last.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)  # into the next epoch
    job = psutil.Process(proc.pid)
    for p in [*job.children(recursive=True), job]:  # kill -9 the agent and both ranks
        p.kill()
    proc.communicate()
    assert engine.load_checkpoint(ckpt).epoch < TINY["epochs"], "the run ended before the kill"
    assert _versions(tmp_path) == []

    _finish(_torchrun(tmp_path, data_root, "--resume"))

    a = torch.load(full_run / "artifacts/food/v1/model.pth", weights_only=True)
    b = torch.load(tmp_path / "artifacts/food/v1/model.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (json.loads((d / "artifacts/food/v1/evaluation.json").read_text())
              for d in (full_run, tmp_path))
    assert ea == eb
    keys = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
    ha, hb = (engine.load_checkpoint(d / "checkpoints/food/last.pt").history
              for d in (full_run, tmp_path))
    assert [{k: h[k] for k in keys} for h in ha] == [{k: h[k] for k in keys} for h in hb]
    assert _versions(tmp_path) == ["v1"]
    client, runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resumed run is the same
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc")] == \
        [1, 2, 3]
