"""Run every benchmark: ``python -m benchmarks [--quick] [--only NAME ...]``."""

from __future__ import annotations

from . import _threads  # noqa: F401  (before numpy)

import argparse
import importlib
import sys

BENCHMARKS = {
    "aggregation": "benchmarks.bench_aggregation",
    "clair": "benchmarks.bench_clair",
    "llm": "benchmarks.bench_llm",
    "scaling": "benchmarks.bench_scaling",
    "prelort": "benchmarks.bench_prelort",
    "workers": "benchmarks.bench_workers",
    "merge": "benchmarks.bench_merge",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these")
    args = parser.parse_args(argv)
    status = 0
    for name in args.only or BENCHMARKS:
        try:
            module = importlib.import_module(BENCHMARKS[name])
        except ModuleNotFoundError as exc:
            print(f"[{name}] skipped: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"\n== {name} ==", flush=True)
        status |= int(module.main(["--quick"] if args.quick else []) or 0)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
