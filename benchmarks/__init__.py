"""Latency and throughput of every engine and server, side by side (``python -m benchmarks``)."""

import os


def passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (unless the user chose otherwise).

    torch's GNU OpenMP pool spins at its barriers; when any other process wants one of the
    cores (the load generator, a server, a neighbour) a 2-thread MobileNetV2 call goes from
    ~25 ms to ~2 s on 2 cores. Must run before torch is first imported; the harness records
    the policy in every report, and TorchServe baselines get their own environment.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
