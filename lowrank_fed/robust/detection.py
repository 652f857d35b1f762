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

import numpy as np

from .problem import ClairProblem

__all__ = [
    "support_flags",
    "offsubspace_residuals",
    "robust_zscores",
    "residual_flags",
    "MAD_SCALE",
    "Z_THRESHOLD",
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
