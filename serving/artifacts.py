"""The one reader of a model: a version directory, a ``.mar`` or an MLflow URI -> one record.

``read_model(source)`` accepts ``artifacts/<model>/v<N>``, ``artifacts/<model>/latest``
(resolved once, then every file comes from the resolved directory), a TorchServe model
directory (an unpacked .mar), a ``.mar`` file (read as a zip, never extracted) or an MLflow
URI (``models:/food-classifier@champion``, ``runs:/<id>/version``). It returns a frozen
:class:`ModelArtifacts`: labels, preprocessing spec, default top-k, name, version, and the
model files present. The checks every loader needs live here too: labels form a bijection
onto ``0..C-1``, a loaded model's input and output fit ``model_config.json``, a ``.mar`` is
read under caps (member sizes, compression ratio, no duplicate names) and the thread count an
archive asks for is capped by the host's CPUs.

An exported version keeps its model files in one published directory named by its
``export`` link (``training.export`` swaps that link to publish a new export in one step);
the link is resolved once here, so ``model.ts`` and ``model.onnx`` always come from the same
export. ``models:/`` downloads go to a cache directory (``$FOOD_MODEL_CACHE``, default
``~/.cache/food-classifier/models``) that keeps the newest few and removes the rest.

Stdlib + numpy-free: the TorchServe .mar carries this module.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.atomic import STALE_PREFIX, clean_stale, fsync_dir, fsync_tree
from serving.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

# The k of a request that names none, when model_config.json has no "topk".
DEFAULT_TOPK = 3
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
# Model formats and the file each is stored in (version directory and .mar alike).
MODEL_FILES = {"onnx": "model.onnx", "onnx_int8": "model.int8.onnx", "torchscript": "model.ts"}
# The eager weights (state_dict) a version holds; training's reference "format".
EAGER_WEIGHTS = "model.pth"
# The link in a version directory naming its current export directory (training.export).
EXPORT_LINK = "export"

# What a .mar may hold before it is read: the model file under protobuf's 2 GiB limit, every
# other member (labels, configs, handler, serving modules) far smaller, a bounded number of
# members, and no member that inflates more than MAX_COMPRESSION_RATIO times (a zip bomb:
# 199 KB that inflates to 200 MB). Weights barely compress; JSON and code do, hence the floor.
MAX_MODEL_MEMBER_BYTES = 2 * 1024**3
MAX_OTHER_MEMBER_BYTES = 16 * 1024**2
MAX_MEMBERS = 1000
MAX_COMPRESSION_RATIO = 100
RATIO_FLOOR_BYTES = 1024**2  # members inflating to less than this skip the ratio check

MODEL_CACHE_ENV = "FOOD_MODEL_CACHE"
MODEL_CACHE_KEEP = 4  # models:/ downloads kept in the cache, newest first


def host_cpus() -> int:
    """CPUs this process may run on (taskset/cgroup affinity where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def cap_threads(requested: object, where: str) -> int | None:
    """A thread count a model file asks for, capped by the host's CPUs (None: not asked).

    The archive is data, not the operator: 512 threads on 2 CPUs would be taken as given.
    ValueError for anything but a positive integer."""
    if requested is None or requested == "":
        return None
    try:
        n = int(requested)
        if n != requested and str(n) != str(requested).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{where}: intra_op_threads={requested!r} is not an integer; "
                         f"allowed: 1..{host_cpus()}") from None
    if n < 1:
        raise ValueError(f"{where}: intra_op_threads={n}; allowed: 1..{host_cpus()}")
    if n > host_cpus():
        log.warning("%s asks for %d intra-op threads; this host has %d CPUs, using %d",
                    where, n, host_cpus(), host_cpus())
    return min(n, host_cpus())


def labels_from_class_to_idx(class_to_idx: dict[str, int]) -> list[str]:
    """``{"apple_pie": 0, ...}`` as the list of labels indexed by class id."""
    labels = sorted(class_to_idx, key=class_to_idx.__getitem__)
    if [class_to_idx[k] for k in labels] != list(range(len(labels))):
        raise ValueError("class_to_idx must map onto 0..C-1 exactly once each")
    return labels


@dataclass(frozen=True)
class ModelArtifacts:
    """One model version as read from its source: what it is and which model files it has."""

    name: str
    version: str
    arch: str | None
    num_classes: int
    labels: list[str]
    class_to_idx: dict[str, int]
    spec: PreprocessSpec
    default_topk: int
    config: dict
    source: str  # what the caller named: a path, a .mar, a models:/ URI
    path: Path  # the resolved version directory, the .mar file, or the MLflow download
    formats: tuple[str, ...]  # keys of MODEL_FILES present
    files_dir: Path | None = None  # where a directory's model files are (its export, resolved)

    @property
    def is_archive(self) -> bool:
        return self.path.is_file()

    def model_bytes(self, fmt: str = "onnx") -> bytes:
        """The serialized model of format ``fmt`` (a key of MODEL_FILES)."""
        name = MODEL_FILES[fmt]
        if fmt not in self.formats:
            if self.is_archive:
                hint = ("it is probably a TorchScript archive. Build one with python -m "
                        "training archive --format onnx, or serve this one with TorchServe"
                        if fmt == "onnx" else "build one with python -m training archive "
                        f"--format {fmt}")
                raise ValueError(f"{self.path} holds no {name}; {hint}")
            raise FileNotFoundError(f"{self.path} has no {name}; export it first: "
                                    f"python -m training export --model {self.path}")
        if self.is_archive:
            with _open_mar(self.path) as archive:
                return _read_member(archive, name, self.path)
        return self.model_file(fmt).read_bytes()

    def model_file(self, fmt: str) -> Path:
        """The file of format ``fmt`` in a version directory (its export resolved)."""
        if self.is_archive:
            raise ValueError(f"{self.path} is an archive; read it with model_bytes({fmt!r})")
        return (self.files_dir or self.path) / MODEL_FILES[fmt]

    def location(self, fmt: str) -> str:
        """Where the model file of format ``fmt`` is, for messages."""
        if fmt == "pytorch":
            return str(self.path / EAGER_WEIGHTS)
        name = MODEL_FILES[fmt]
        return f"{self.path}:{name}" if self.is_archive else str(self.model_file(fmt))

    def check_model_io(self, fmt: str, input_shape: Sequence, output_shape: Sequence) -> None:
        """Refuse a model whose input is not N x 3 x crop x crop or whose output is not
        N x num_classes; dynamic dimensions (names, None) pass."""
        where = self.location(fmt)
        c = self.spec.crop_size
        fixed = [d if isinstance(d, int) else None for d in input_shape]
        if len(fixed) != 4 or fixed[1] not in (3, None) or \
                any(d not in (c, None) for d in fixed[2:]):
            raise ValueError(f"{where}: input shape {list(input_shape)} does not take "
                             f"N x 3 x {c} x {c} images (crop_size={c} in model_config.json)")
        width = output_shape[-1] if len(output_shape) else None
        if isinstance(width, int) and width != self.num_classes:
            raise ValueError(f"{where}: output has {width} classes but model_config.json says "
                             f"num_classes={self.num_classes}")

    def validation_samples(self) -> list[tuple[str, str]]:
        """(image path, true label) of each row of the version's ``predictions.csv``."""
        text = self._read_text("predictions.csv")
        if text is None:
            return []
        return [(row["path"], row["true_label"]) for row in csv.DictReader(io.StringIO(text))]

    def _read_text(self, name: str) -> str | None:
        if self.is_archive:
            with _open_mar(self.path) as archive:
                if name not in archive.namelist():
                    return None
                return _read_member(archive, name, self.path).decode()
        file = self.path / name
        return file.read_text() if file.is_file() else None


def read_model(source: str | os.PathLike) -> ModelArtifacts:
    """Read a version directory, a ``.mar`` or an MLflow model URI (see the module doc)."""
    text = os.fspath(source)
    if text.startswith(URI_SCHEMES):
        return _read_dir(download_mlflow(text), text)
    path = Path(text)
    if path.is_dir():
        # `latest` is resolved once here, so a version published meanwhile cannot mix in.
        return _read_dir(Path(os.path.realpath(path)), text)
    if path.is_file():
        return _read_mar(path, text)
    raise FileNotFoundError(f"{text} does not exist; expected a version directory "
                            f"(artifacts/food/latest), a .mar file or a models:/ URI")


def _read_dir(path: Path, source: str) -> ModelArtifacts:
    config_file = path / "model_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{source} is not a model version (no model_config.json); train one with "
            f"`make train`, or point at artifacts/<model>/v<N>, artifacts/<model>/latest, "
            f"a .mar or a models:/ URI")
    files = {p.name for p in path.iterdir()}
    files_dir = None
    if EXPORT_LINK in files:
        # Resolved once: both model files come from this one published export directory.
        files_dir = Path(os.path.realpath(path / EXPORT_LINK))
        if not files_dir.is_dir():
            raise FileNotFoundError(f"{path / EXPORT_LINK} points at a missing export "
                                    f"({files_dir}); export again: python -m training export "
                                    f"--model {path}")
        models = {p.name for p in files_dir.iterdir()} & set(MODEL_FILES.values())
        files = (files - set(MODEL_FILES.values())) | models

    def read(name: str) -> bytes | None:
        return (path / name).read_bytes() if name in files else None

    return _record(source, path, read, files, files_dir)


def _open_mar(path: Path) -> zipfile.ZipFile:
    """Open a .mar and check its directory before anything is inflated: a bounded number of
    members, no duplicate names (which copy wins would depend on the unzip tool), no member
    over its size cap or compressed more than MAX_COMPRESSION_RATIO times."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a .mar (zip) file: {e}") from e
    try:
        infos = archive.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ValueError(f"{path} has {len(infos)} members; a .mar may have at most "
                             f"{MAX_MEMBERS}")
        seen: set[str] = set()
        for info in infos:
            key = posixpath.normpath(info.filename.replace("\\", "/")).lstrip("/")
            if key in seen:
                raise ValueError(f"{path} holds {info.filename!r} more than once; refusing an "
                                 f"archive whose duplicate members could be read either way")
            seen.add(key)
            cap = (MAX_MODEL_MEMBER_BYTES if info.filename in MODEL_FILES.values()
                   else MAX_OTHER_MEMBER_BYTES)
            if info.file_size > cap:
                raise ValueError(f"{path}: member {info.filename} inflates to "
                                 f"{info.file_size} bytes, over the cap of {cap}")
            if (info.file_size > RATIO_FLOOR_BYTES
                    and info.file_size > MAX_COMPRESSION_RATIO * max(1, info.compress_size)):
                raise ValueError(f"{path}: member {info.filename} inflates {info.compress_size} "
                                 f"bytes to {info.file_size}, more than "
                                 f"{MAX_COMPRESSION_RATIO}x (a zip bomb?)")
    except BaseException:
        archive.close()
        raise
    return archive


def _read_member(archive: zipfile.ZipFile, name: str, path: Path) -> bytes:
    """One member's bytes, never more than its checked declared size."""
    info = archive.getinfo(name)
    with archive.open(info) as f:
        data = f.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise ValueError(f"{path}: member {name} holds {len(data)} bytes, not the declared "
                         f"{info.file_size}")
    return data


def _read_mar(path: Path, source: str) -> ModelArtifacts:
    with _open_mar(path) as archive:
        files = set(archive.namelist())
        if "model_config.json" not in files:
            raise ValueError(f"{path} has no model_config.json (preprocessing spec)")

        def read(name: str) -> bytes | None:
            return _read_member(archive, name, path) if name in files else None

        return _record(source, path, read, files)


def _record(source: str, path: Path, read, files: set[str],
            files_dir: Path | None = None) -> ModelArtifacts:
    """The record from ``read(name) -> bytes | None`` over a directory's or a zip's files."""
    config = json.loads(read("model_config.json"))
    if not isinstance(config, dict):
        raise ValueError(f"{source}: model_config.json is not a JSON object")  # noqa: TRY004
    if "intra_op_threads" in config:
        config["intra_op_threads"] = cap_threads(config["intra_op_threads"],
                                                 f"{source}: model_config.json")
    if (raw := read("class_to_idx.json")) is not None:
        class_to_idx = json.loads(raw)
    elif (raw := read("index_to_name.json")) is not None:  # TorchServe's label file
        class_to_idx = {label: int(i) for i, label in json.loads(raw).items()}
    else:
        raise ValueError(f"{source} has neither class_to_idx.json nor index_to_name.json")
    try:
        labels = labels_from_class_to_idx(class_to_idx)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    num_classes = int(config.get("num_classes", len(labels)))
    if len(labels) != num_classes:
        raise ValueError(f"{source}: {len(labels)} labels but model_config.json says "
                         f"num_classes={num_classes}")
    return ModelArtifacts(
        name=str(config.get("name", "model")), version=str(config.get("version", "1")),
        arch=config.get("arch"), num_classes=num_classes, labels=labels,
        class_to_idx=class_to_idx, spec=PreprocessSpec.from_dict(config["preprocessing"]),
        default_topk=int(config.get("topk", DEFAULT_TOPK)), config=config, source=source,
        path=path, formats=tuple(f for f, name in MODEL_FILES.items() if name in files),
        files_dir=files_dir)


def model_cache_dir() -> Path:
    """Where ``models:/`` downloads go: ``$FOOD_MODEL_CACHE``, else the user's cache."""
    if os.environ.get(MODEL_CACHE_ENV):
        return Path(os.environ[MODEL_CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "food-classifier" / "models"


def prune_model_cache(cache: Path, keep: int = MODEL_CACHE_KEEP) -> list[Path]:
    """Remove interrupted downloads and all but the ``keep`` newest downloads."""
    removed = clean_stale(cache, older_than_s=3600.0)
    if cache.is_dir():
        done = sorted((p for p in cache.iterdir()
                       if p.is_dir() and not p.name.startswith(STALE_PREFIX)),
                      key=lambda p: p.stat().st_mtime, reverse=True)
        for old in done[keep:]:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def download_mlflow(uri: str, cache: Path | None = None) -> Path:
    """Download an MLflow model URI into the model cache, laid out like a version; the
    download lands in a temp directory renamed into place when complete, and the cache
    keeps only the newest MODEL_CACHE_KEEP downloads."""
    try:
        import mlflow.artifacts
    except ImportError as e:
        raise ImportError(
            f"loading {uri} needs MLflow: pip install mlflow-skinny (or point at a "
            f"version directory or .mar instead)") from e
    cache = Path(cache or model_cache_dir())
    cache.mkdir(parents=True, exist_ok=True)
    prune_model_cache(cache)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f"{STALE_PREFIX}download."))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        fsync_tree(tmp)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in uri)[:80]
        final = cache / f"{safe}-{time.time_ns()}"
        os.rename(tmp, final)
        fsync_dir(cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_model_cache(cache)
    return final / got.relative_to(tmp)
