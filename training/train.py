"""The training recipe, top to bottom: data -> model -> loop -> best weights -> evaluation ->
model version -> MLflow registry. The per-epoch mechanics live in ``engine.py``.

Reproducibility: every epoch re-seeds torch and the loader's generator from ``seed + epoch``,
so an epoch's shuffling, augmentation and dropout depend only on the seed and the epoch.
That is what makes ``--resume`` exact: the checkpoint after epoch E plus epoch E+1's seed
replays the uninterrupted run bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from serving.atomic import write_json
from training.config import TrainConfig
from training.data import (
    DataSplits,
    dataset_summary,
    eval_transform,
    load_splits,
    make_loader,
    train_transform,
)
from training.engine import (
    Checkpoint,
    checkpoint_path,
    load_checkpoint,
    pick_device,
    rng_state,
    run_inference,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    train_one_epoch,
    validate,
)
from training.evaluate import plot_training_curves, write_reports
from training.models import build_model, check_arch, count_parameters
from training.tracking import Tracker, git_commit
from training.version import create_version, make_model_config

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- optimizer and schedule
def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters left trainable by the freeze policy."""
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


# ---------------------------------------------------------------- the run
def train(config: TrainConfig, resume: bool = False) -> Path:
    """Train per ``config``; returns the new version directory ``artifacts/<name>/v<N>``."""
    ckpt_file = checkpoint_path(config)
    ckpt: Checkpoint | None = None
    if resume:
        ckpt = load_checkpoint(ckpt_file)
        if ckpt.finished:
            raise RuntimeError(f"the run in {ckpt_file} already finished (it wrote "
                               f"{ckpt.version_dir}); start a new one without --resume")
        config = TrainConfig(**ckpt.config)  # the interrupted run's settings, exactly
        log.info("resuming %s after epoch %d", ckpt_file, ckpt.epoch)
    check_arch(config.arch)  # before any data is read: a typo costs one line, not a scan

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

    # The loop's state: fresh, or exactly where the interrupted run left it.
    start_epoch, best_acc, best_state, stale, history, train_time = 1, -1.0, None, 0, [], 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        scaler.load_state_dict(ckpt.scaler)
        start_epoch, best_acc, stale = ckpt.epoch + 1, ckpt.best_acc, ckpt.stale_epochs
        best_state, history, train_time = ckpt.best_state, ckpt.history, ckpt.train_time
        set_rng_state(ckpt.rng)

    tracker = Tracker(config.experiment, run_id=ckpt.mlflow_run_id if ckpt else None)
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
            # An epoch's randomness depends on (seed, epoch) only: that makes resume exact.
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
            save_checkpoint(ckpt_file, Checkpoint(
                config=config.to_dict(), epoch=epoch, model=model.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), best_acc=best_acc, best_state=best_state,
                stale_epochs=stale, history=history, train_time=train_time, rng=rng_state(),
                mlflow_run_id=tracker.run_id))
            if stale >= config.early_stop_patience:
                log.info("early stopping: val_acc has not improved for %d epochs", stale)
                break
    except KeyboardInterrupt:
        log.warning("interrupted after epoch %d; continue with --resume", epoch - 1)
        tracker.end(status="KILLED")
        raise

    model.load_state_dict(best_state)
    version_dir = _write_version(config, model, splits, val_loader, device, history,
                                 best_acc, train_time, tracker)
    # Mark the run finished (from the file: its model tensors are the last epoch's, and the
    # live model now holds the best weights), so --resume cannot write a second version.
    save_checkpoint(ckpt_file, dataclasses.replace(load_checkpoint(ckpt_file), finished=True,
                                                   version_dir=str(version_dir)))
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

