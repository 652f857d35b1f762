"""``python -m proofs_check [--quick] [--only NAME ...] [--out DIR]``."""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from lowrank_fed.experiments.table import print_table

from . import claims  # noqa: F401  (registers every claim)
from ._registry import CLAIMS, Context, checks_for, claim_names, run_claims


def markdown_table(records) -> str:
    """The README's "What is verified" table: claim, where it is checked, prediction, measured, tolerance."""
    cell = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| claim | checked in | prediction | measured | tolerance | result |", "|---|---|---|---|---|---|"]
    for r in records:
        module = CLAIMS[r.check].__module__.replace(".", "/") + ".py"
        lines.append(
            f"| {r.claim} | `{module}` | {cell(r.prediction)} | {r.measured:.4g} | {cell(r.tolerance)} | "
            f"{'pass' if r.passed else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proofs_check", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small grids: every claim in under 5 minutes")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"run only these claims (the README table's names): {', '.join(claim_names())}")
    parser.add_argument("--out", type=Path, default=Path("proofs_out"), help="folder for results.json and figures")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path, help="also write the results as a markdown table (for the README)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.only or []) - set(claim_names()) - set(CLAIMS))
    if unknown:
        parser.error(f"unknown claim(s) {unknown}; expected names from {claim_names()}")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records = run_claims(checks_for(args.only) if args.only else list(CLAIMS),
                         Context(quick=args.quick, out=args.out, seed=args.seed))
    if args.only:
        records = [r for r in records if r.claim in args.only or r.check in args.only]
    total = time.perf_counter() - start
    print_table(
        f"proofs_check ({'quick' if args.quick else 'full'}), {len(records)} checks, {total:.1f} s",
        ["claim", "prediction", "measured", "tolerance", "result", "s"],
        [
            [r.claim, r.prediction, f"{r.measured:.4g}", r.tolerance, "pass" if r.passed else "FAIL", f"{r.seconds:.1f}"]
            for r in records
        ],
    )
    payload = {"quick": args.quick, "seconds": total, "records": [r.to_json() for r in records]}
    (args.out / "results.json").write_text(json.dumps(payload, indent=2, default=float))
    if args.markdown:
        args.markdown.write_text(markdown_table(records))
    failed = [r.claim for r in records if not r.passed]
    for r in records:
        if not r.passed and "error" in r.details:
            print(f"\n{r.claim} raised:\n{r.details['traceback']}", file=sys.stderr)
    print(f"{len(records) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
