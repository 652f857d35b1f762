"""``lowrank-fed bench``: run ``benchmarks/`` of a source checkout (the folder is not installed).

The benchmarks run in a fresh interpreter so that BLAS is pinned to one thread before NumPy loads.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", nargs="+", help="aggregation, clair, llm")


def main(args: argparse.Namespace) -> int:
    if not (ROOT / "benchmarks" / "__main__.py").is_file():
        print("lowrank-fed bench: run it from a source checkout (benchmarks/ is not installed).", file=sys.stderr)
        return 2
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    cmd = [sys.executable, "-m", "benchmarks"] + (["--quick"] if args.quick else [])
    cmd += ["--only", *args.only] if args.only else []
    return subprocess.call(cmd, cwd=ROOT, env=env)
