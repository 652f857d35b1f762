r"""``lowrank-fed recover``: one synthetic CLAIR recovery experiment, as a table (and a plot).

A regression federation (:func:`lowrank_fed.synthetic.make_regression_clients`) is fitted locally
by OLS; CLAIR (:func:`lowrank_fed.robust.clair`, base unknown) recovers the subspace, flags clients
and refines. Reported, over the benign clients ``G``:

.. math::

    \mathrm{err}(\hat\Theta) = \frac{1}{|G|} \sum_{k \in G} \|\hat\Theta_k - \Theta_k\|_F^2

for CLAIR's refinement, the local OLS estimates, FedAvg (the sample-size weighted mean of all local
estimates, contaminated ones included, given to everyone) and the oracle refinement
``P_U Theta_hat_k + (I - P_U) mean_G Theta_hat_j`` (true ``U`` and ``G``), next to the oracle formula
``sigma_e^2 q (r + (p - r) / |G|)`` with ``sigma_e^2 = noise^2 / (n - p - 1)`` the per-entry
variance of an OLS estimate (docs/methods.md#refinement). Also: ``sin_theta`` of the subspace,
precision and recall of the flagged set, solver time and relative duality gap.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from ..linalg import sin_theta
from ..robust import clair
from ..synthetic import ATTACKS, local_estimates, make_regression_clients

__all__ = ["add_arguments", "main", "run_recovery", "RecoveryReport", "plot_block_norms"]


@dataclass(frozen=True)
class RecoveryReport:
    """The numbers of one recovery experiment (see the module docstring)."""

    sin_theta: float
    precision: float
    recall: float
    n_flagged: int
    n_contaminated: int
    err_clair: float
    err_local: float
    err_fedavg: float
    err_oracle: float
    err_formula: float
    rank: int
    lam: float
    seconds: float
    rel_gap: float
    n_iter: int
    converged: bool
    program: str


def _benign_error(estimates, truth, benign) -> float:
    return float(np.mean([np.sum((np.asarray(estimates[k]) - truth[k]) ** 2) for k in benign]))


def run_recovery(
    *,
    p: int = 30,
    q: int = 5,
    n_clients: int = 20,
    rank: int = 2,
    gamma: float = 0.2,
    attack: str = "random",
    noise: float = 1.0,
    n_samples: int = 100,
    seed: int = 0,
    heterogeneity: float = 0.0,
    lam="path",
    solver: str = "admm",
    clair_rank: int | None = None,
):
    r"""Generate, fit locally, run CLAIR and score it; returns ``(RecoveryReport, ClairResult, federation)``.

    ``noise > 0`` solves the penalised program with ``noise = noise / sqrt(n - p - 1)`` (the OLS
    estimates' noise level); ``noise = 0`` the noiseless one. ``clair_rank`` is the rank given to
    CLAIR (None: chosen from the spectrum of ``L``).

    Examples
    --------
    >>> rep, res, fed = run_recovery(p=10, q=3, n_clients=10, rank=1, noise=0.0, n_samples=30, lam=0.9,
    ...                              clair_rank=1)
    >>> rep.precision, rep.recall, rep.sin_theta < 1e-6
    (1.0, 1.0, True)
    """
    fed = make_regression_clients(
        n_clients, p, q, rank, n_samples=n_samples, noise=noise, contamination=gamma, attack=attack,
        seed=seed, heterogeneity=heterogeneity, base_known=False,
    )
    estimates = local_estimates(fed)
    sigma_e = noise / math.sqrt(n_samples - p - 1) if noise > 0 and n_samples > p + 1 else 0.0
    t0 = time.perf_counter()
    res = clair(estimates, rank=clair_rank, lam=lam, base_known=False, solver=solver,
                noise=sigma_e if sigma_e > 0 else None)
    seconds = time.perf_counter() - t0
    benign = fed.benign
    flagged, contaminated = ~res.collaborative, fed.contaminated
    hits = int(np.sum(flagged & contaminated))
    weights = np.asarray([x.shape[0] for x in fed.X], dtype=float)
    fedavg = sum(w * e for w, e in zip(weights / weights.sum(), estimates, strict=True))
    P = fed.U @ fed.U.T
    mean_G = np.mean([estimates[k] for k in benign], axis=0)
    oracle = [P @ e + (mean_G - P @ mean_G) for e in estimates]
    report = RecoveryReport(
        sin_theta=sin_theta(res.subspace, fed.U) if res.rank else 1.0,
        precision=float(hits / flagged.sum()) if flagged.any() else 1.0,
        recall=float(hits / contaminated.sum()) if contaminated.any() else 1.0,
        n_flagged=int(flagged.sum()),
        n_contaminated=int(contaminated.sum()),
        err_clair=_benign_error(list(res.refined), fed.Theta, benign),
        err_local=_benign_error(estimates, fed.Theta, benign),
        err_fedavg=_benign_error([fedavg] * n_clients, fed.Theta, benign),
        err_oracle=_benign_error(oracle, fed.Theta, benign),
        err_formula=sigma_e**2 * q * (rank + (p - rank) / len(benign)),
        rank=res.rank,
        lam=res.lam,
        seconds=seconds,
        rel_gap=res.gap / max(res.objective, 1e-300),
        n_iter=res.n_iter,
        converged=res.converged,
        program="noisy" if res.noisy else "noiseless",
    )
    return report, res, fed


def plot_block_norms(result, contaminated, path) -> None:
    """Bar chart of the per-client ``||S_k||_F`` (and residual z-scores), flagged clients in red."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    K = len(result.block_norms)
    flagged = ~result.collaborative
    colors = ["tab:red" if f else "tab:blue" for f in flagged]
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * K), 5.5), sharex=True)
    axes[0].bar(range(K), result.block_norms, color=colors)
    axes[0].set_ylabel(r"$\|S_k\|_F$")
    axes[0].set_title(f"CLAIR block norms (red: flagged; x: truly contaminated), lam = {result.lam:.3g}")
    axes[1].bar(range(K), result.scores, color=colors)
    axes[1].axhline(3.5, color="gray", linestyle="--", linewidth=1)
    axes[1].set_ylabel("off-subspace z-score")
    axes[1].set_xlabel("client")
    for ax, values in ((axes[0], result.block_norms), (axes[1], result.scores)):
        top = float(np.max(values)) if len(values) else 1.0
        for k in np.flatnonzero(contaminated):
            ax.plot(k, top * 1.05, marker="x", color="black")
    axes[1].set_xticks(range(K))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _lam(text: str):
    if text in ("path", "default"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lam must be a positive number, 'path' or 'default'; got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--lam must be positive; got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``lowrank-fed recover``."""
    parser.add_argument("--p", type=int, default=30, help="features (rows of Theta_k)")
    parser.add_argument("--q", type=int, default=5, help="responses (columns of Theta_k)")
    parser.add_argument("--K", type=int, default=20, help="number of clients")
    parser.add_argument("--r", type=int, default=2, help="rank of the shared subspace")
    parser.add_argument("--gamma", type=float, default=0.2, help="contaminated fraction")
    parser.add_argument("--attack", choices=ATTACKS, default="random")
    parser.add_argument("--noise", type=float, default=1.0, help="response noise std (0: noiseless program)")
    parser.add_argument("--n", type=int, default=100, help="samples per client")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heterogeneity", type=float, default=0.0, help="benign off-subspace heterogeneity")
    parser.add_argument("--lam", type=_lam, default="path", help="a number, 'default' or 'path' (default)")
    parser.add_argument("--solver", choices=("admm", "cvxpy"), default="admm")
    parser.add_argument(
        "--auto-rank", action="store_true", help="let CLAIR choose the rank (else it gets --r)"
    )
    parser.add_argument(
        "--plot", metavar="FILE", help="save the per-client block norms (flagged marked) as PNG"
    )


def main(args: argparse.Namespace) -> int:
    """Run the experiment from parsed flags, print the table; 0 on success, 2 on bad flags."""
    from .table import print_table

    try:
        report, result, fed = run_recovery(
            p=args.p, q=args.q, n_clients=args.K, rank=args.r, gamma=args.gamma, attack=args.attack,
            noise=args.noise, n_samples=args.n, seed=args.seed, heterogeneity=args.heterogeneity,
            lam=args.lam, solver=args.solver, clair_rank=None if args.auto_rank else args.r,
        )
    except ValueError as exc:
        print(f"lowrank-fed recover: {exc}")
        return 2
    r = asdict(report)
    print(
        f"CLAIR recovery: p={args.p} q={args.q} K={args.K} r={args.r} gamma={args.gamma} "
        f"attack={args.attack} noise={args.noise} n={args.n} seed={args.seed}; "
        f"{r['program']} program, solver {args.solver}"
    )
    print_table(
        "",
        ["quantity", "value"],
        [
            ["subspace error sin_theta", f"{r['sin_theta']:.3e}"],
            ["flagged / contaminated", f"{r['n_flagged']} / {r['n_contaminated']}"],
            ["detection precision", f"{r['precision']:.3f}"],
            ["detection recall", f"{r['recall']:.3f}"],
            ["benign error CLAIR", f"{r['err_clair']:.4g}"],
            ["benign error local OLS", f"{r['err_local']:.4g}"],
            ["benign error FedAvg", f"{r['err_fedavg']:.4g}"],
            ["benign error oracle", f"{r['err_oracle']:.4g}"],
            ["oracle formula", f"{r['err_formula']:.4g}"],
            ["rank / lam", f"{r['rank']} / {r['lam']:.4g}"],
            ["solver time (s)", f"{r['seconds']:.3f}"],
            ["relative duality gap", f"{r['rel_gap']:.2e}"],
            ["iterations / converged", f"{r['n_iter']} / {r['converged']}"],
        ],
    )
    if args.plot:
        plot_block_norms(result, fed.contaminated, args.plot)
        print(f"plot written to {args.plot}")
    return 0
