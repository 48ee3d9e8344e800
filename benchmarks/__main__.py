"""``python -m benchmarks --quick`` (``make bench``) or ``--full`` (``make bench-full``): the
engines, servers and training sections in one run, written to ``benchmarks/results/`` as
``<timestamp>.json``, ``.md`` and ``-serving.png``.

--quick: MobileNetV2 only, short blocks, no TorchScript archive, no tuning sweep (about
         5 minutes on 2 cores, plus about 1 minute to build the model the first time).
--full: all three backbones, all five servers, longer blocks, the tuning sweep (~25 min).
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
                   help="run only these sections (default: all)")
    p.add_argument("--server", action="append", choices=bench_serving.SERVERS,
                   help="servers to measure (default: all)")
    args = p.parse_args(argv)
    passive_openmp()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started, load_before = datetime.now(timezone.utc), os.getloadavg()
    only = args.only or list(SECTIONS)
    sections = {}
    if "engines" in only:
        sections["engines"] = bench_engines.run(args.quick, threads=args.threads,
                                                trained=args.trained)
    if "serving" in only:
        sections["serving"] = bench_serving.run(args.quick, args.server, args.threads)
    if "training" in only:
        sections["training"] = bench_training.run(args.quick, threads=args.threads)
    paths = report.write_run(sections, args.out, args.quick, started, load_before)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
