r"""Detection of contaminated clients from a solution of the CLAIR program.

Noiseless program: the support of ``S``, restricted to updates that leave the recovered subspace,

.. math::

    \hat O = \{k : \|S_k\|_F > \tau \max_j \|M_j\|_F \ \text{and}\
    \mathrm{res}_k > \tau \max_j \|M_j\|_F\}.

Noisy program: a robust z-score of the off-subspace residuals,

.. math::

    \mathrm{res}_k = \|(I - \hat U \hat U^\top)(\Theta_k - \bar\Theta_{\mathrm{ref}})\|_F,\qquad
    z_k = \frac{\mathrm{res}_k - \operatorname{med}(\mathrm{res})}{1.4826\, \mathrm{MAD}(\mathrm{res})},\qquad
    \hat O = \{k : z_k > 3.5\},

where

- ``tau`` is a relative support tolerance (solver accuracy; default ``1e-4``). The second
  condition keeps high-leverage benign clients out: near the lower end of the ``lam`` window the
  program moves part of a benign block with a large share of the subspace's energy into ``S``
  although the block lies in the subspace (``res_k = 0``); only the off-subspace part of an update
  is evidence of contamination,
- ``Uhat`` is the recovered subspace, shape ``(p, r)``,
- ``Thetabar_ref`` is the mean of the clients whose ``||S_k||_F`` is at most the median when the base
  is unknown (it estimates ``W0``), and 0 when the base is known,
- ``MAD(x) = med(|x - med(x)|)``, floored at ``1e-6 max_j ||M_j||_F`` so that an exactly clean
  federation does not flag rounding noise.

Everything is computed in the compressed coordinates of :class:`~lowrank_fed.robust.problem.ClairProblem`:
the compression is an isometry on each block, so residual norms are those of the dense updates.

Notes
-----
Reconstruction of CLAIR (paper abstract; formulation ours). Only the off-subspace part of an attack
is identifiable; in-subspace attacks (sign flip, scaling) are not detected by design.
"""

from __future__ import annotations

import functools

import numpy as np

from .problem import ClairProblem

__all__ = [
    "support_flags",
    "offsubspace_residuals",
    "robust_zscores",
    "calibrate_threshold",
    "residual_flags",
    "MAD_SCALE",
    "Z_THRESHOLD",
    "GAP_LEVEL",
    "gap_critical",
    "gap_flags",
    "threshold_flags",
]

MAD_SCALE = 1.4826
Z_THRESHOLD = 3.5


def support_flags(
    block_norms: np.ndarray,
    data_block_norms: np.ndarray,
    *,
    tol: float = 1e-4,
    residuals: np.ndarray | None = None,
) -> np.ndarray:
    r"""``||S_k||_F > tol max_j ||M_j||_F`` (and ``res_k > tol max_j ||M_j||_F`` if ``residuals`` is given).

    Examples
    --------
    >>> import numpy as np
    >>> norms = np.array([0.0, 1e-9, 0.5, 0.5])
    >>> support_flags(norms, np.ones(4)).tolist()
    [False, False, True, True]
    >>> support_flags(norms, np.ones(4), residuals=np.array([0, 0, 0, 0.3])).tolist()
    [False, False, False, True]
    """
    scale = float(np.max(data_block_norms)) if data_block_norms.size else 0.0
    flagged = np.asarray(block_norms) > tol * scale
    if residuals is not None:
        flagged &= np.asarray(residuals) > tol * scale
    return flagged


def offsubspace_residuals(problem: ClairProblem, Uc: np.ndarray, block_norms: np.ndarray) -> np.ndarray:
    r"""``res_k = ||(I - Uc Uc^T)(M_k - Mbar_ref)||_F`` in the coordinates of ``problem.M``.

    Parameters
    ----------
    problem : ClairProblem
    Uc : ndarray, shape (m, r)
        Orthonormal basis of the recovered subspace in compressed coordinates.
    block_norms : ndarray, shape (K,)
        ``||S_k||_F``; clients at or below the median form the reference mean (base unknown).
    """
    M, blocks = problem.M, problem.blocks
    R = M
    if not problem.base_known:
        ref = np.asarray(block_norms) <= np.median(block_norms)
        m, w = M.shape[0], blocks.widths[0]
        ref_mean = M.reshape(m, blocks.n_blocks, w)[:, ref, :].mean(axis=1)
        R = M - blocks.tile(ref_mean)
    if Uc.shape[1]:
        R = R - Uc @ (Uc.T @ R)
    return blocks.norms(R)


def robust_zscores(values: np.ndarray, *, floor: float | None = None) -> np.ndarray:
    r"""``(x - med x) / (1.4826 max(MAD(x), floor))``, ``floor`` defaulting to ``1e-6 max|x|``.

    Pass the data's scale (``1e-6 max_j ||M_j||_F``, as :func:`~lowrank_fed.robust.clair` does) so
    that rounding-level residuals of a clean noiseless federation are not flagged.

    Examples
    --------
    >>> import numpy as np
    >>> np.round(robust_zscores(np.array([1.0, 1.1, 0.9, 1.0, 9.0])), 1).tolist()
    [0.0, 0.7, -0.7, 0.0, 54.0]
    """
    x = np.asarray(values, dtype=np.float64)
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    if floor is None:
        floor = 1e-6 * float(np.max(np.abs(x))) if x.size else 0.0
    scale = MAD_SCALE * max(mad, floor, 1e-300)
    return (x - med) / scale


def residual_flags(
    residuals: np.ndarray, *, threshold: float = Z_THRESHOLD, floor: float | None = None
) -> np.ndarray:
    r"""``z_k > threshold`` for the robust z-scores of the off-subspace residuals (noisy program).

    Examples
    --------
    >>> import numpy as np
    >>> residual_flags(np.array([1.0, 1.1, 0.9, 1.0, 9.0])).tolist()
    [False, False, False, False, True]
    """
    return robust_zscores(residuals, floor=floor) > threshold


# ---------------------------------------------------------------------------- one decision from scores

#: Per-round false-alarm level of the gap rule under an i.i.d. Gaussian null (see :func:`gap_critical`).
GAP_LEVEL = 0.05
#: Monte Carlo draws behind :func:`gap_critical` (seeded: the critical values are deterministic).
GAP_DRAWS = 20000
THRESHOLD_RULES = ("gap",)


def _gap_ratios(sorted_desc: np.ndarray) -> np.ndarray:
    r"""``t_j = (s_(j) - s_(j+1)) / (s_(j+1) - s_(K))``, ``j = 1 .. J``, along the last axis (sorted descending).

    ``J = ceil(K / 2) - 1``: the flagged top ``j`` stay a strict minority. ``0/0 = 0`` (no gap, no
    spread) and ``g/0 = inf`` for ``g > 0`` (every other score equal, one apart).
    """
    s = sorted_desc
    K = s.shape[-1]
    J = max((K + 1) // 2 - 1, 0)
    gaps = s[..., :J] - s[..., 1:J + 1]
    spread = s[..., 1:J + 1] - s[..., -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(gaps > 0, gaps / spread, 0.0)
    return np.where((gaps > 0) & (spread <= 0), np.inf, t)


@functools.lru_cache(maxsize=64)
def gap_critical(n: int, level: float = GAP_LEVEL) -> float:
    r"""The critical ratio ``c(n, level)`` of :func:`gap_flags`: ``P(max_j t_j > c) = level`` under the null.

    Null: ``n`` i.i.d. N(0, 1) scores (every client benign). The ratio ``t_j`` is invariant to shifting
    and scaling the scores, so ``c`` depends on ``n`` and ``level`` only; it is the ``(1 - level)``
    quantile of ``max_j t_j`` over :data:`GAP_DRAWS` seeded draws (Monte Carlo error about
    ``sqrt(level (1 - level) / GAP_DRAWS)``, 0.0015 at 0.05). ``inf`` when ``n < 3`` (no minority to flag).

    Examples
    --------
    >>> round(gap_critical(10), 2) > 0.5
    True
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"The gap rule's 'level' must lie in (0, 1). Got {level!r}.")
    n = int(n)
    if n < 3:
        return float("inf")
    rng = np.random.default_rng(20260 + n)
    draws = -np.sort(-rng.standard_normal((GAP_DRAWS, n)), axis=1)
    return float(np.quantile(_gap_ratios(draws).max(axis=1), 1.0 - level))


def gap_flags(scores: np.ndarray, *, level: float = GAP_LEVEL) -> np.ndarray:
    r"""Flag the clients above the largest relative gap of the sorted scores, when it is significant.

    .. math::

        s_{(1)} \ge \dots \ge s_{(K)},\qquad
        t_j = \frac{s_{(j)} - s_{(j+1)}}{s_{(j+1)} - s_{(K)}}\ \ (1 \le j < K/2),\qquad
        j^* = \arg\max_j t_j,\qquad
        \hat O = \{k : s_k \ge s_{(j^*)}\}\ \text{if}\ t_{j^*} > c(K, \text{level}),\ \text{else}\ \emptyset,

    where ``t_j`` is the gap under the top ``j`` relative to the spread of the rest (a Dixon-type ratio),
    and ``c`` is :func:`gap_critical`: with ``K`` i.i.d. Gaussian scores (no contamination) a round flags
    anyone with probability ``level``. The rule is invariant to ``s -> a s + b`` (``a > 0``) and
    permutation-equivariant; equal scores flag nobody; at most ``ceil(K/2) - 1`` clients are flagged.

    Examples
    --------
    >>> import numpy as np
    >>> gap_flags(np.array([0.1, -0.3, 0.2, 6.0, 0.0, -0.1, 0.3, -0.2, 0.05, -0.05])).tolist()
    [False, False, False, True, False, False, False, False, False, False]
    >>> gap_flags(np.zeros(5)).any()
    np.False_
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or not np.all(np.isfinite(s)):
        raise ValueError(f"The gap rule needs a finite 1-d array of scores. Got shape {s.shape}.")
    flagged = np.zeros(s.shape, dtype=bool)
    t = _gap_ratios(-np.sort(-s))
    if t.size == 0:
        return flagged
    j = int(np.argmax(t))  # j* - 1
    if t[j] > gap_critical(s.size, level):
        flagged = s >= -np.sort(-s)[j]
    return flagged


def calibrate_threshold(benign_scores, level: float = GAP_LEVEL) -> float:
    r"""A cut that flags a benign client with probability about ``level``: the ``(1 - level)`` quantile of benign
    scores pooled over rounds and runs (linear interpolation between order statistics),

    .. math:: z^* = Q_{1 - q}(\{s_k : k \text{ benign}\}),

    from uncontaminated validation runs whose decision flags nobody (so that the scores are not shaped by it). A
    round of ``K`` benign clients is then quiet with probability about ``(1 - q)^K``.

    >>> calibrate_threshold(np.arange(101.0), 0.05)
    95.0
    """
    s = np.asarray(benign_scores, dtype=np.float64).ravel()
    if s.size == 0 or not np.all(np.isfinite(s)):
        raise ValueError(f"Calibration needs finite benign scores. Got {s.size} scores"
                         + ("" if s.size == 0 else ", some not finite") + ".")
    if not 0.0 < level < 1.0:
        raise ValueError(f"The 'level' parameter must be between 0 and 1 (a false-flag rate). Got {level}.")
    return float(np.quantile(s, 1.0 - level))


def threshold_flags(scores: np.ndarray, threshold="gap", *, level: float = GAP_LEVEL) -> np.ndarray:
    r"""CLAIR's decision from per-client scores: ``"gap"`` (:func:`gap_flags`) or a number ``z*``.

    A number flags ``s_k > z*``; it is either a fixed cut (``3``: the former default of the federated
    method) or one calibrated on uncontaminated validation runs (for example the ``(1 - q)`` quantile
    of benign scores pooled over seeds and rounds, which then false-flags a benign client at rate ``q``).

    Examples
    --------
    >>> import numpy as np
    >>> threshold_flags(np.array([0.0, 1.0, 4.0]), 3.0).tolist()
    [False, False, True]
    """
    if isinstance(threshold, str):
        if threshold not in THRESHOLD_RULES:
            raise ValueError(
                f"The 'threshold' must be one of {THRESHOLD_RULES} or a number. Got {threshold!r}.")
        return gap_flags(scores, level=level)
    if isinstance(threshold, bool) or not np.isfinite(float(threshold)):
        raise ValueError(f"The 'threshold' must be a finite number or 'gap'. Got {threshold!r}.")
    return np.asarray(scores, dtype=np.float64) > float(threshold)
