r"""HetLoRA's server rule: zero-pad every client to the largest rank, then average factor-wise."""

from __future__ import annotations

import numpy as np

from ..factors import FactorPair, pad
from ..linalg import product_fro_norm
from ._common import prepare, weighted_sum

__all__ = ["aggregate_zero_pad", "WEIGHTINGS"]

WEIGHTINGS = ("data", "frobenius")


def aggregate_zero_pad(pairs, weights=None, *, weighting: str = "data") -> FactorPair:
    r"""Zero-padding aggregation.

    .. math::

        B = \sum_k q_k \operatorname{pad}(B_k, r_{max}),\qquad
        A = \sum_k q_k \operatorname{pad}(A_k, r_{max})

    where

    - ``r_max = max_k r_k``;
    - ``q_k = p_k`` (``weighting="data"``), or ``q_k ∝ p_k ||B_k A_k||_F`` (``"frobenius"``,
      HetLoRA's sparsity-weighted aggregation; with uniform ``weights`` this is ``||B_k A_k||_F``).

    Slot ``i`` is therefore ``b_i = sum_{k: r_k > i} q_k b_{k,i}``: shrunk by the factor
    ``sum_{k: r_k > i} q_k`` compared with the owners' mean ("dilution").

    Parameters
    ----------
    pairs : list of FactorPair of ranks r_k, common ``(d_out, d_in)``
    weights : array-like, shape (K,), optional
    weighting : {"data", "frobenius"}

    Returns
    -------
    FactorPair of rank ``r_max``.

    Notes
    -----
    HetLoRA (Cho et al., 2024). [paper abstract + implementations] The Frobenius norms are computed
    from ``r x r`` Gram matrices, never from the product. If every update is zero the data weights
    are used.

    Examples
    --------
    >>> import numpy as np
    >>> pairs = [FactorPair(np.ones((1, 1)), np.ones((1, 1))), FactorPair(np.ones((1, 2)), np.ones((2, 1)))]
    >>> aggregate_zero_pad(pairs).B.tolist()  # slot 1 diluted by 1/2
    [[1.0, 0.5]]
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; expected one of {list(WEIGHTINGS)}.")
    _, pairs, p = prepare(pairs, weights)
    if weighting == "frobenius":
        q = p * np.array([product_fro_norm(pair) for pair in pairs])
        p = q / q.sum() if q.sum() > 0 else p
    r_max = max(pair.rank for pair in pairs)
    padded = [pad(pair, r_max) for pair in pairs]
    return FactorPair(weighted_sum([q.B for q in padded], p), weighted_sum([q.A for q in padded], p))
