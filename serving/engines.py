"""Which engine runs a model's infer stage, at which precision: the variants of one model.

A variant is an (engine, precision) pair reading one of the version's ONNX files:

=====================  ==================  ==============================================
variant                reads               what runs
=====================  ==================  ==============================================
``onnxruntime-fp32``   ``model.onnx``      ONNX Runtime, float32: the reference, always on
``onnxruntime-int8``   ``model.int8.onnx`` ONNX Runtime, the static QDQ int8 model
``openvino-bf16``      ``model.onnx``      OpenVINO, bfloat16 inference (CPUs with bf16)
``openvino-int8``      ``model.int8.onnx`` OpenVINO, the same QDQ int8 model
=====================  ==================  ==============================================

``python -m training export --variants ...`` measures each against ``onnxruntime-fp32`` (top-1
agreement on the validation split, speed in process) and records those that reach
``--min-agreement`` in ``model_config.json`` under ``variants``. :func:`choose` picks, for a
server or a Predictor, the fastest recorded variant this machine can run, unless told which.
OpenVINO is optional (``pip install openvino``); without it its variants are skipped.
:func:`ort_session` is the one ONNX Runtime session builder (export's checks use it too).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

    from serving.artifacts import ModelArtifacts

log = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "openvino")
PRECISIONS = ("fp32", "bf16", "int8")
AUTO = "auto"


@dataclass(frozen=True)
class Variant:
    """One way to run the model: an engine at a precision, reading one model format."""

    engine: str
    precision: str

    @property
    def name(self) -> str:
        return f"{self.engine}-{self.precision}"

    @property
    def model_format(self) -> str:
        """The key of ``serving.artifacts.MODEL_FILES`` this variant reads."""
        return "onnx_int8" if self.precision == "int8" else "onnx"

    def __str__(self) -> str:
        return self.name


REFERENCE = Variant("onnxruntime", "fp32")
VARIANTS = (REFERENCE, Variant("onnxruntime", "int8"), Variant("openvino", "bf16"),
            Variant("openvino", "int8"))
BY_NAME = {v.name: v for v in VARIANTS}


def variant_named(name: str) -> Variant:
    """``"openvino-bf16"`` -> its Variant; ValueError naming the known ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(BY_NAME)}") from None


@functools.cache
def unavailable(variant: Variant) -> str | None:
    """Why ``variant`` cannot run on this machine (engine not installed, CPU without bf16),
    or None when it can."""
    if variant.engine == "onnxruntime":
        return None
    try:
        import openvino as ov
    except ImportError:
        return "OpenVINO is not installed (pip install openvino)"
    if variant.precision == "bf16":
        capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if "BF16" not in capabilities:
            return f"this CPU has no bf16 support (OpenVINO reports {', '.join(capabilities)})"
    return None


@dataclass
class Engine:
    """A compiled model: ``infer(N x 3 x H x W float32) -> N x C float32 logits``, safe to
    call from several threads at once, and the shapes it declares."""

    variant: Variant
    infer: Callable[[np.ndarray], np.ndarray]
    input_shape: Sequence
    output_shape: Sequence
    threads: int  # in all, over its streams
    streams: int = 1
    spinning: bool = False
    input_name: str = "input"
    output_name: str = "logits"
    session: object = None  # the ONNX Runtime session, for onnxruntime variants


def build(model: bytes, variant: Variant, threads: int, spinning: bool = False,
          streams: int = 1) -> Engine:
    """Compile ``model`` (the bytes of the variant's ONNX file) for ``variant``.

    ``threads`` is the total the engine may use; ``streams`` how many batches may run at
    once (each on threads // streams of them): with 2 streams of 1 thread, two batches run
    side by side instead of one batch on two threads. One stream is the default, as
    measured on 2 cores at 16 clients (benchmarks/README.md, streams): ONNX Runtime 2 x 1
    thread served 6-10 % more, but a lone request's inference then runs on one thread (p50
    at 1 client 13.2 ms against 10.5 in process); OpenVINO 11-21 % less.
    """
    if streams < 1 or threads < 1:
        raise ValueError(f"threads={threads}, streams={streams}: both must be >= 1")
    reason = unavailable(variant)
    if reason:
        raise RuntimeError(f"cannot run {variant}: {reason}")
    if variant.engine == "onnxruntime":
        return _onnxruntime(model, variant, threads, spinning, streams)
    return _openvino(model, variant, threads, streams)


def session_options(intra_op_threads: int, allow_spinning: bool = True) -> ort.SessionOptions:
    """ONNX Runtime options, chosen rather than defaulted.

    All graph optimizations (constant folding, conv+bn+relu fusion); one intra-op pool sized
    to the CPUs (a CNN has no parallel branches worth an inter-op pool); spinning threads
    cut latency when ORT owns the cores but burn them when other threads (the HTTP server's
    decode pool) need the same cores, so the server turns it off.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(intra_op_threads)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning",
                                  "1" if allow_spinning else "0")
    return opts


def ort_session(model: bytes | str | os.PathLike, threads: int,
                spinning: bool = False) -> ort.InferenceSession:
    """The one ONNX Runtime session builder (CPU): the model's bytes or file, our options."""
    import onnxruntime as ort

    return ort.InferenceSession(model if isinstance(model, bytes) else os.fspath(model),
                                sess_options=session_options(threads, spinning),
                                providers=["CPUExecutionProvider"])


def _onnxruntime(model: bytes, variant: Variant, threads: int, spinning: bool,
                 streams: int) -> Engine:
    # ORT runs concurrent run() calls of one session side by side; with one intra-op
    # thread each call computes on its caller's thread, so `streams` callers = streams.
    per_stream = max(1, threads // streams)
    session = ort_session(model, per_stream, spinning)
    model_input, model_output = session.get_inputs()[0], session.get_outputs()[0]
    input_name, output_name = model_input.name, model_output.name

    def infer(batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return session.run([output_name], {input_name: batch})[0]

    return Engine(variant, infer, model_input.shape, model_output.shape, per_stream * streams,
                  streams, spinning, input_name, output_name, session)


def _openvino(model: bytes, variant: Variant, threads: int, streams: int) -> Engine:
    import openvino as ov

    core = ov.Core()
    network = core.read_model(model)
    # bf16 on model.onnx; the int8 model keeps float32 for the parts between its QDQ pairs
    # (measured faster than bf16 there). LATENCY + explicit streams and threads: OpenVINO
    # would otherwise size both to the whole machine.
    hint = "bf16" if variant.precision == "bf16" else "f32"
    compiled = core.compile_model(network, "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": streams, "INFERENCE_NUM_THREADS": threads})
    local = threading.local()  # an infer request serves one thread at a time

    def infer(batch: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        return np.asarray(request.infer({0: batch})[0], dtype=np.float32)

    def dims(port) -> list:
        return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]

    return Engine(variant, infer, dims(network.inputs[0]), dims(network.outputs[0]),
                  threads, streams, False, network.inputs[0].any_name,
                  network.outputs[0].any_name)


@functools.cache
def cpu_model() -> str:
    """This machine's CPU model name (Linux ``/proc/cpuinfo``), else the platform's word."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def recorded(artifacts: ModelArtifacts) -> dict[str, dict]:
    """The variants the model's ``model_config.json`` records as passed (name -> agreement,
    speed-up), the reference always among them. A table measured on another export than
    the one read (a re-export still finishing) is ignored; one measured on another CPU
    model is used with a warning (its speed-ups may rank the variants differently here)."""
    table = artifacts.config.get("variants") or {}
    measured_on = table.get("export")
    if artifacts.files_dir is not None and measured_on not in (None, artifacts.files_dir.name):
        log.warning("%s: the variant table is for export %s, not %s; using %s only",
                    artifacts.source, measured_on, artifacts.files_dir.name, REFERENCE)
        table = {}
    if table.get("cpu") not in (None, cpu_model()):
        log.warning("%s: variant speed-ups were measured on %s, this host is %s; run "
                    "python -m training export --variants all here to measure them again",
                    artifacts.source, table["cpu"], cpu_model())
    return {REFERENCE.name: {"speedup": 1.0}} | {
        name: entry for name, entry in (table.get("passed") or {}).items() if name in BY_NAME}


def choose(artifacts: ModelArtifacts, engine: str = AUTO, precision: str = AUTO) -> Variant:
    """The variant to run: the one asked for, else the fastest recorded one this machine can
    run (largest recorded speed-up) whose model file is present.

    ``engine``/``precision`` narrow the choice (``auto``: any). ValueError when what is asked
    for was not recorded as passed, naming what is allowed."""
    if engine not in (AUTO, *ENGINES):
        raise ValueError(f"--engine {engine!r}; allowed: {AUTO}, {', '.join(ENGINES)}")
    if precision not in (AUTO, *PRECISIONS):
        raise ValueError(f"--precision {precision!r}; allowed: {AUTO}, {', '.join(PRECISIONS)}")
    passed, formats = recorded(artifacts), artifacts.formats
    wanted = [v for v in VARIANTS if engine in (AUTO, v.engine)
              and precision in (AUTO, v.precision)]
    if not wanted:
        raise ValueError(f"no variant runs {engine} at {precision}; known: "
                         f"{', '.join(BY_NAME)}")
    runnable = []
    for v in wanted:
        if v.name not in passed:
            why = "not validated by export (python -m training export --variants " + v.name + ")"
        elif v.model_format not in formats and v != REFERENCE:  # (the reader says why)
            why = f"its model file is missing ({v.model_format})"
        else:
            why = unavailable(v)
        if why is None:
            runnable.append(v)
        elif engine != AUTO and precision != AUTO:  # asked for this one exactly
            allowed = [n for n in passed if BY_NAME[n].model_format in formats]
            raise ValueError(f"variant {v} cannot be used: {why}; allowed for this model: "
                             f"{', '.join(allowed)}")
    if not runnable:
        raise ValueError(f"no variant for engine={engine} precision={precision} is validated "
                         f"and runnable here; recorded: {', '.join(passed)}")
    return max(runnable, key=lambda v: (float(passed[v.name].get("speedup", 0.0)),
                                        v == REFERENCE))


def images_per_second(infer: Callable[[np.ndarray], np.ndarray], batch: np.ndarray,
                      seconds: float = 1.0, repeats: int = 3) -> float:
    """Median images/s of ``infer(batch)`` over ``repeats`` blocks of about ``seconds``
    each, after one warm-up call."""
    infer(batch)
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            infer(batch)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / repeats and calls >= 2:
                break
        rates.append(calls * len(batch) / elapsed)
    return float(np.median(rates))
