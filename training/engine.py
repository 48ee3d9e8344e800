"""The per-epoch mechanics under the recipe in ``train.py``: device, seeding, RNG state, one
training epoch, inference over a loader, and the resume checkpoint.

Nothing here decides *what* to train; ``train.py`` does, and reads top to bottom.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from serving.atomic import atomic_write
from training.config import TrainConfig


# ---------------------------------------------------------------- device and seeds
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
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global generator's state, in types ``torch.load(weights_only=True)`` accepts
    (NumPy's key array travels as a tensor)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ---------------------------------------------------------------- one epoch, one pass
def train_one_epoch(model: nn.Module, loader, criterion, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device, config: TrainConfig,
                    epoch: int, *, progress: bool = True) -> dict:
    """One pass over ``loader`` with gradient steps; loss, accuracy and speed of the epoch
    (``progress=False``: no progress bar, as on the ranks other than 0 of a job)."""
    model.train()
    use_amp = config.amp and device.type == "cuda"
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", unit="batch", leave=False,
               dynamic_ncols=True, disable=not progress)
    for x, y in bar:
        if len(x) == 0:  # every image of the batch failed to decode
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


@torch.no_grad()
def run_inference(model: nn.Module, loader, device: torch.device
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and true labels (N,) over a loader, model in eval mode."""
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        if len(x) == 0:
            continue
        logits.append(model(x.to(device, non_blocking=True)).float().cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def validate(model: nn.Module, loader, criterion, device: torch.device
             ) -> tuple[dict, np.ndarray, np.ndarray]:
    """Validation loss and accuracy, with the logits and labels they came from."""
    logits, labels = run_inference(model, loader, device)
    loss = criterion(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    return ({"val_loss": loss, "val_acc": float((logits.argmax(1) == labels).mean())},
            logits, labels)


# ---------------------------------------------------------------- the resume checkpoint
@dataclass
class Checkpoint:
    """Everything ``--resume`` needs to replay the rest of a run bit for bit.

    Written after every epoch; ``finished`` and ``version_dir`` are set once the run has
    written its model version, so a finished run is never resumed twice. ``run_id`` is
    written into that version too: a run killed between the two is recognised on resume.
    """

    config: dict  # TrainConfig.to_dict() of the run: a resumed run keeps its settings
    epoch: int  # the last completed epoch
    model: dict  # state_dicts, as the objects' own state_dict() returns them
    optimizer: dict
    scheduler: dict
    scaler: dict
    best_acc: float
    best_state: dict | None  # model weights at the best validation accuracy so far
    stale_epochs: int  # epochs since best_acc last improved (early stopping)
    history: list[dict]  # one row of metrics per epoch
    train_time: float  # seconds spent in training epochs
    rng: dict  # rng_state() after the epoch
    mlflow_run_id: str | None
    finished: bool = False
    version_dir: str | None = None
    run_id: str | None = None  # this run's id, also in its version's model_config.json

    def to_dict(self) -> dict:
        """Field name -> value, shallow (tensors are not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def checkpoint_path(config: TrainConfig) -> Path:
    """``<checkpoint_dir>/<name>/last.pt``: one resume checkpoint per model name."""
    return Path(config.checkpoint_dir) / config.name / "last.pt"


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write atomically: a kill -9 at any moment leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = checkpoint.to_dict()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint with ``weights_only=True`` (tensors and plain types, no pickle)."""
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: no checkpoint at {path}")
    return Checkpoint(**torch.load(path, map_location="cpu", weights_only=True))
