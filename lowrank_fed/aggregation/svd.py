r"""FlexLoRA's SVD aggregation, computed from the factors, and redistribution to client ranks."""

from __future__ import annotations

from .._validation import check_rank
from ..factors import FactorPair, pad, truncate
from ..linalg import _factored_svd, balanced_pair
from ._common import prepare

__all__ = ["aggregate_svd", "redistribute", "REDISTRIBUTE_METHODS"]

REDISTRIBUTE_METHODS = ("prefix", "svd")


def aggregate_svd(pairs, weights=None, *, rank: int | None = None) -> FactorPair:
    r"""SVD of the weighted sum of products, optionally truncated.

    .. math::

        \sum_k p_k B_k A_k = U \operatorname{diag}(S) V^h,\qquad
        B = U_{:, :t} \operatorname{diag}(\sqrt{S_{:t}}),\quad A = \operatorname{diag}(\sqrt{S_{:t}}) V^h_{:t, :}

    where ``t = rank`` (or ``m = min(R, d_out, d_in)`` when ``rank`` is None, which makes
    ``B A`` exact). With a rank, ``B A`` is the Eckart-Young best rank-``t`` approximation:
    ``||sum_k p_k B_k A_k - B A||_F^2 = sum_{i >= t} S_i^2``.

    Parameters
    ----------
    pairs : list of FactorPair of ranks r_k
    weights : array-like, shape (K,), optional
    rank : int, optional
        ``1 <= rank <= min(d_out, d_in)``; slots past ``m`` are zero.

    Returns
    -------
    FactorPair of rank ``rank`` (or ``m``).

    Notes
    -----
    FlexLoRA (Bai et al., NeurIPS 2024). [paper] Computed by :func:`lowrank_fed.factored_svd`
    (QR of the stacked factors, SVD of the small core), never forming ``d_out x d_in``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> pairs = [FactorPair(rng.normal(size=(5, 2)), rng.normal(size=(2, 4))) for _ in range(3)]
    >>> aggregate_svd(pairs, rank=2).rank
    2
    """
    xp, pairs, p = prepare(pairs, weights)
    d_out, d_in = pairs[0].shape
    if rank is not None:
        rank = check_rank(rank, low=1, high=min(d_out, d_in))
    U, S, Vh = _factored_svd(xp, pairs, p)
    return balanced_pair(xp, U, S, Vh, S.shape[0] if rank is None else rank)


def redistribute(pair: FactorPair, rank: int, method: str = "prefix") -> FactorPair:
    r"""What a client of rank ``rank`` downloads from the global pair.

    - ``"prefix"``: the first ``rank`` slots, ``truncate(pair, rank)`` (zero-padded if the global
      pair has fewer slots). Used by HetLoRA, PreLort, segment/replication.
    - ``"svd"``: the best rank-``rank`` approximation of ``B A`` (FlexLoRA's redistribution),
      ``U_r diag(sqrt(S_r))``, ``diag(sqrt(S_r)) Vh_r``.

    Parameters
    ----------
    pair : FactorPair, rank R, ``B`` shape (d_out, R)
    rank : int, >= 1
    method : {"prefix", "svd"}

    Examples
    --------
    >>> import numpy as np
    >>> redistribute(FactorPair(np.ones((3, 4)), np.ones((4, 2))), 1, method="svd").rank
    1
    """
    if method not in REDISTRIBUTE_METHODS:
        raise ValueError(f"Unknown redistribution method {method!r}; expected one of {list(REDISTRIBUTE_METHODS)}.")
    if not isinstance(pair, FactorPair):
        raise TypeError(f"Expected a FactorPair. Got {type(pair).__name__}.")
    rank = check_rank(rank, low=1, high=None)
    if method == "prefix":
        return truncate(pair, rank) if rank <= pair.rank else pad(pair, rank)
    xp, [pair], p = prepare([pair], None)
    U, S, Vh = _factored_svd(xp, [pair], p)
    return balanced_pair(xp, U, S, Vh, rank)
