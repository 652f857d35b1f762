r"""CLAIR benchmark: the fast solver against CVXPY (SCS), and the per-layer time of a LoRA layer.

1. d = 500: regression-shaped updates ``Theta_k`` (p = 500, K = 20 blocks of width 10, shared rank 2,
   20% random attackers), base known, noiseless program at the default ``lam``. Two comparisons on
   the same instance:
   - the stated program on the uncompressed ``500 x 200`` stack: ``solve_admm`` vs ``solve_cvxpy``
     (SCS, ``eps_abs = eps_rel = 1e-7``);
   - end to end: ``clair(..., solver="admm")`` vs ``clair(..., solver="cvxpy")`` (both compress
     first, to the numerical rank of the stack: 42 x 200).
   Reported: seconds (ADMM: best of 5; CVXPY: one run, compile included, and SCS's own solve time),
   the ratio, and ``|obj_cvxpy - obj_admm| / obj_admm``.
2. d = 4096, K = 50 clients of LoRA rank 4 (a shared rank-4 subspace, 20% random attackers), from
   factor pairs: ``clair(pairs, rank=4)`` wall time per layer (best of 5 and median), on the exact
   instance (benign ``B_k`` in the subspace; the compressed problem is 44 x 200), noiseless program
   (ADMM), and on a full-rank one (5% off-subspace noise in every benign ``B_k``; 200 x 200) with the
   noiseless program (ADMM, timing only) and the noisy one (FISTA).

One BLAS thread (the variables are set before NumPy loads; threadpoolctl is used when installed).
Run: ``python -m benchmarks.bench_clair [--quick]`` or ``python benchmarks/bench_clair.py``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

try:  # pin BLAS even if NumPy was imported before this module
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
except ImportError:  # the environment variables above suffice when run as a script
    pass

from lowrank_fed.experiments.table import print_table  # noqa: E402
from lowrank_fed.linalg import sin_theta  # noqa: E402
from lowrank_fed.robust import (  # noqa: E402
    ClairWarning,
    clair,
    default_lam,
    solve_admm,
    solve_cvxpy,
    stack_dense,
)
from lowrank_fed.synthetic import make_lora_clients, make_regression_clients  # noqa: E402

SCS_EPS = 1e-7


def _times(fn, repeats: int):
    out, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, times


def bench_vs_cvxpy(quick: bool) -> list[list[str]]:
    """ADMM vs CVXPY (SCS) on one instance: the uncompressed program, then clair() end to end."""
    p, K, q, r = (100, 10, 5, 2) if quick else (500, 20, 10, 2)
    fed = make_regression_clients(K, p, q, r, noise=0.0, n_samples=1, contamination=0.2, attack="random",
                                  seed=0, base_known=True)
    thetas = fed.Theta
    lam = default_lam(r, K, 0.2)
    rows = []
    problem = stack_dense(thetas, base_known=True)
    fast, t_fast = _times(lambda: solve_admm(problem, lam, tol=1e-7), 5)
    start = time.perf_counter()
    ref = solve_cvxpy(problem, lam, solver="SCS", tol=SCS_EPS)
    t_ref = time.perf_counter() - start
    rows.append([
        f"program {p}x{K * q} (uncompressed)", f"{min(t_fast):.4f}", f"{t_ref:.2f}",
        f"{t_ref / min(t_fast):.0f}x", f"{abs(ref.objective - fast.objective) / fast.objective:.1e}",
        f"{fast.gap / fast.objective:.1e}", f"{ref.gap / ref.objective:.1e}", str(ref.converged),
    ])
    res_fast, t_fast = _times(lambda: clair(thetas, rank=r, lam=lam), 5)
    start = time.perf_counter()
    res_ref = clair(thetas, rank=r, lam=lam, solver="cvxpy", tol=SCS_EPS)
    t_ref = time.perf_counter() - start
    same = bool(np.array_equal(res_fast.collaborative, res_ref.collaborative))
    rows.append([
        "clair() end to end (compressed)", f"{min(t_fast):.4f}", f"{t_ref:.2f}",
        f"{t_ref / min(t_fast):.0f}x",
        f"{abs(res_ref.objective - res_fast.objective) / res_fast.objective:.1e}",
        f"{res_fast.gap / res_fast.objective:.1e}", f"{res_ref.gap / res_ref.objective:.1e}",
        f"{res_ref.converged}, same flags: {same}",
    ])
    return rows


def bench_lora_layer(quick: bool) -> list[list[str]]:
    """clair() per layer from factor pairs: d x d layer, K clients of rank 4, shared rank 4."""
    d, K, r = (1024, 20, 4) if quick else (4096, 50, 4)
    lam = default_lam(r, K, 0.2)
    rows = []
    for label, noise, program in (
        ("exact: benign B_k in the subspace, noiseless program (ADMM)", 0.0, {}),
        ("full rank: 5% benign noise, noiseless program (ADMM)*", 0.05, {}),
        ("full rank: 5% benign noise, noisy program (FISTA)", 0.05, {"alpha": None}),
    ):
        fed = make_lora_clients(K, d, d, r, contamination=0.2, attack="random", seed=1, noise=noise)
        kwargs = dict(rank=r, lam=lam)
        if "alpha" in program:
            # alpha from the benign noise: B_k carries noise 0.05 sqrt(r/d) per entry, A_k ~ N(0, 1/d).
            kwargs["noise"] = 0.05 * np.sqrt(r / d) * np.sqrt(r) / np.sqrt(d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ClairWarning)  # the starred row flags every client
            res, times = _times(lambda fed=fed, kwargs=kwargs: clair(fed.pairs, **kwargs), 5)
        flagged = ~res.collaborative
        hits = int(np.sum(flagged & fed.contaminated))
        detection = f"{hits / max(flagged.sum(), 1):.2f} / {hits / max(fed.contaminated.sum(), 1):.2f}"
        rows.append([
            label, f"{min(times):.3f}", f"{statistics.median(times):.3f}", str(res.n_iter),
            f"{res.gap / res.objective:.1e}", f"{sin_theta(res.subspace, fed.U):.1e}",
            "-" if label.endswith("*") else detection,
        ])
    return rows, (d, K, r)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_clair", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args(argv)
    rows = bench_vs_cvxpy(args.quick)
    print_table(
        "CLAIR: ADMM vs CVXPY (SCS, eps 1e-7) on the same instance, noiseless program, 1 thread",
        ["comparison", "ADMM s", "CVXPY s", "ratio", "obj rel diff", "ADMM gap", "CVXPY gap", "CVXPY ok"],
        rows,
    )
    rows, (d, K, r) = bench_lora_layer(args.quick)
    print_table(
        f"CLAIR per layer from factor pairs: {d} x {d}, K = {K}, rank {r} per client, 1 thread",
        ["instance", "best s", "median s", "iters", "rel gap", "sin_theta", "precision / recall"],
        rows,
    )
    print(
        "ratio = CVXPY wall time (compile + SCS) / ADMM best of 5.\n"
        "obj rel diff = |obj_cvxpy - obj_admm| / obj_admm, both objectives evaluated by\n"
        "lowrank_fed.robust.problem at a feasible point. Per-layer times are whole clair() calls\n"
        "(compression, solve, detection, refinement set-up; refined pairs are built on access).\n"
        "* timing only: the noiseless program's support flags every client of noisy data (use the noisy one)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
