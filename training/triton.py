"""A Triton Inference Server model repository for a version's ONNX export.

``write_triton_repo("artifacts/food/latest", "triton_repo")`` writes::

    triton_repo/food/config.pbtxt      platform onnxruntime_onnx, dynamic batching, CPU
                                       instances; input/output names, types and dims read
                                       from the ONNX graph itself
    triton_repo/food/labels.txt        one label per class index (the output's label_filename)
    triton_repo/food/<version>/model.onnx

Triton runs the graph only: clients send the preprocessed N x 3 x H x W FP32 tensor (the
version's preprocessing spec, ``serving.preprocess``), the same request our v2 server takes.
Torch-free: the model is read by ``serving.artifacts.read_model`` (a version directory,
``latest``, an ONNX ``.mar`` or a ``models:/`` URI), the graph by ``onnx``, and everything is
written through ``serving.atomic``.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from serving.artifacts import read_model
from serving.atomic import atomic_write_bytes, publish_dir, staging_dir

log = logging.getLogger(__name__)

LABELS_FILE = "labels.txt"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# ONNX TensorProto element type name -> Triton DataType (model_config.proto).
_TRITON_TYPES = {
    "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "DOUBLE": "TYPE_FP64",
    "BFLOAT16": "TYPE_BF16", "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING",
    "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
}


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as Triton sees it: name, Triton type, dims without batch."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def graph_tensors(model_bytes: bytes, where: str, batched: bool = True
                  ) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs of a serialized ONNX graph (initializers excluded), with the
    leading batch dimension dropped when ``batched``; a dynamic dimension is -1."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    initializers = {t.name for t in model.graph.initializer}

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        type_name = onnx.TensorProto.DataType.Name(tensor.elem_type)
        if type_name not in _TRITON_TYPES:
            raise ValueError(f"{where}: tensor {value.name!r} has type {type_name}, which "
                             f"Triton has no type for; allowed: {sorted(_TRITON_TYPES)}")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if batched:
            if not dims or dims[0] not in (-1, 0):
                raise ValueError(f"{where}: tensor {value.name!r} has shape {dims}, with no "
                                 f"dynamic batch dimension first; export with a dynamic batch "
                                 f"or pass max_batch_size=0")
            dims = dims[1:]
        return TensorSpec(value.name, _TRITON_TYPES[type_name], tuple(dims))

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [spec(v) for v in model.graph.output]
    return inputs, outputs


def config_pbtxt(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], *,
                 max_batch_size: int, max_queue_delay_us: int, instance_count: int,
                 threads: int | None, labels_for: str | None) -> str:
    """Triton's ``config.pbtxt`` (protobuf text format of ``inference.ModelConfig``)."""

    def tensor(t: TensorSpec, labels: bool) -> str:
        lines = [f'    name: "{t.name}"', f"    data_type: {t.data_type}",
                 f"    dims: [ {', '.join(str(d) for d in t.dims)} ]"]
        if labels:
            lines.append(f'    label_filename: "{LABELS_FILE}"')
        return "  {\n" + "\n".join(lines) + "\n  }"

    text = [f'name: "{name}"', 'platform: "onnxruntime_onnx"',
            f"max_batch_size: {max_batch_size}",
            "version_policy: { latest: { num_versions: 1 } }",
            "input [\n" + ",\n".join(tensor(t, False) for t in inputs) + "\n]",
            "output [\n" + ",\n".join(tensor(t, t.name == labels_for) for t in outputs) + "\n]"]
    if max_batch_size > 0:
        text.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: "
                    f"{max_queue_delay_us}\n}}")
    text.append(f"instance_group [\n  {{\n    count: {instance_count}\n    kind: KIND_CPU\n"
                f"  }}\n]")
    if threads is not None:
        # The onnxruntime backend's per-instance intra-op thread count.
        text.append('parameters {\n  key: "intra_op_thread_count"\n'
                    f'  value: {{ string_value: "{threads}" }}\n}}')
    return "\n".join(text) + "\n"


def write_triton_repo(model_dir: str | Path, out_dir: str | Path, name: str | None = None,
                      max_batch_size: int = 8, *, fmt: str = "onnx",
                      max_queue_delay_us: int = 5000, instance_count: int = 1,
                      threads: int | None = None) -> Path:
    """Add a model version's ONNX export (``fmt``: ``onnx`` or ``onnx_int8``) to the Triton
    repository ``out_dir``; returns the model's directory (``out_dir/<name>``).

    The version directory ``<name>/<version>/`` is staged and renamed into place; then
    ``config.pbtxt`` and ``labels.txt`` are replaced atomically to describe it (Triton serves
    the newest version only, per ``version_policy``). A version already in the repository, or
    older than its newest, is refused: Triton versions are immutable.
    """
    version = read_model(model_dir)
    number_text = str(version.version).removeprefix("v")
    if not number_text.isdigit() or int(number_text) < 1:
        raise ValueError(f"{version.source}: version {version.version!r} is not a positive "
                         f"integer, which Triton needs as the version directory name")
    number = int(number_text)
    name = name or version.name
    if not _NAME_RE.match(name):
        raise ValueError(f"model name {name!r} is not a valid Triton model directory name "
                         f"(letters, digits, '_', '.', '-')")
    if max_batch_size < 0 or instance_count < 1 or max_queue_delay_us < 0:
        raise ValueError(f"need max_batch_size >= 0 (got {max_batch_size}), instance_count >= "
                         f"1 (got {instance_count}), max_queue_delay_us >= 0 "
                         f"(got {max_queue_delay_us})")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    model_bytes = version.model_bytes(fmt)  # FileNotFoundError naming the export to run
    where = f"{version.source} ({fmt})"
    inputs, outputs = graph_tensors(model_bytes, where, batched=max_batch_size > 0)
    labels = version.labels
    classifier = next((o for o in outputs if o.dims and o.dims[-1] == len(labels)), None)
    if classifier is None:
        raise ValueError(f"{where}: no output has {len(labels)} classes in its last "
                         f"dimension (outputs: {outputs})")

    model_root = Path(out_dir) / name
    model_root.mkdir(parents=True, exist_ok=True)
    existing = sorted(int(p.name) for p in model_root.iterdir()
                      if p.is_dir() and p.name.isdigit())
    if existing and number <= existing[-1]:
        raise FileExistsError(f"{model_root} already holds version {existing[-1]}; Triton "
                              f"versions are immutable, so version {number} is not written "
                              f"(remove {model_root / str(number)} to replace it)")
    with staging_dir(model_root, str(number)) as tmp:
        (tmp / "model.onnx").write_bytes(model_bytes)
        publish_dir(tmp, model_root / str(number))
    atomic_write_bytes(model_root / LABELS_FILE, ("\n".join(labels) + "\n").encode())
    atomic_write_bytes(model_root / "config.pbtxt", config_pbtxt(
        name, inputs, outputs, max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us, instance_count=instance_count,
        threads=threads, labels_for=classifier.name).encode())
    log.info("wrote Triton model %s version %d to %s", name, number, model_root)
    return model_root


def triton_cli(args: argparse.Namespace) -> int:
    """Run after ``export``: write ``args.triton_repo`` if given; prints what it wrote."""
    if not getattr(args, "triton_repo", None):
        return 0
    try:
        root = write_triton_repo(args.model, args.triton_repo,
                                 max_batch_size=args.triton_max_batch_size)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: --triton-repo: {e}", file=sys.stderr)
        return 2
    print(f"wrote Triton model {root} ({root / 'config.pbtxt'})")
    return 0
