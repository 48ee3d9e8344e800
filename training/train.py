"""The training recipe, top to bottom: data -> model -> loop -> best weights -> evaluation ->
model version -> MLflow registry.

Reproducibility: every epoch re-seeds torch and the loader's generator from ``seed + epoch``,
so an epoch's shuffling, augmentation and dropout depend only on the seed and the epoch.
That is what makes ``--resume`` exact: the checkpoint after epoch E plus epoch E+1's seed
replays the uninterrupted run bit for bit.
"""

from __future__ import annotations

import copy
import logging
import os
import random
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.config import TrainConfig
from training.data import (
    DataSplits,
    dataset_summary,
    eval_transform,
    load_splits,
    make_loader,
    train_transform,
)
from training.evaluate import plot_training_curves, run_inference, write_reports
from training.models import build_model, count_parameters
from training.tracking import Tracker
from training.version import create_version, make_model_config, write_json

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- setup helpers
def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is taken as given."""
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} asked for but CUDA is not available")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=True)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """Multiply the LR by ``lr_factor`` after ``lr_patience`` epochs without a lower val loss."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                             timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ---------------------------------------------------------------- checkpoints (resume state)
def checkpoint_path(config: TrainConfig) -> Path:
    return Path(config.checkpoint_dir) / config.name / "last.pt"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save to a temp file then rename: a kill -9 leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".last.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: no checkpoint at {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- one epoch
def train_one_epoch(model, loader, criterion, optimizer, scaler, device, config: TrainConfig,
                    epoch: int) -> dict:
    model.train()
    use_amp = config.amp and device.type == "cuda"
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False,
               dynamic_ncols=True)
    for x, y in bar:
        if len(x) == 0:
            continue
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
        elapsed = time.perf_counter() - start
        bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}",
                        img_s=f"{seen / max(elapsed, 1e-9):.0f}")
    elapsed = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
            "images_per_s": seen / max(elapsed, 1e-9), "epoch_time_s": elapsed}


def validate(model, loader, criterion, device) -> tuple[dict, np.ndarray, np.ndarray]:
    logits, labels = run_inference(model, loader, device)
    loss = criterion(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return ({"val_loss": loss, "val_acc": float((logits.argmax(1) == labels).mean())},
            logits, labels)


# ---------------------------------------------------------------- the run
def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train per ``config``; returns the new version directory ``artifacts/<name>/v<N>``."""
    ckpt_file = checkpoint_path(config)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_file)
        if ckpt["finished"]:
            raise RuntimeError(f"the run in {ckpt_file} already finished (it wrote "
                               f"{ckpt.get('version_dir')}); start a new one without --resume")
        config = TrainConfig(**ckpt["config"])  # the interrupted run's settings, exactly
        log.info("resuming %s after epoch %d", ckpt_file, ckpt["epoch"])

    device = pick_device(config.device)
    seed_everything(config.seed)
    splits: DataSplits = load_splits(config)
    log.info("data: %d train / %d val images, %d classes, %d skipped files", len(splits.train),
             len(splits.val), len(splits.classes), len(splits.skipped))

    model = build_model(config.arch, len(splits.classes), config.weights, config.freeze,
                        config.freeze_blocks, config.dropout).to(device)
    trainable, total = count_parameters(model)
    log.info("%s on %s: %d of %d parameters trainable", config.arch, device, trainable, total)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    optimizer = make_optimizer(config, model.parameters())
    scheduler = make_scheduler(config, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp and device.type == "cuda")

    start_epoch, best_acc, best_state, stale, history = 1, -1.0, None, 0, []
    train_time = 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, best_acc, stale = ckpt["epoch"] + 1, ckpt["best_acc"], ckpt["stale_epochs"]
        best_state, history, train_time = ckpt["best_state"], ckpt["history"], ckpt["train_time"]
        set_rng_state(ckpt["rng"])

    tracker = Tracker(config.experiment, run_id=ckpt["mlflow_run_id"] if ckpt else None)
    if ckpt is None:
        tracker.log_params({**config.to_dict(), "num_classes": len(splits.classes),
                            "num_train": len(splits.train), "num_val": len(splits.val),
                            "device": str(device), "trainable_params": trainable})

    loader_gen = torch.Generator()
    val_loader = make_loader(splits.val, eval_transform(config.spec), config.batch_size,
                             config.workers, shuffle=False)
    train_loader = make_loader(splits.train, train_transform(config.spec,
                                                             config.random_crop_scale),
                               config.batch_size, config.workers, shuffle=True,
                               generator=loader_gen)
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            torch.manual_seed(config.seed + epoch)
            loader_gen.manual_seed(config.seed + epoch)
            stats = train_one_epoch(model, train_loader, criterion, optimizer, scaler, device,
                                    config, epoch)
            val_stats, _, _ = validate(model, val_loader, criterion, device)
            train_time += stats["epoch_time_s"]
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step(val_stats["val_loss"])
            row = {"epoch": epoch, **stats, **val_stats, "lr": lr}
            history.append(row)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            if val_stats["val_acc"] > best_acc:
                best_acc, stale = val_stats["val_acc"], 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            log.info("epoch %d/%d  train_loss %.4f acc %.4f  val_loss %.4f acc %.4f  lr %.2g"
                     "  %.0f img/s", epoch, config.epochs, row["train_loss"], row["train_acc"],
                     row["val_loss"], row["val_acc"], lr, row["images_per_s"])
            stop = stale >= config.early_stop_patience
            save_checkpoint(ckpt_file, {
                "config": config.to_dict(), "epoch": epoch, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "best_acc": best_acc, "best_state": best_state,
                "stale_epochs": stale, "history": history, "train_time": train_time,
                "rng": rng_state(), "mlflow_run_id": tracker.run_id, "finished": False})
            if stop:
                log.info("early stopping: val_acc has not improved for %d epochs", stale)
                break
    except KeyboardInterrupt:
        log.warning("interrupted after epoch %d; continue with --resume", epoch - 1)
        tracker.end(status="KILLED")
        raise

    model.load_state_dict(best_state)
    version_dir = _write_version(config, model, splits, val_loader, device, history,
                                 best_acc, train_time, tracker)
    ckpt_state = load_checkpoint(ckpt_file)
    ckpt_state.update(finished=True, version_dir=str(version_dir))
    save_checkpoint(ckpt_file, ckpt_state)
    tracker.end()
    return version_dir


def _write_version(config: TrainConfig, model, splits: DataSplits, val_loader, device,
                   history: list[dict], best_acc: float, train_time: float,
                   tracker: Tracker) -> Path:
    """Evaluate the best weights and write them, with every report, as a new version."""
    logits, labels = run_inference(model, val_loader, device)
    model_cpu = copy.deepcopy(model).to("cpu")
    report: dict = {}

    def write(tmp: Path, number: int) -> None:
        torch.save(model_cpu.state_dict(), tmp / "model.pth")
        write_json(tmp / "class_to_idx.json", splits.class_to_idx)
        report.update(write_reports(tmp, splits.val, logits, labels, splits.classes))
        plot_training_curves(history, tmp / "training_curves.png")
        metrics = {"val_acc": best_acc, "top1": report["top1"], "top5": report["top5"],
                   "macro_f1": report["macro_f1"], "epochs_run": len(history),
                   "train_time_s": round(train_time, 2),
                   "train_images_per_s": round(float(np.median(
                       [h["images_per_s"] for h in history])), 1)}
        write_json(tmp / "model_config.json", make_model_config(
            config.name, number, config.arch, splits.class_to_idx, config.spec,
            topk=config.topk,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            dataset=dataset_summary(splits), weights=config.weights,
            metrics=metrics, mlflow_run_id=tracker.run_id, git_commit=git_commit(),
            skipped_files=splits.skipped, training=config.to_dict()))

    version_dir = create_version(Path(config.artifacts_dir) / config.name, write)
    number = int(version_dir.name[1:])
    log.info("wrote %s: val_acc %.4f top5 %.4f macro_f1 %.4f", version_dir, report["top1"],
             report["top5"], report["macro_f1"])
    tracker.log_metrics({"eval_top1": report["top1"], "eval_top5": report["top5"],
                         "eval_macro_f1": report["macro_f1"],
                         "training_time_s": train_time})
    tracker.set_tags({"version_dir": str(version_dir)})
    tracker.log_version_dir(version_dir)
    tracker.register(config.registered_model, number, best_acc)
    return version_dir

