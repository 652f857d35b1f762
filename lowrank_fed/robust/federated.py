r"""CLAIR in a federated round: per-module scores, one decision per client, the benign subspace.

A server that runs CLAIR on a model of ``M`` adapted modules gets, per round, every client's folded
pair ``Theta_{k,m} = B_{k,m} A_{k,m}`` of every module (ranks may differ, nothing is densified):

.. math::

    z_{k,m} = \mathrm{clair}([\Theta_{1,m} .. \Theta_{K,m}]).\mathrm{scores}_k,\qquad
    \bar z_k = \frac{1}{M} \sum_m z_{k,m},\qquad
    \hat O = \mathrm{threshold\_flags}(\bar z),\qquad \hat G = \{k \notin \hat O\},

and, per module, ``U_m`` = the top-``r_m`` left singular vectors of the benign stack
``[Theta_{j,m}]_{j in G}`` (:func:`stack_subspace`), the subspace CLAIR's ``L`` has on that stack once
no outlier is left. A client is contaminated or not as a whole, so one decision combines the modules
(docs/methods.md#clair-in-a-federated-run). The functions take NumPy arrays or any array-API tensors
(torch through array-api-compat): the core never imports torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from .._validation import namespace, to_numpy
from ..factors import FactorPair
from .api import ClairWarning, clair
from .detection import GAP_LEVEL, threshold_flags

__all__ = ["ClientFlags", "flag_clients", "stack_subspace"]


def stack_subspace(pairs: Sequence[FactorPair], rank: int) -> np.ndarray:
    r"""Top-``rank`` left singular vectors of the stack ``[B_1 A_1, ..., B_K A_K]``, never formed.

    ``A_j^T = Q_j R_j`` (thin QR) gives ``B_j A_j = (B_j R_j^T) Q_j^T`` with orthonormal ``Q_j^T`` rows, so

    .. math:: [B_1 A_1 .. B_K A_K] = [B_1 R_1^\top .. B_K R_K^\top]\ \mathrm{diag}(Q_1^\top .. Q_K^\top)

    has the left singular vectors of ``[B_1 R_1^T .. B_K R_K^T]`` (``d_out x sum r_j``): the right
    compression of :func:`~lowrank_fed.robust.compress_pairs`. The result depends on the products only
    (up to the signs of the vectors), not on how each product is factored.

    Parameters
    ----------
    pairs : sequence of FactorPair
        ``B_j`` shape ``(d_out, r_j)``, ``A_j`` shape ``(r_j, d_in)``, of one array library; the work is
        in float64 in that library (torch tensors stay torch until the result).
    rank : int
        ``1 <= rank <= min(d_out, sum_j min(r_j, d_in))``.

    Returns
    -------
    ndarray, shape ``(d_out, rank)``, float64, orthonormal columns.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> pairs = [FactorPair(rng.normal(size=(6, 2)), rng.normal(size=(2, 5))) for _ in range(3)]
    >>> U = stack_subspace(pairs, 2)
    >>> U.shape, bool(np.allclose(U.T @ U, np.eye(2)))
    ((6, 2), True)
    """
    if len(pairs) == 0:
        raise ValueError("The 'pairs' parameter must hold at least one FactorPair. Got none.")
    xp = namespace(*[x for p in pairs for x in (p.B, p.A)])
    blocks = []
    for p in pairs:
        A = xp.astype(p.A, xp.float64)
        R = xp.linalg.qr(xp.permute_dims(A, (1, 0)))[1]
        blocks.append(xp.astype(p.B, xp.float64) @ xp.permute_dims(R, (1, 0)))
    stacked = xp.concat(blocks, axis=1)
    if not 1 <= int(rank) <= min(stacked.shape):
        raise ValueError(f"The 'rank' parameter must be between 1 and {min(stacked.shape)} (the stack's shape "
                         f"{tuple(stacked.shape)}). Got {rank}.")
    U = xp.linalg.svd(stacked, full_matrices=False)[0]
    return np.asarray(to_numpy(U[:, : int(rank)]), dtype=np.float64)


class ClientFlags(NamedTuple):
    """:func:`flag_clients`' outcome: the benign mask, mean z-scores, refitted subspaces, per-module ``lam`` and
    duality gaps, the decision ``threshold`` that was applied, and per client and module (shape ``(K, M)``, the
    modules in ``updates``' order) the z-scores ``z_{k,m}`` and the off-subspace residual norms they standardise."""

    benign: np.ndarray
    scores: np.ndarray
    subspaces: dict
    lams: list
    gaps: list
    converged: bool
    threshold: object = "gap"
    module_scores: np.ndarray | None = None
    module_residuals: np.ndarray | None = None


def flag_clients(updates: Sequence[Mapping[str, FactorPair]], *, rank: int, lam="default", gamma_bar: float = 0.3,
                 threshold="gap", gap_level: float = GAP_LEVEL, z_threshold: float | None = None,
                 weights=None, fit_on: Sequence[Mapping[str, FactorPair]] | None = None,
                 flagged_before: Sequence[bool] | None = None) -> ClientFlags:
    r"""One decision per client from CLAIR on every module, then the subspace refitted on the benign ones.

    ``updates[k][m]`` is client ``k``'s folded pair of module ``m`` (every client has every module).
    Module ``m``: ``clair(pairs, rank=r_m, lam=lam)`` with ``r_m = min(rank, sum_k r_k, d_out, d_in)`` gives
    the z-scores ``z_{k,m}`` of the off-subspace residuals; then

    .. math:: \bar z_k = \frac{1}{M} \sum_m z_{k,m},\qquad O = \mathrm{threshold\_flags}(\bar z,
              \mathrm{threshold}) \cup O_{\mathrm{before}},\qquad G = \{k \notin O\},

    (:func:`~lowrank_fed.robust.threshold_flags`: ``"gap"`` or a number; ``z_threshold``, when given, is a
    numeric ``threshold``: the former call) and ``U_m = stack_subspace([fit_on[j][m] for j in G], r_m)``
    (no subspace when every client is flagged), ``fit_on`` the clients' pairs the subspace is fitted on, in the
    order of ``updates``: by default ``updates`` themselves (a federated round may score each client's round update
    and fit on its whole adapter), with ``r_m`` recomputed from them. ``O_before`` is the clients whose
    ``flagged_before`` is true (default: none): flagged whatever their scores, which are still computed and are
    still part of every module's median and MAD (a federated round that keeps a flag for the rest of a run).

    Guarantees: the decision is the same for any order of the clients (``benign`` and ``scores`` follow
    the order) and for a common positive scale of every update (the program is homogeneous and the
    z-scores are scale-free), up to the solver's tolerance.

    Returns
    -------
    ClientFlags
        ``benign`` (bool, shape ``(K,)``), ``scores`` (``zbar``), ``subspaces`` {module: ``(d_out, r_m)``},
        per-module ``lams`` and relative duality ``gaps``, ``converged``, the ``threshold`` applied, and the
        ``(K, M)`` ``module_scores`` ``z_{k,m}`` and ``module_residuals`` behind ``scores``.
    """
    if len(updates) == 0:
        raise ValueError("The 'updates' parameter must hold at least one client's {module: FactorPair}. Got none.")
    if z_threshold is not None:
        threshold = z_threshold
    modules = list(updates[0])
    fit = updates if fit_on is None else fit_on
    if len(fit) != len(updates):
        raise ValueError(f"The 'fit_on' parameter must hold one client's pairs per update: {len(updates)}. "
                         f"Got {len(fit)}.")

    before = np.zeros(len(updates), dtype=bool) if flagged_before is None else np.asarray(flagged_before, dtype=bool)
    if before.shape != (len(updates),):
        raise ValueError(f"The 'flagged_before' parameter must hold one bool per update: {len(updates)}. "
                         f"Got shape {before.shape}.")

    def rank_of(pairs):  # the subspace's rank on these pairs: at most their total rank and the module's size
        return min(rank, sum(p.rank for p in pairs), *pairs[0].shape)

    z, residuals, lams, gaps, converged = [], [], [], [], True
    for m in modules:
        pairs = [u[m] for u in updates]
        with warnings.catch_warnings():  # its own flags (all-or-none on noisy updates) are not used
            warnings.simplefilter("ignore", ClairWarning)
            res = clair(pairs, rank=rank_of(pairs), lam=lam, gamma_bar=gamma_bar, weights=weights)
        z.append(res.scores)
        residuals.append(res.residuals)
        lams.append(res.lam)
        gaps.append(res.gap / max(res.objective, 1e-300))
        converged &= res.converged
    scores = np.mean(np.stack(z), axis=0)  # z is (M, K)
    benign = ~threshold_flags(scores, threshold, level=gap_level) & ~before
    members = np.flatnonzero(benign)
    subspaces = {m: stack_subspace([fit[i][m] for i in members], rank_of([f[m] for f in fit])) for m in modules} \
        if len(members) else {}
    return ClientFlags(benign, scores, subspaces, lams, gaps, bool(converged), threshold,
                       np.stack(z, axis=1), np.stack(residuals, axis=1))
