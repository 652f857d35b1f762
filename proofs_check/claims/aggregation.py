r"""Claims about the aggregation rules (docs/methods.md#baselines to #lora-a2), measured on random clients."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from lowrank_fed import FactorPair, aggregate, alternating_update

from .._registry import Record, claim
from ._util import random_clients, rel, savefig, weighted_sum

MIXED_RANKS = (16, 8, 8, 4, 4, 2, 2, 1)


def _trials(ctx):
    rng = np.random.default_rng(ctx.seed)
    n, d = (20, 40) if ctx.quick else (200, 120)
    for _ in range(n):
        K = int(rng.integers(2, 9))
        ranks = rng.choice(MIXED_RANKS, size=K)
        yield rng, random_clients(rng, ranks, d, d + 7)


@claim("stack_exact")
def stack_exact(ctx):
    """FLoRA's stacking reproduces sum_k p_k B_k A_k exactly."""
    worst = max(rel(_prod(aggregate("stack", p, w)), weighted_sum(p, w)) for _, (p, w) in _trials(ctx))
    return [Record("stack_exact", "||stack - sum p_k B_k A_k|| / ||sum|| = 0", worst, "<= 1e-12", worst <= 1e-12)]


@claim("flexlora_exact")
def flexlora_exact(ctx):
    """FlexLoRA's SVD aggregation without truncation reproduces the sum exactly."""
    worst = max(rel(_prod(aggregate("svd", p, w)), weighted_sum(p, w)) for _, (p, w) in _trials(ctx))
    return [Record("flexlora_exact", "||svd - sum p_k B_k A_k|| / ||sum|| = 0", worst, "<= 1e-12", worst <= 1e-12)]


@claim("flexlora_eckart_young")
def flexlora_eckart_young(ctx):
    """Truncated to rank t, the error equals the tail singular values: sqrt(sum_{i>=t} s_i^2)."""
    rng = np.random.default_rng(ctx.seed + 1)
    pairs, w = random_clients(rng, MIXED_RANKS, 60, 50)
    D = weighted_sum(pairs, w)
    s = np.linalg.svd(D, compute_uv=False)
    ts = np.arange(1, 41)
    measured = np.array([np.linalg.norm(D - _prod(aggregate("svd", pairs, w, rank=int(t)))) for t in ts])
    predicted = np.array([np.sqrt(np.sum(s[t:] ** 2)) for t in ts])
    worst = float(np.max(np.abs(measured - predicted)) / s[0])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.semilogy(ts, predicted, "-", label=r"$\sqrt{\sum_{i\geq t} s_i^2}$ (Eckart-Young)")
    ax.semilogy(ts, measured, "o", ms=3, label="measured $\\|\\Delta W - B_t A_t\\|_F$")
    ax.set_xlabel("rank t")
    ax.legend()
    return [
        Record("flexlora_eckart_young", "truncation error = tail singular values", worst,
               "max |meas - pred| / s_1 <= 1e-10", worst <= 1e-10, figure=savefig(fig, ctx, "flexlora_eckart_young"))
    ]


@claim("zero_pad_dilution")
def zero_pad_dilution(ctx):
    """zero_pad shrinks slot i by sum_{k: r_k > i} p_k relative to the owners' mean (segment)."""
    rng = np.random.default_rng(ctx.seed + 2)
    pairs, w = random_clients(rng, MIXED_RANKS, 50, 40)
    p = w / w.sum()
    ranks = np.array([pair.rank for pair in pairs])
    zp, seg = aggregate("zero_pad", pairs, w), aggregate("segment", pairs, w)
    measured = np.linalg.norm(zp.B, axis=0) / np.linalg.norm(seg.B, axis=0)
    measured_a = np.linalg.norm(zp.A, axis=1) / np.linalg.norm(seg.A, axis=1)
    predicted = np.array([p[ranks > i].sum() for i in range(zp.rank)])
    worst = float(max(np.abs(measured - predicted).max(), np.abs(measured_a - predicted).max()))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.step(np.arange(zp.rank), predicted, where="mid", label=r"predicted $\sum_{k: r_k>i} p_k$")
    ax.plot(np.arange(zp.rank), measured, "o", ms=4, label=r"measured $\|b_i^{zp}\| / \|b_i^{seg}\|$")
    ax.set_xlabel("slot i")
    ax.set_ylabel("dilution factor")
    ax.legend()
    return [
        Record("zero_pad_dilution", "slot factor = sum_{r_k > i} p_k", worst, "max |meas - pred| <= 1e-12",
               worst <= 1e-12, details={"predicted": predicted.tolist(), "measured": measured.tolist()},
               figure=savefig(fig, ctx, "zero_pad_dilution"))
    ]


@claim("segment_equals_replication")
def segment_equals_replication(ctx):
    worst = 0.0
    for _, (pairs, w) in _trials(ctx):
        a, b = aggregate("segment", pairs, w), aggregate("replication", pairs, w)
        worst = max(worst, float(np.abs(a.B - b.B).max()), float(np.abs(a.A - b.A).max()))
    return [Record("segment_equals_replication", "identical factors", worst, "max |diff| <= 1e-12", worst <= 1e-12)]


@claim("segment_equals_fedavg")
def segment_equals_fedavg(ctx):
    worst = 0.0
    for rng, (pairs, w) in _trials(ctx):
        same, _ = random_clients(rng, [pairs[0].rank] * len(pairs), *pairs[0].shape)
        a, b = aggregate("segment", same, w), aggregate("fedavg", same, w)
        worst = max(worst, float(np.abs(a.B - b.B).max()), float(np.abs(a.A - b.A).max()))
    return [Record("segment_equals_fedavg", "identical factors for equal ranks", worst, "max |diff| <= 1e-12",
                   worst <= 1e-12)]


@claim("alternating_exact", reports=("alternating_exact", "fedavg_discordance"))
def alternating_exact(ctx):
    """LoRA-A2's frozen-factor update is exact; factor-wise FedAvg of both factors is not."""
    alt_worst, discord = 0.0, []
    for rng, (pairs, w) in _trials(ctx):
        d_out, d_in, r = pairs[0].shape[0], pairs[0].shape[1], 4
        g = FactorPair(rng.normal(size=(d_out, r)), rng.normal(size=(r, d_in)))
        dBs = [rng.normal(size=(d_out, r)) for _ in w]
        local = [FactorPair(g.B + dB, g.A) for dB in dBs]
        alt_worst = max(alt_worst, rel(_prod(alternating_update(g, dBs, w, factor="B")), weighted_sum(local, w)))
        both = [FactorPair(g.B + dB, g.A + rng.normal(size=g.A.shape)) for dB in dBs]
        discord.append(rel(_prod(aggregate("fedavg", both, w)), weighted_sum(both, w)))
    median = float(np.median(discord))
    return [
        Record("alternating_exact", "(B + sum p_k dB_k) A = sum p_k (B + dB_k) A", alt_worst, "<= 1e-12",
               alt_worst <= 1e-12),
        Record("fedavg_discordance", "||avg(B) avg(A) - avg(BA)|| / ||avg(BA)|| > 0 when both factors train",
               median, "median > 1e-2", median > 1e-2, details={"min": float(np.min(discord))}),
    ]


def _prod(pair):
    return pair.B @ pair.A
