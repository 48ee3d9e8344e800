"""``python -m benchmarks --quick`` (``make bench``) or ``--full`` (``make bench-full``): the
engines, servers and training sections in one run, written to ``benchmarks/results/`` as
``<timestamp>.json``, ``.md`` and ``-serving.png``.

--quick: MobileNetV2 only; engines in process, our server (fp32 and best variant), stock
         TorchServe, TorchServe with our handler and the peers (PyTriton, LitServe), each
         HTTP point the median of 3 runs of 1.5 s; streams; 12 MP uploads. No training
         section, no tuning sweep (about 8 minutes on 2 cores; the first run also builds
         the model, the photo set and PyTriton's virtualenv).
--full: all three backbones, every server and variant, 5 s runs, 1080p uploads, the
        tuning sweep, and the training loop (run first: torch training after OpenVINO
        and the servers once crashed the harness at exit; about 40 minutes).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime, timezone

from benchmarks import bench_engines, bench_serving, bench_training, passive_openmp, report

SECTIONS = ("engines", "serving", "training")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_engines.add_common_args(p)
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="run only these sections (default: all; --quick leaves out training)")
    p.add_argument("--server", action="append", choices=bench_serving.SERVERS,
                   help="servers to measure (default: the quick or full set)")
    bench_serving.add_serving_args(p)
    args = p.parse_args(argv)
    passive_openmp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started, load_before = datetime.now(timezone.utc), os.getloadavg()
    only = args.only or [s for s in SECTIONS if s != "training" or not args.quick]
    sections = {}
    if "training" in only:
        sections["training"] = bench_training.run(args.quick, threads=args.threads)
    if "engines" in only:
        sections["engines"] = bench_engines.run(args.quick, threads=args.threads,
                                                trained=args.trained)
    if "serving" in only:
        sections["serving"] = bench_serving.run(args.quick, args.server, args.threads,
                                                repeats=args.repeats, phone=args.phone)
    paths = report.write_run(sections, args.out, args.quick, started, load_before)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
