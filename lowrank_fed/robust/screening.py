r"""Screening LoRA adapters for contamination: a subspace test and a norm test per module, one score per client.

Each client ``k`` holds a set of modules; on module ``m`` its update is ``Delta W_{k,m} = B_{k,m} A_{k,m}``
(folded, ranks may differ). Two statistics per client and module, each turned into a robust z-score over the
holders ``H_m`` of the module, then one score per client:

.. math::

    \text{subspace:}\quad f_{k,m} = 1 - \operatorname{med}_{j \in H_m,\, j \ne k}
        \frac{\langle T_{k,m}, T_{j,m} \rangle}{\|T_{k,m}\|_F \|T_{j,m}\|_F},\quad
        T_{k,m} = (\Delta W_{k,m} \Delta W_{k,m}^\top)^{1/2} = U_{k,m} S_{k,m} U_{k,m}^\top;\qquad
    \text{norm:}\quad g_{k,m} = \log \|\Delta W_{k,m}\|_F,

.. math::

    z^{t}_{k,m} = \frac{x_{k,m} - \operatorname{med}_{j \in H_m} x_{j,m}}
                       {1.4826\, \max(\operatorname{MAD}_{j \in H_m} x_{j,m},\ \epsilon)},\qquad
    c^{t}_k = \Big(\frac{1}{|M_k|} \sum_{m \in M_k} \max(z^{t}_{k,m}, 0)^2\Big)^{1/2},\qquad
    s_k = \big((c^{\text{subspace}}_k)^2 + (c^{\text{norm}}_k)^2\big)^{1/2},

where

- ``f`` is one minus the median cosine between the client's column "spread" ``T`` (its left singular vectors
  weighted by the singular values ``S``) and the other holders': 0 when its update spans the column space the
  others span with the same profile, near 1 when it is orthogonal to theirs. The square root (weights ``S``, not
  ``S^2``) makes the cosine less sensitive to how the energy is shared inside a common subspace (measured: the
  smallest ratio of a contaminated to the largest benign score over 18 runs, 3.5 against 2.6 with ``S^2``).
  It ignores every client's scale (a benign rsLoRA client is not an outlier for being large), and the median
  over the others keeps it robust while contaminated clients are a minority,
- ``g`` measures scale (a copy of a benign adapter scaled ``c``-fold is ``log c`` above it),
- ``x`` is ``f`` or ``g``; ``MAD`` the median absolute deviation; ``epsilon`` = :data:`SCORE_FLOOR` (both
  statistics are dimensionless: a cosine and a log-ratio; differences below a few hundredths are not evidence,
  see Notes),
- ``M_k`` are the modules client ``k`` holds that at least :data:`MIN_HOLDERS` clients hold (a median and a
  MAD of fewer say nothing); ``c^t_k`` is test ``t``'s root-mean-square *excess* over those modules (only
  ``z > 0`` counts: a small or well-aligned update is no evidence), ``s_k`` the chi-like combination of the
  two tests.

The decision is then one call of :func:`~lowrank_fed.robust.detection.threshold_flags` on ``s``.
Everything is computed from ``r_j x r_k`` products of the factors (:func:`column_factor`); no ``d_out x d_in``
or ``d_out x d_out`` matrix is formed.

Notes
-----
[ours] CLAIR's evidence is the part of an update outside the benign subspace; here it is measured per module
against every other holder (the median), in a form that does not depend on the client's scale, and scale is
tested separately. The combination and the floor were chosen on real PEFT adapters (docs/methods.md,
"merge --robust": 6 benign clients of ranks 2-16 plus 2 contaminated, 3 kinds x 6 seeds = 18 runs, gap rule):
the chi-like sum caught both contaminated clients in 18/18 runs with no benign flag, the smallest ratio of a
contaminated score to the largest benign one 3.51; the maximum over tests of the mean z over modules also 18/18,
ratio 3.24, and it false-flagged in 2 of the 6 runs with no detectable outlier (the negated copies) against 1.
With ``epsilon = 1e-3`` either combination missed 2/18 and false-flagged in 3-5/18 (benign clients of rank 2 and 16
differ in ``f`` by ~0.1 while those of equal rank agree to ~0.005, so a tiny MAD inflates the rank effect).
What neither test sees: an update inside the benign column space at a benign norm, for example the negative of a
benign adapter (``T`` and the norm are those of the adapter it negates).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .detection import robust_zscores

__all__ = ["SCORE_FLOOR", "MIN_HOLDERS", "TESTS", "ScreeningScores", "alignments", "column_factor", "module_statistics",
           "screening_scores"]

#: Floor of the MAD for both (dimensionless) statistics.
SCORE_FLOOR = 0.05
#: A module is scored only when at least this many clients hold it.
MIN_HOLDERS = 3
#: The tests, in the order of the rows of :attr:`ScreeningScores.module_z`.
TESTS = ("subspace", "norm")


def column_factor(B: np.ndarray, A: np.ndarray) -> np.ndarray:
    r"""``C`` with ``C C^T = (B A)(B A)^T`` and ``||C||_F = ||B A||_F``, shape ``(d_out, r)``, never forming ``B A``.

    ``A^T = Q R`` (thin QR) gives ``B A = (B R^T) Q^T`` with orthonormal rows ``Q^T``, so ``C = B R^T``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> B, A = rng.standard_normal((5, 2)), rng.standard_normal((2, 7))
    >>> C = column_factor(B, A)
    >>> bool(np.allclose(C @ C.T, (B @ A) @ (B @ A).T))
    True
    """
    B = np.asarray(B, dtype=np.float64)
    A = np.asarray(A, dtype=np.float64)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"A factor pair needs B of shape (d_out, r) and A of shape (r, d_in). "
                         f"Got B {B.shape} and A {A.shape}.")
    R = np.linalg.qr(A.T, mode="r")
    return B @ R.T


def alignments(Cs: Sequence[np.ndarray], *, power: float = 0.5) -> np.ndarray:
    r"""``a_{jk} = <T_j, T_k> / (||T_j||_F ||T_k||_F)`` with ``T_k = (C_k C_k^T)^power``, shape ``(n, n)``.

    ``C_k = U_k S_k V_k^T`` (thin SVD) gives ``T_k = U_k S_k^{2 power} U_k^T`` and
    ``<T_j, T_k> = sum_ab s_{j,a}^{2 power} (U_j^T U_k)_{ab}^2 s_{k,b}^{2 power}``: ``r_j x r_k`` products only.
    """
    svds = [np.linalg.svd(C, full_matrices=False)[:2] for C in Cs]
    n = len(Cs)
    inner = np.empty((n, n))
    for j in range(n):
        Uj, sj = svds[j]
        for k in range(j, n):
            Uk, sk = svds[k]
            inner[j, k] = inner[k, j] = float(np.sum(sj[:, None] ** (2 * power) * (Uj.T @ Uk) ** 2
                                                     * sk[None, :] ** (2 * power)))
    size = np.sqrt(np.diag(inner))
    with np.errstate(invalid="ignore", divide="ignore"):
        a = inner / np.outer(size, size)
    return np.nan_to_num(a, nan=0.0)


def module_statistics(pairs: Sequence[tuple[np.ndarray, np.ndarray]]):
    r"""The raw statistics of one module over its holders: misalignments ``f`` and log-norms ``g``.

    .. math::

        f_k = 1 - \operatorname{med}_{j \ne k} a_{jk},\qquad g_k = \log \|\Delta W_k\|_F,

    with ``a`` the :func:`alignments` of the holders' column covariances.

    Parameters
    ----------
    pairs : sequence of (B, A)
        The holders' factors, ``B`` shape ``(d_out, r_k)``, ``A`` shape ``(r_k, d_in)``.

    Returns
    -------
    f, g : ndarray, shape (n,)
        ``g_k = -inf`` for a zero update (whose ``f`` is 1).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> U = np.linalg.qr(rng.standard_normal((8, 2)))[0]
    >>> pairs = [(U @ rng.standard_normal((2, 2)), rng.standard_normal((2, 6))) for _ in range(4)]
    >>> pairs.append((rng.standard_normal((8, 2)), rng.standard_normal((2, 6))))
    >>> f, g = module_statistics(pairs)
    >>> np.round(f, 2).tolist()
    [0.18, 0.32, 0.3, 0.38, 0.91]
    """
    Cs = [column_factor(B, A) for B, A in pairs]
    shapes = {C.shape[0] for C in Cs}
    if len(shapes) > 1:
        raise ValueError(f"The holders of one module must share d_out. Got d_out {sorted(shapes)}.")
    a = alignments(Cs)
    n = len(Cs)
    f = np.array([1.0 - float(np.median(np.delete(a[k], k))) for k in range(n)])
    with np.errstate(divide="ignore"):
        g = np.log([float(np.linalg.norm(C)) for C in Cs])
    return f, g


@dataclass(frozen=True)
class ScreeningScores:
    r""":func:`screening_scores`' result.

    Attributes
    ----------
    modules : tuple of str
        The scored modules (held by at least :data:`MIN_HOLDERS` clients), in the order of the columns.
    module_z : ndarray, shape (2, K, M)
        ``z^t_{k,m}`` for ``t`` in :data:`TESTS`; NaN where client ``k`` does not hold module ``m``.
    test_scores : ndarray, shape (2, K)
        ``c^t_k = sqrt(mean_{m in M_k} max(z^t_{k,m}, 0)^2)``, each test's root-mean-square excess (NaN when client
        ``k`` holds no scored module).
    scores : ndarray, shape (K,)
        ``s_k = sqrt(sum_t (c^t_k)^2)``.
    worst : tuple of str
        Per client, the test with the larger ``c^t_k``.
    """

    modules: tuple
    module_z: np.ndarray
    test_scores: np.ndarray
    scores: np.ndarray
    worst: tuple

    def reason(self, k: int, *, top: int = 3) -> str:
        """``"norm: z 9.1 on m1, 8.7 on m2, ..."``: client ``k``'s worse test and its highest-scoring modules."""
        if not np.isfinite(self.scores[k]):
            return "not scored: it holds no module that enough clients hold"
        t = TESTS.index(self.worst[k])
        z = self.module_z[t, k]
        held = [int(i) for i in np.argsort(-np.nan_to_num(z, nan=-np.inf), kind="stable") if np.isfinite(z[i])]
        shown = ", ".join(f"{z[i]:.1f} on {self.modules[i]}" for i in held[:top])
        more = f" (+{len(held) - top} more)" if len(held) > top else ""
        return f"{self.worst[k]}: z {shown}{more}"


def screening_scores(updates: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]], *,
                     floor: float = SCORE_FLOOR) -> ScreeningScores:
    r"""The subspace and norm z-scores of every client on every module it holds, and its score ``s_k``.

    Parameters
    ----------
    updates : sequence of mappings
        ``updates[k][m] = (B, A)``: client ``k``'s factors of module ``m`` (clients may hold different modules).
    floor : float
        ``epsilon``, the floor of the MAD.

    Returns
    -------
    ScreeningScores

    Raises
    ------
    ValueError
        When fewer than :data:`MIN_HOLDERS` clients are given, or no module has that many holders.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> U = np.linalg.qr(rng.standard_normal((16, 2)))[0]
    >>> benign = lambda: (U @ (np.eye(2) + 0.2 * rng.standard_normal((2, 2))) + 0.05 * rng.standard_normal((16, 2)),
    ...                   rng.standard_normal((2, 8)))
    >>> updates = [{"q": benign(), "v": benign()} for _ in range(6)]
    >>> updates.append({m: (5 * B, A) for m, (B, A) in updates[0].items()})       # a 5x copy
    >>> updates.append({"q": (rng.standard_normal((16, 2)), rng.standard_normal((2, 8)))})  # off-subspace, q only
    >>> found = screening_scores(updates)
    >>> np.round(found.scores, 1).tolist(), found.worst[6:]
    ([2.1, 1.2, 0.9, 0.0, 0.5, 0.4, 12.5, 11.5], ('norm', 'subspace'))
    >>> from lowrank_fed.robust.detection import threshold_flags
    >>> np.flatnonzero(threshold_flags(found.scores, "gap")).tolist()
    [6, 7]
    """
    K = len(updates)
    if K < MIN_HOLDERS:
        raise ValueError(f"Screening needs at least {MIN_HOLDERS} clients to tell an outlier from the rest. Got {K}.")
    if not (np.isfinite(floor) and floor > 0):
        raise ValueError(f"The 'floor' must be a finite positive number. Got {floor!r}.")
    counts: dict[str, int] = {}
    for u in updates:
        for m in u:
            counts[m] = counts.get(m, 0) + 1
    modules = tuple(sorted(m for m, c in counts.items() if c >= MIN_HOLDERS))
    if not modules:
        raise ValueError(f"Screening needs a module held by at least {MIN_HOLDERS} clients; "
                         f"the most-held module has {max(counts.values(), default=0)} holders.")
    module_z = np.full((len(TESTS), K, len(modules)), np.nan)
    for i, m in enumerate(modules):
        holders = [k for k in range(K) if m in updates[k]]
        f, g = module_statistics([updates[k][m] for k in holders])
        finite = g[np.isfinite(g)]
        g = np.where(np.isfinite(g), g, finite.min() if finite.size else 0.0)  # a zero update: the smallest norm
        for t, x in enumerate((f, g)):
            module_z[t, holders, i] = robust_zscores(x, floor=floor)
    held = np.isfinite(module_z[0]).sum(axis=1)
    excess = np.nansum(np.clip(module_z, 0.0, None) ** 2, axis=2)  # (2, K): sum over held modules
    with np.errstate(invalid="ignore", divide="ignore"):
        test_scores = np.where(held > 0, np.sqrt(excess / held), np.nan)
    scores = np.sqrt(np.sum(test_scores ** 2, axis=0))
    worst = tuple(TESTS[int(np.argmax(np.nan_to_num(test_scores[:, k], nan=-1.0)))] for k in range(K))
    return ScreeningScores(modules, module_z, test_scores, scores, worst)
