"""The training recipe, top to bottom: data -> model -> loop -> best weights -> evaluation ->
model version -> MLflow registry. The per-epoch mechanics live in ``engine.py``.

Reproducibility: every epoch re-seeds torch and the loader's generator from ``seed + epoch``,
so an epoch's shuffling, augmentation and dropout depend only on the seed and the epoch.
That is what makes ``--resume`` exact: the checkpoint after epoch E plus epoch E+1's seed
replays the uninterrupted run bit for bit.

Under ``torchrun`` the same recipe runs on every rank (``distributed.py`` holds the
mechanics): each rank trains on its DistributedSampler share with its own epoch seed, the
gradients are averaged by DistributedDataParallel, the epoch's metrics are averaged over the
ranks, and rank 0 alone validates (on the full validation set, as a single process would),
checkpoints, logs to MLflow and writes the version. One process is exactly the plain run.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from serving.atomic import write_json
from training import distributed
from training.config import TrainConfig
from training.crashpoints import crash_point
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
    rng_state,
    run_inference,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    train_one_epoch,
    validate,
)
from training.evaluate import infer_samples, plot_training_curves, write_reports
from training.locks import exclusive
from training.models import build_model, check_arch, count_parameters
from training.tracking import Tracker, git_commit
from training.version import create_version, find_run_version, make_model_config

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- optimizer and schedule
def scaled_lr(config: TrainConfig, world_size: int) -> float:
    """The optimizer's LR for a job of ``world_size`` processes: ``lr`` is tuned for one
    process's ``batch_size``; ``lr_scaling=linear`` multiplies it by ``world_size`` for the
    ``world_size`` times larger global batch (Goyal et al., 2017), ``none`` keeps it."""
    return config.lr * world_size if config.lr_scaling == "linear" else config.lr


def make_optimizer(config: TrainConfig, params, lr: float | None = None
                   ) -> torch.optim.Optimizer:
    """The configured optimizer over the parameters left trainable by the freeze policy,
    at ``lr`` (default ``config.lr``)."""
    params = [p for p in params if p.requires_grad]
    lr = config.lr if lr is None else lr
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=True)
    return torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """Multiply the LR by ``lr_factor`` after ``lr_patience`` epochs without a lower val loss."""
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience)


# ---------------------------------------------------------------- the run
class RunConflict(RuntimeError):
    """The run cannot start: its checkpoint belongs to an unfinished or a finished run."""


def train(config: TrainConfig, resume: bool = False) -> Path | None:
    """Train per ``config``; returns the new version directory ``artifacts/<name>/v<N>``
    (None on the ranks other than 0 of a torchrun job: rank 0 writes the version).

    One run per name at a time: rank 0 holds the run's checkpoint directory for the whole
    run (:class:`~training.locks.Busy` if another process has it), and a new run refuses to
    replace the checkpoint of an unfinished one (:class:`RunConflict`)."""
    ckpt_file = checkpoint_path(config)
    if os.environ.get("RANK", "0") != "0":  # torchrun's other ranks: rank 0 holds the lock
        return _run(config, resume)
    with exclusive(ckpt_file.parent, f"another training run named {config.name!r}; wait for "
                   f"it to finish or give this run another --name", wait=0):
        if not resume and ckpt_file.is_file():
            previous = load_checkpoint(ckpt_file)
            if not previous.finished:
                raise RunConflict(
                    f"{ckpt_file} holds an unfinished run (stopped after epoch "
                    f"{previous.epoch} of {previous.config.get('epochs')}); continue it with "
                    f"--resume, give this run another --name, or delete {ckpt_file} to "
                    f"discard the unfinished one")
        return _run(config, resume)


def _run(config: TrainConfig, resume: bool) -> Path | None:
    """The run itself (see :func:`train`)."""
    ckpt_file = checkpoint_path(config)
    ckpt: Checkpoint | None = None
    if resume:
        ckpt = load_checkpoint(ckpt_file)
        if ckpt.finished:
            raise RunConflict(f"the run in {ckpt_file} already finished (it wrote "
                               f"{ckpt.version_dir}); start a new one without --resume")
        config = TrainConfig(**ckpt.config)  # the interrupted run's settings, exactly
        log.info("resuming %s after epoch %d", ckpt_file, ckpt.epoch)
    check_arch(config.arch)  # before any data is read: a typo costs one line, not a scan

    ctx = distributed.setup(config.device)  # one process, or one rank of a torchrun job
    device = ctx.device
    seed_everything(config.seed)
    with distributed.local_main_first(ctx):  # one download or scan per machine at a time
        splits: DataSplits = load_splits(config)
    log.info("data: %d train / %d val images, %d classes, %d skipped files", len(splits.train),
             len(splits.val), len(splits.classes), len(splits.skipped))

    model = build_model(config.arch, len(splits.classes), config.weights, config.freeze,
                        config.freeze_blocks, config.dropout).to(device)
    trainable, total = count_parameters(model)
    log.info("%s on %s: %d of %d parameters trainable", config.arch, device, trainable, total)
    # The job's model: gradients averaged over the ranks (``model`` itself in one process).
    # ``model`` stays the plain module: state_dict, validation and the version use it.
    ddp_model = distributed.wrap_model(model, ctx, config.sync_batchnorm)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    start_lr = scaled_lr(config, ctx.world_size)
    optimizer = make_optimizer(config, model.parameters(), start_lr)
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
        if stale >= config.early_stop_patience:  # decided before the interruption: stop
            log.info("early stopping had already ended this run after epoch %d", ckpt.epoch)
            start_epoch = config.epochs + 1
    run_id = (ckpt.run_id if ckpt else None) or uuid.uuid4().hex

    tracker = Tracker(config.experiment, run_id=ckpt.mlflow_run_id if ckpt else None,
                      enabled=ctx.is_main)
    if ckpt is None:
        tracker.log_params({**config.to_public_dict(), "num_classes": len(splits.classes),
                            "num_train": len(splits.train), "num_val": len(splits.val),
                            "device": str(device), "trainable_params": trainable,
                            "world_size": ctx.world_size,
                            "global_batch_size": config.batch_size * ctx.world_size,
                            "optimizer_lr": start_lr})

    loader_gen = torch.Generator()
    sampler = distributed.train_sampler(splits.train, ctx, config.seed)  # None in one process
    val_loader = make_loader(splits.val, eval_transform(config.spec), config.batch_size,
                             config.workers, shuffle=False)
    train_loader = make_loader(splits.train, train_transform(config.spec,
                                                             config.random_crop_scale),
                               config.batch_size, config.workers, shuffle=True,
                               generator=loader_gen, sampler=sampler)
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, config.epochs + 1):
            # An epoch's randomness depends on (seed, epoch, rank) only: that makes resume
            # exact. Rank 0 (and a single process) seeds with seed + epoch.
            epoch_seed = distributed.epoch_seed(config.seed, epoch, ctx.rank)
            torch.manual_seed(epoch_seed)
            loader_gen.manual_seed(epoch_seed)
            if sampler is not None:
                sampler.set_epoch(epoch)  # this epoch's shares: from seed + epoch
            stats = train_one_epoch(ddp_model, train_loader, criterion, optimizer, scaler,
                                    device, config, epoch, progress=ctx.is_main)
            stats = distributed.all_reduce_mean(stats)  # the job's numbers, on every rank
            stats["images_per_s"] *= ctx.world_size  # throughput of all ranks together
            # Rank 0 validates the full set, as one process would; every rank gets its
            # numbers, so the LR schedule and early stopping stay in step on all of them.
            val_stats = distributed.broadcast(
                validate(model, val_loader, criterion, device)[0] if ctx.is_main else None)
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
            if ctx.is_main:
                save_checkpoint(ckpt_file, Checkpoint(
                    config=config.to_dict(), epoch=epoch, model=model.state_dict(),
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    scaler=scaler.state_dict(), best_acc=best_acc, best_state=best_state,
                    stale_epochs=stale, history=history, train_time=train_time,
                    rng=rng_state(), mlflow_run_id=tracker.run_id, run_id=run_id))
            if stale >= config.early_stop_patience:
                log.info("early stopping: val_acc has not improved for %d epochs", stale)
                break
    except KeyboardInterrupt:
        log.warning("interrupted after epoch %d; continue with --resume", epoch - 1)
        tracker.end(status="KILLED")
        raise

    distributed.cleanup()  # the ranks finish together; rank 0 alone writes what follows
    if not ctx.is_main:
        return None
    model.load_state_dict(best_state)
    # A run killed after publishing its version, before the checkpoint below said so, finds
    # that version when resumed instead of writing a second one.
    version_dir = find_run_version(Path(config.artifacts_dir) / config.name, run_id)
    if version_dir is not None:
        log.warning("%s was already written by this run before it was interrupted; not "
                    "writing another (its MLflow registration may be incomplete: see "
                    "python -m training models)", version_dir)
    else:
        version_dir = _write_version(config, model, splits, val_loader, device, history,
                                     best_acc, train_time, tracker, run_id=run_id)
        crash_point("after_version_publish")  # test hook (training/crashpoints.py)
    # Mark the run finished (from the file: its model tensors are the last epoch's, and the
    # live model now holds the best weights), so --resume cannot write a second version.
    save_checkpoint(ckpt_file, dataclasses.replace(load_checkpoint(ckpt_file), finished=True,
                                                   version_dir=str(version_dir)))
    tracker.end()
    return version_dir


def _write_version(config: TrainConfig, model, splits: DataSplits, val_loader, device,
                   history: list[dict], best_acc: float, train_time: float,
                   tracker: Tracker, run_id: str | None = None) -> Path:
    """Evaluate the best weights and write them, with every report, as a new version."""
    logits, labels = run_inference(model, val_loader, device)
    # train --feedback: the feedback slice is scored apart from the validation split
    feedback = (splits.feedback_eval, *infer_samples(model, splits.feedback_eval, config.spec,
                                                     device, config.batch_size)
                ) if config.feedback else None
    model_cpu = copy.deepcopy(model).to("cpu")
    report: dict = {}

    def write(tmp: Path, number: int) -> None:
        torch.save(model_cpu.state_dict(), tmp / "model.pth")
        write_json(tmp / "class_to_idx.json", splits.class_to_idx)
        report.update(write_reports(tmp, splits.val, logits, labels, splits.classes,
                                    feedback))
        plot_training_curves(history, tmp / "training_curves.png")
        metrics = {"val_acc": best_acc, "top1": report["top1"], "top5": report["top5"],
                   "macro_f1": report["macro_f1"], "epochs_run": len(history),
                   "train_time_s": round(train_time, 2),
                   "train_images_per_s": round(float(np.median(
                       [h["images_per_s"] for h in history])), 1)}
        if "top1" in report.get("feedback", {}):
            metrics["feedback_top1"] = report["feedback"]["top1"]
        write_json(tmp / "model_config.json", make_model_config(
            config.name, number, config.arch, splits.class_to_idx, config.spec,
            topk=config.topk,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            dataset=dataset_summary(splits), weights=config.weights,
            metrics=metrics, mlflow_run_id=tracker.run_id, git_commit=git_commit(),
            skipped_files=splits.skipped, training=config.to_public_dict(),
            training_run_id=run_id))

    version_dir = create_version(Path(config.artifacts_dir) / config.name, write)
    log.info("wrote %s: val_acc %.4f top5 %.4f macro_f1 %.4f", version_dir, report["top1"],
             report["top5"], report["macro_f1"])
    feedback_report = report.get("feedback", {})
    tracker.log_metrics({"eval_top1": report["top1"], "eval_top5": report["top5"],
                         "eval_macro_f1": report["macro_f1"],
                         "training_time_s": train_time,
                         **{f"feedback_{k}": feedback_report[k] for k in ("top1", "num_samples")
                            if k in feedback_report}})
    tracker.set_tags({"version_dir": str(version_dir)})
    tracker.log_version_dir(version_dir)
    # registered, then promoted only if better than the champion on this version's own
    # evaluation set (validation split + feedback slice), the champion re-evaluated on it
    tracker.register(config.registered_model, version_dir,
                     {"val_acc": best_acc, "feedback_acc": feedback_report.get("top1")},
                     config.promote_min_gain, config.device)
    return version_dir

