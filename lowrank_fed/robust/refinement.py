r"""CLAIR's refinement: keep each client's in-subspace part, average the rest over the benign set.

.. math::

    \tilde\Theta_k = P \Theta_k + (I - P) \sum_{j \in G} \pi_j \Theta_j,\qquad P = \hat U \hat U^\top,

where

- ``Uhat`` shape ``(p, r)`` is the recovered shared subspace (orthonormal columns),
- ``G`` is the collaborative (not flagged) set and ``pi_j = w_j / sum_{i in G} w_i`` the client
  weights restricted to it (uniform by default),
- ``Theta_k`` shape ``(p, q)`` is a dense update, or ``B_k A_k`` for a LoRA factor pair.

For a factor pair the refinement is the exact pair of rank ``r_k + sum_{j in G} r_j``

.. math::

    \tilde B_k = [\,P B_k,\ (I - P)[\pi_j B_j]_{j \in G}\,],\qquad
    \tilde A_k = [\,A_k;\ [A_j]_{j \in G}\,],

since ``Btil_k Atil_k = P B_k A_k + (I - P) sum_j pi_j B_j A_j``. :func:`refactor` re-factors it to a
client's rank by the factored SVD (FlexLoRA's redistribution), never forming ``d_out x d_in``.

The same formula is applied to every client, flagged ones included: it removes the off-subspace
part of their update, and their in-subspace part is theirs. In-subspace attacks cannot move
``(I - P) mean`` and so cannot hurt benign clients.

Notes
-----
Reconstruction of CLAIR (paper abstract: "reduces off-subspace error by cross-client averaging while
preserving client-specific variation within the shared subspace"; formulation ours,
docs/methods.md#refinement).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .._validation import like, namespace
from ..aggregation import redistribute
from ..factors import FactorPair

__all__ = ["refine_dense", "refine_pairs", "refactor", "collaborative_weights", "RefinedPairs"]


def collaborative_weights(weights: np.ndarray, collaborative: np.ndarray) -> np.ndarray:
    r"""``pi_j = w_j / sum_{i in G} w_i`` on ``G`` and 0 elsewhere (uniform over ``G`` if that sum is 0).

    Examples
    --------
    >>> import numpy as np
    >>> collaborative_weights(np.array([1.0, 1.0, 2.0]), np.array([True, False, True])).tolist()
    [0.3333333333333333, 0.0, 0.6666666666666666]
    """
    g = np.asarray(collaborative, dtype=bool)
    w = np.where(g, np.asarray(weights, dtype=np.float64), 0.0)
    total = w.sum()
    if total <= 0:
        w = g.astype(np.float64)
        total = max(w.sum(), 1.0)
    return w / total


def refine_dense(thetas: list, U: np.ndarray, pi: np.ndarray) -> list:
    r"""``P Theta_k + (I - P) sum_j pi_j Theta_j`` for dense updates, in their namespace and dtype.

    Parameters
    ----------
    thetas : list of array, shape (p, q)
    U : ndarray, shape (p, r), orthonormal columns
    pi : ndarray, shape (K,), the collaborative weights (:func:`collaborative_weights`)

    Examples
    --------
    >>> import numpy as np
    >>> U = np.array([[1.0], [0.0]])
    >>> out = refine_dense([np.array([[1.0], [2.0]]), np.array([[3.0], [4.0]])], U, np.array([0.5, 0.5]))
    >>> [t.ravel().tolist() for t in out]
    [[1.0, 3.0], [3.0, 3.0]]
    """
    xp = namespace(*thetas)
    Ux = like(xp, U, thetas[0])
    Ut = xp.permute_dims(Ux, (1, 0))
    mean = sum(float(w) * t for w, t in zip(pi, thetas, strict=True) if w != 0)
    perp_mean = mean - Ux @ (Ut @ mean)  # (I - P) mean_G Theta_j
    return [Ux @ (Ut @ t) + perp_mean for t in thetas]


class RefinedPairs(Sequence):
    r"""The refined factor pairs, one per client, built on access (a read-only list).

    Client ``k``'s pair is ``([P B_k, B_perp], [A_k; A_bar])`` with the shared
    ``B_perp = (I - P)[pi_j B_j]_{j in G}`` and ``A_bar = [A_j]_{j in G}`` held once, so ``K``
    refined pairs of rank ``r_k + sum_{j in G} r_j`` cost the memory of one until indexed.
    ``list(refined)`` materialises them all.
    """

    def __init__(self, pairs, Ux, B_perp, A_bar, xp):
        self._pairs, self._Ux, self._B_perp, self._A_bar, self._xp = list(pairs), Ux, B_perp, A_bar, xp

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        xp, Ux, pair = self._xp, self._Ux, self._pairs[index]
        # Btil Atil = P B_k A_k + (I - P) sum_j pi_j B_j A_j.
        B = xp.concat([Ux @ (xp.permute_dims(Ux, (1, 0)) @ pair.B), self._B_perp], axis=1)
        A = xp.concat([pair.A, self._A_bar], axis=0)
        return FactorPair(B, A)

    def __repr__(self) -> str:
        ranks = [p.rank + self._B_perp.shape[1] for p in self._pairs]
        return f"RefinedPairs(n_clients={len(self)}, ranks={ranks})"


def refine_pairs(pairs: list[FactorPair], U: np.ndarray, pi: np.ndarray) -> RefinedPairs:
    r"""The exact refinement of LoRA updates as factor pairs of rank ``r_k + sum_{j in G} r_j``.

    Parameters
    ----------
    pairs : list of FactorPair
    U : ndarray, shape (d_out, r), orthonormal columns
    pi : ndarray, shape (K,), the collaborative weights

    Returns
    -------
    RefinedPairs
        A read-only list of FactorPair in the input's namespace, dtype and device.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> pairs = [FactorPair(rng.normal(size=(5, 1)), rng.normal(size=(1, 4))) for _ in range(3)]
    >>> U = np.linalg.qr(rng.normal(size=(5, 2)))[0]
    >>> out = refine_pairs(pairs, U, np.array([0.5, 0.5, 0.0]))
    >>> [p.rank for p in out]
    [3, 3, 3]
    >>> P = U @ U.T
    >>> mean = 0.5 * (pairs[0].B @ pairs[0].A + pairs[1].B @ pairs[1].A)
    >>> bool(np.allclose(out[2].B @ out[2].A, P @ pairs[2].B @ pairs[2].A + (np.eye(5) - P) @ mean))
    True
    """
    xp = namespace(*[x for pair in pairs for x in pair])
    Ux = like(xp, U, pairs[0].B)
    Ut = xp.permute_dims(Ux, (1, 0))
    members = [k for k in range(len(pairs)) if pi[k] != 0]
    B_bar = xp.concat([pairs[j].B * float(pi[j]) for j in members], axis=1)  # [pi_j B_j]_{j in G}
    A_bar = xp.concat([pairs[j].A for j in members], axis=0)  # [A_j]_{j in G}
    B_perp = B_bar - Ux @ (Ut @ B_bar)  # (I - P) [pi_j B_j]
    return RefinedPairs(pairs, Ux, B_perp, A_bar, xp)


def refactor(pairs: list[FactorPair], ranks) -> list[FactorPair]:
    r"""Best rank-``r_k`` approximation of each refined pair (factored SVD; FlexLoRA's redistribution).

    Parameters
    ----------
    pairs : list of FactorPair
        E.g. ``ClairResult.refined``.
    ranks : int or list of int
        One rank for all, or one per pair (typically the clients' own ranks).

    Examples
    --------
    >>> import numpy as np
    >>> pairs = [FactorPair(np.ones((4, 3)), np.ones((3, 5))) for _ in range(2)]
    >>> [p.rank for p in refactor(pairs, 1)]
    [1, 1]
    """
    ranks = [ranks] * len(pairs) if isinstance(ranks, (int, np.integer)) else list(ranks)
    if len(ranks) != len(pairs):
        raise ValueError(
            f"The 'ranks' parameter must have one entry per pair: expected {len(pairs)}, got {len(ranks)}."
        )
    return [redistribute(pair, int(r), method="svd") for pair, r in zip(pairs, ranks, strict=True)]
