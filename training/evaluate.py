"""Evaluation reports: ``evaluation.json``, ``confusion_matrix.png``, ``training_curves.png``,
``predictions.csv``. Metrics come from scikit-learn; plots from matplotlib (headless).

A version trained with feedback is also scored on its feedback slice, apart from the
validation split: ``evaluation.json`` keeps the validation report at the top level and adds
it under ``"feedback"``, and ``feedback_predictions.csv`` lists those images."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from serving.atomic import atomic_write_bytes, write_json
from serving.predictor import softmax
from training.data import eval_transform, make_loader
from training.engine import pick_device, run_inference
from training.models import load_eager
from training.registry import FEEDBACK_PREDICTIONS
from training.version import load_version

log = logging.getLogger(__name__)

# Above this many classes the confusion-matrix plot shows the most-confused subset only.
MAX_PLOTTED_CLASSES = 25


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose true label is among the k highest logits."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def compute_report(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Top-1/top-5, macro and per-class precision/recall/F1, confusion matrix, best/worst."""
    preds = logits.argmax(axis=1)
    idx = list(range(len(classes)))
    p, r, f1, support = precision_recall_fscore_support(labels, preds, labels=idx,
                                                        zero_division=0)
    macro = precision_recall_fscore_support(labels, preds, labels=idx, average="macro",
                                            zero_division=0)
    per_class = {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]),
                     "support": int(support[i])} for i, c in enumerate(classes)}
    by_f1 = sorted(classes, key=lambda c: (-per_class[c]["f1"], c))
    return {
        "num_samples": len(labels),
        "accuracy": float((preds == labels).mean()),
        "top1": topk_accuracy(logits, labels, 1),
        "top5": topk_accuracy(logits, labels, 5),
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "per_class": per_class,
        "best_classes": by_f1[:5],
        "worst_classes": by_f1[::-1][:5],
        "confusion_matrix": confusion_matrix(labels, preds, labels=idx).tolist(),
    }


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_confusion_matrix(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """Row-normalized confusion matrix; with many classes, the most-confused subset."""
    cm = np.asarray(cm, dtype=float)
    keep = np.arange(len(classes))
    title = "Confusion matrix (row-normalized: recall on the diagonal)"
    if len(classes) > MAX_PLOTTED_CLASSES:
        errors = cm.sum(axis=1) - np.diag(cm) + cm.sum(axis=0) - np.diag(cm)
        keep = np.sort(np.argsort(-errors, kind="stable")[:MAX_PLOTTED_CLASSES])
        title += f"\n{MAX_PLOTTED_CLASSES} most-confused of {len(classes)} classes"
    sub = cm[np.ix_(keep, keep)]
    norm = sub / np.maximum(cm[keep].sum(axis=1, keepdims=True), 1)
    n = len(keep)
    size = max(5.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = [classes[i] for i in keep]
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save_figure(fig, path)


def plot_training_curves(history: list[dict], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        axes[0].plot(epochs, [h[key] for h in history], marker="o", label=label)
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        axes[1].plot(epochs, [h[key] for h in history], marker="o", label=label)
    axes[2].plot(epochs, [h["lr"] for h in history], marker="o")
    axes[2].set_yscale("log")
    for ax, title in zip(axes, ("loss", "accuracy", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    _save_figure(fig, path)


def write_predictions_csv(samples: list[tuple[str, int]], logits: np.ndarray,
                          classes: list[str], path: Path) -> None:
    """One row per validation image: path, true label, predicted label, confidence."""
    probs = softmax(logits)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true_label", "predicted_label", "confidence"])
    for (p, y), row in zip(samples, probs):
        k = int(row.argmax())
        w.writerow([p, classes[y], classes[k], f"{row[k]:.6f}"])
    atomic_write_bytes(path, buf.getvalue().encode())


def infer_samples(model, samples: list[tuple[str, int]], spec, device, batch_size: int = 64,
                  workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels of ``samples`` under the serving preprocessing (empty for none)."""
    if not samples:
        return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
    loader = make_loader(samples, eval_transform(spec), batch_size, workers, shuffle=False)
    return run_inference(model, loader, device)


def write_reports(out_dir: Path, samples: list[tuple[str, int]], logits: np.ndarray,
                  labels: np.ndarray, classes: list[str],
                  feedback: tuple[list, np.ndarray, np.ndarray] | None = None) -> dict:
    """Compute and write evaluation.json, confusion_matrix.png and predictions.csv; with
    ``feedback`` (samples, logits, labels of the feedback slice) also its report, apart."""
    report = compute_report(logits, labels, classes)
    if feedback is not None:
        fb_samples, fb_logits, fb_labels = feedback
        report["feedback"] = (compute_report(fb_logits, fb_labels, classes) if len(fb_samples)
                              else {"num_samples": 0})
        write_predictions_csv(fb_samples, fb_logits, classes, out_dir / FEEDBACK_PREDICTIONS)
    write_json(out_dir / "evaluation.json", report)
    plot_confusion_matrix(np.array(report["confusion_matrix"]), classes,
                          out_dir / "confusion_matrix.png")
    write_predictions_csv(samples, logits, classes, out_dir / "predictions.csv")
    return report


def evaluate_version(model_path: str | Path, device: str = "auto", batch_size: int = 64
                     ) -> dict:
    """Re-run evaluation of a version on its validation images and rewrite its reports."""
    version_dir = Path(model_path).resolve()
    version = load_version(version_dir)
    rows = version.validation_samples()  # predictions.csv, written by write_reports
    if not rows:
        raise FileNotFoundError(f"{version_dir}/predictions.csv lists no validation images; "
                                f"it is written by `python -m training train`")
    samples = [(p, version.class_to_idx[label]) for p, label in rows]
    model = load_eager(version)
    dev = pick_device(device)
    missing = [p for p, _ in samples if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} validation image(s) of {version_dir} are gone, "
                                f"e.g. {missing[0]}; regenerate or restore the dataset")
    loader = make_loader(samples, eval_transform(version.spec), batch_size, workers=0,
                         shuffle=False)
    logits, labels = run_inference(model.to(dev), loader, dev)
    feedback = None
    if (version_dir / FEEDBACK_PREDICTIONS).is_file():  # trained with feedback: its slice too
        with open(version_dir / FEEDBACK_PREDICTIONS, newline="") as f:
            rows = [(r["path"], version.class_to_idx[r["true_label"]]) for r in csv.DictReader(f)]
        fb = [(p, y) for p, y in rows if Path(p).is_file()]
        if len(fb) < len(rows):  # stored photos expire (the store's retention)
            log.warning("%d feedback image(s) of %s are gone; the feedback report covers the "
                        "%d left", len(rows) - len(fb), version_dir, len(fb))
        feedback = (fb, *infer_samples(model, fb, version.spec, dev, batch_size))
    report = write_reports(version_dir, samples, logits, labels, version.labels, feedback)
    log.info("evaluated %s: top1 %.4f on %d images", version_dir, report["top1"],
             report["num_samples"])
    return report
