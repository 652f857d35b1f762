r"""FLoRA's stacking: concatenate the clients' slots, exact for the weighted sum of products."""

from __future__ import annotations

from ..factors import FactorPair
from ._common import prepare

__all__ = ["aggregate_stack"]


def aggregate_stack(pairs, weights=None) -> FactorPair:
    r"""Stack the client factors.

    .. math::

        B = [B_1\ \cdots\ B_K],\qquad A = \begin{bmatrix} p_1 A_1 \\ \vdots \\ p_K A_K \end{bmatrix},
        \qquad B A = \sum_k p_k B_k A_k \ \text{(exact)}

    Parameters
    ----------
    pairs : list of FactorPair of ranks r_k
    weights : array-like, shape (K,), optional

    Returns
    -------
    FactorPair of rank ``R = sum_k r_k``.

    Notes
    -----
    FLoRA (Wang et al., NeurIPS 2024). [paper] FLoRA merges this product into ``W0`` and the
    clients start fresh adapters each round; that policy lives in the torch layer.

    Examples
    --------
    >>> import numpy as np
    >>> pairs = [FactorPair(np.ones((2, 1)), np.ones((1, 2))), FactorPair(np.ones((2, 2)), np.ones((2, 2)))]
    >>> aggregate_stack(pairs, weights=[1, 1]).rank
    3
    """
    xp, pairs, p = prepare(pairs, weights)
    B = xp.concat([pair.B for pair in pairs], axis=1)
    A = xp.concat([pair.A * float(pk) for pair, pk in zip(pairs, p, strict=True)], axis=0)
    return FactorPair(B, A)
