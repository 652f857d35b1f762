"""Helpers shared by the claim modules: random clients, relative errors, figures."""

from __future__ import annotations

import numpy as np

from lowrank_fed.synthetic import random_factor_pairs


def random_clients(rng, ranks, d_out, d_in):
    """:func:`lowrank_fed.synthetic.random_factor_pairs` of the given ranks, and random data-size weights."""
    pairs = random_factor_pairs([int(r) for r in ranks], d_out, d_in, seed=rng)
    return pairs, rng.integers(50, 500, size=len(ranks)).astype(float)


def weighted_sum(pairs, weights) -> np.ndarray:
    """The dense reference ``sum_k p_k B_k A_k`` (small sizes only)."""
    p = np.asarray(weights, dtype=float) / np.sum(weights)
    return sum(pk * (pair.B @ pair.A) for pk, pair in zip(p, pairs, strict=True))


def rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def savefig(fig, ctx, name: str) -> str:
    path = ctx.out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)
