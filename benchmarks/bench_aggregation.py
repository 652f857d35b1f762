r"""Aggregation benchmark: factored SVD (FlexLoRA's rule, ``aggregate("svd")``) vs the dense way.

Baseline ("dense FlexLoRA"): form every ``B_k A_k`` (d_out x d_in), sum with weights, full thin SVD.
Ours: ``aggregate("svd", pairs, weights)``, QR of the stacked factors and SVD of the small core.
Both in float32, one BLAS thread, on the same clients. Also: the 64-layer 7B-shaped model, and
zero_pad / stack times and result sizes.
"""

from __future__ import annotations

from . import _threads  # noqa: F401  (before numpy)

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from lowrank_fed import FactorPair, aggregate
from lowrank_fed.aggregation import aggregate_modules
from lowrank_fed.experiments.table import print_table

RANK_CYCLE = (4, 8, 16, 32, 64)
FLOOR_TARGET = 1.5  # the whole model against its float32 kernels, on the same workers


def make_layer(rng, d: int, n_clients: int, dtype=np.float32):
    ranks = [RANK_CYCLE[k % len(RANK_CYCLE)] for k in range(n_clients)]
    pairs = [
        FactorPair(rng.standard_normal((d, r), dtype=dtype) / math.sqrt(d), rng.standard_normal((r, d), dtype=dtype))
        for r in ranks
    ]
    weights = rng.integers(100, 1000, size=n_clients).astype(float)
    return pairs, weights


def dense_flexlora(pairs, weights):
    """The baseline: form each product, sum, full thin SVD."""
    p = np.asarray(weights) / np.sum(weights)
    total = np.zeros(pairs[0].shape, dtype=pairs[0].B.dtype)
    for pk, pair in zip(p, pairs, strict=True):
        total += np.float32(pk) * (pair.B @ pair.A)
    return np.linalg.svd(total, full_matrices=False)


def timed(fn, *args, repeats: int = 1, **kwargs):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return best, out


def model_time(d: int, n_layers: int, n_clients: int) -> tuple[float, float]:
    """Wall and CPU seconds of ``aggregate("svd")`` over every layer of a model, one after another."""
    rng = np.random.default_rng(1)
    layers = [make_layer(rng, d, n_clients) for _ in range(n_layers)]
    start, cpu = time.perf_counter(), time.process_time()
    for layer_pairs, layer_weights in layers:
        aggregate("svd", layer_pairs, layer_weights)
    return time.perf_counter() - start, time.process_time() - cpu


def model_time_parallel(d: int, n_layers: int, n_clients: int, workers: int) -> float:
    """Wall seconds of the whole model through ``aggregate_modules`` (``workers`` threads, 1 BLAS thread each)."""
    rng = np.random.default_rng(1)
    layers = [make_layer(rng, d, n_clients) for _ in range(n_layers)]
    modules = {f"layer{i}": pairs for i, (pairs, _) in enumerate(layers)}
    weights = {f"layer{i}": w for i, (_, w) in enumerate(layers)}
    start = time.perf_counter()
    aggregate_modules("svd", modules, weights, workers=workers)
    return time.perf_counter() - start


def floor_time_parallel(d: int, n_layers: int, n_clients: int, workers: int) -> float:
    r"""Wall seconds of the floor kernels (:func:`kernel_floor`'s) of every layer, run on ``workers`` threads.

    The same layers as :func:`model_time_parallel`, stacked beforehand (stacking is above the floor), through the
    same threads with one BLAS thread each: two float32 Grams, an ``R x R`` SVD and two ``d x R x R`` products a
    layer, with fresh outputs. So the floor shares the memory bandwidth as the aggregation does, which a sum
    of kernels timed alone does not.
    """
    from concurrent.futures import ThreadPoolExecutor

    from lowrank_fed.cholesky_qr import one_blas_thread

    rng = np.random.default_rng(1)
    layers = [make_layer(rng, d, n_clients)[0] for _ in range(n_layers)]
    stacked = [(np.concatenate([p.B for p in pairs], axis=1), np.concatenate([p.A for p in pairs], axis=0))
               for pairs in layers]
    R = stacked[0][0].shape[1]
    core = rng.standard_normal((R, R))
    T = rng.standard_normal((R, R), dtype=np.float32)

    def kernels(i: int):
        Bc, Ac = stacked[i]
        Bc.T @ Bc, Ac @ Ac.T, np.linalg.svd(core)
        return Bc @ T, T @ Ac

    with one_blas_thread(), ThreadPoolExecutor(workers) as pool:
        start = time.perf_counter()
        list(pool.map(kernels, range(n_layers)))
        return time.perf_counter() - start


def model_time_with_threads(threads: int, quick: bool) -> float:
    """:func:`model_time` in a fresh interpreter whose BLAS uses ``threads`` threads."""
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    cmd = [sys.executable, "-m", "benchmarks.bench_aggregation", "--model-only"] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["wall"])


def kernel_floor(d: int, R: int, repeats: int = 5) -> dict[str, float]:
    r"""Seconds of each float32 kernel one layer's ``aggregate("svd")`` cannot avoid, timed alone on one thread.

    For ``Bc`` (d x R) and ``Ac^T`` (d x R) any factored route needs their two Grams ``X^T X`` (or a QR of the
    same cost class), the SVD of the ``R x R`` core and the two ``d x R x R`` products that map the core's
    singular vectors back; in float32 that is the floor. Everything else (stacking, the Cholesky factors, the
    core product, the triangular solves, the float32 Gram's orthonormality probes, the signs, validation) is
    what lies above it.
    """
    rng = np.random.default_rng(2)
    X32 = rng.standard_normal((d, R), dtype=np.float32)
    core = rng.standard_normal((R, R))
    T32 = rng.standard_normal((R, R), dtype=np.float32)
    best = lambda fn: timed(fn, repeats=repeats)[0]  # noqa: E731
    return {
        "2 float32 Grams (d x R)": 2 * best(lambda: X32.T @ X32),
        "SVD (R x R, float64)": best(lambda: np.linalg.svd(core)),
        "2 float32 products (d x R x R)": 2 * best(lambda: X32 @ T32),
    }


def sizes(quick: bool) -> tuple[int, int, int]:
    """(d, layers, clients): d = 4096 and 64 layers (7B-shaped), or 1024 and 8 with ``--quick``."""
    return (1024, 8, 10) if quick else (4096, 64, 10)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="d = 1024 and 8 layers instead of 4096 and 64")
    parser.add_argument("--model-only", action="store_true", help="print the whole-model time as JSON and stop")
    args = parser.parse_args(argv)
    d, n_layers, K = sizes(args.quick)
    if args.model_only:
        wall, cpu = model_time(d, n_layers, K)
        print(json.dumps({"wall": wall, "cpu": cpu}))
        return 0
    rng = np.random.default_rng(0)
    pairs, weights = make_layer(rng, d, K)
    R = sum(pair.rank for pair in pairs)

    t_dense, (U0, S0, Vh0) = timed(dense_flexlora, pairs, weights)
    t_fact, out = timed(aggregate, "svd", pairs, weights, repeats=3)
    # Compare results: the reconstructed updates (formed here, outside the timing) and the spectra.
    dense_update = (U0[:, :R] * S0[:R]) @ Vh0[:R]
    rel_diff = float(np.abs(out.B @ out.A - dense_update).max() / np.abs(dense_update).max())
    s_ours = np.linalg.norm(out.B, axis=0) ** 2  # B = U sqrt(S): column norms^2 are S
    s_diff = float(np.abs(s_ours - S0[:R]).max() / S0[0])

    t_model, cpu_model = model_time(d, n_layers, K)
    t_model2 = model_time_with_threads(2, args.quick)
    workers = min(2, os.cpu_count() or 1)
    t_model_par = model_time_parallel(d, n_layers, K, workers)

    kernels = kernel_floor(d, R)
    floor_layer = sum(kernels.values())
    # The parallel floor: every layer's kernels run on the same workers (measured), and spread perfectly (ideal).
    floor_ideal = n_layers * floor_layer / workers
    floor_model = floor_time_parallel(d, n_layers, K, workers)

    t_zero, zp = timed(aggregate, "zero_pad", pairs, weights, repeats=3)
    t_stack, st = timed(aggregate, "stack", pairs, weights, repeats=3)
    size = lambda pair: pair.B.nbytes + pair.A.nbytes  # noqa: E731
    print_table(
        f"Aggregation, {d} x {d} layer, K = {K} clients, ranks cycling {RANK_CYCLE} (R = {R}), float32, "
        f"{os.environ['OMP_NUM_THREADS']} BLAS thread(s)",
        ["measure", "value"],
        [
            ["dense FlexLoRA (form, sum, full SVD) s", f"{t_dense:.3f}"],
            ["factored svd aggregation s", f"{t_fact:.4f}"],
            ["speed-up (dense / factored)", f"{t_dense / t_fact:.0f}x"],
            ["max rel. difference of B A (vs dense, top R)", f"{rel_diff:.1e}"],
            ["max rel. difference of singular values", f"{s_diff:.1e}"],
            [f"whole model, {n_layers} layers, factored svd s (wall / CPU)", f"{t_model:.2f} / {cpu_model:.2f}"],
            [f"whole model, {n_layers} layers, 2 BLAS threads s (wall)", f"{t_model2:.2f}"],
            [f"whole model, {n_layers} layers, aggregate_modules on {workers} threads s (wall; target <= 2 s)",
             f"{t_model_par:.2f} " + ("pass" if t_model_par <= 2.0 or args.quick else "FAIL")],
            *[[f"  floor kernel: {name} ms", f"{1e3 * t:.2f}"] for name, t in kernels.items()],
            ["floor, one layer (sum of the kernels) ms", f"{1e3 * floor_layer:.1f}"],
            ["one layer, factored svd / floor", f"{t_fact / floor_layer:.2f}x"],
            [f"whole model floor: the kernels of its {n_layers} layers run on {workers} workers s / spread perfectly "
             f"({n_layers} x one layer's / {workers}) s", f"{floor_model:.2f} / {floor_ideal:.2f}"],
            [f"whole model, aggregate_modules / floor on {workers} workers (target <= {FLOOR_TARGET}x) / ideal floor",
             f"{t_model_par / floor_model:.2f}x " + ("pass" if t_model_par / floor_model <= FLOOR_TARGET or args.quick
                                                     else "FAIL") + f" / {t_model_par / floor_ideal:.2f}x"],
            ["zero_pad s / result MB", f"{t_zero:.4f} / {size(zp) / 2**20:.2f}"],
            ["stack s / result MB", f"{t_stack:.4f} / {size(st) / 2**20:.2f}"],
            ["svd (exact) result MB", f"{size(out) / 2**20:.2f}"],
            ["dense d x d update MB", f"{d * d * 4 / 2**20:.2f}"],
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
