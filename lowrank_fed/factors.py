r"""The data model of the core: a LoRA update as a pair of factors.

A ``FactorPair(B, A)`` stands for the update

.. math:: \Delta W = B A = \sum_{i < r} b_i a_i^\top,

where ``B`` has shape ``(d_out, r)``, ``A`` has shape ``(r, d_in)``, ``b_i = B[:, i]`` and
``a_i = A[i, :]``. Index ``i`` is a *slot*. The core never sees PEFT's scale ``s``: the torch
bridge folds it into ``B`` on the way in (docs/methods.md#notation-and-the-scale-folding).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

from array_api_compat import device

from ._arrays import check_rank, namespace

__all__ = ["FactorPair", "truncate", "pad", "difference"]


class FactorPair(namedtuple("FactorPair", ["B", "A"])):
    r"""A LoRA update ``Delta W = B @ A``.

    Parameters
    ----------
    B : array, shape (d_out, r)
    A : array, shape (r, d_in)
        Both from the same array library (NumPy, torch, or any array-API library).

    Raises
    ------
    TypeError
        If ``B`` and ``A`` are not arrays of one library.
    ValueError
        If they are not 2-D or their inner dimensions disagree.

    Examples
    --------
    >>> import numpy as np
    >>> pair = FactorPair(np.ones((4, 2)), np.ones((2, 3)))
    >>> pair.rank, pair.shape
    (2, (4, 3))
    """

    __slots__ = ()

    def __new__(cls, B: Any, A: Any) -> "FactorPair":
        namespace(B, A)
        if B.ndim != 2 or A.ndim != 2:
            raise ValueError(
                f"FactorPair needs 2-D factors: B (d_out, r) and A (r, d_in). "
                f"Got B.ndim = {B.ndim}, A.ndim = {A.ndim}."
            )
        if B.shape[1] != A.shape[0]:
            raise ValueError(
                f"FactorPair rank mismatch: B has {B.shape[1]} columns but A has {A.shape[0]} rows; "
                "expected equal (the rank r)."
            )
        return super().__new__(cls, B, A)

    @property
    def rank(self) -> int:
        """Number of slots ``r`` (an upper bound on the rank of ``B @ A``)."""
        return int(self.B.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)``, the shape of ``B @ A``."""
        return int(self.B.shape[0]), int(self.A.shape[1])


def truncate(pair: FactorPair, rank: int) -> FactorPair:
    r"""Keep the first ``rank`` slots: ``(B[:, :rank], A[:rank, :])``.

    Parameters
    ----------
    pair : FactorPair, rank r
    rank : int, ``0 <= rank <= r``

    Returns
    -------
    FactorPair of rank ``rank``; ``truncate(pad(p, R), p.rank)`` is ``p``.

    Examples
    --------
    >>> import numpy as np
    >>> truncate(FactorPair(np.ones((4, 3)), np.ones((3, 5))), 1).rank
    1
    """
    if not isinstance(pair, FactorPair):
        raise TypeError(f"Expected a FactorPair. Got {type(pair).__name__}.")
    rank = check_rank(rank, low=0, high=pair.rank)
    return FactorPair(pair.B[:, :rank], pair.A[:rank, :])


def pad(pair: FactorPair, rank: int) -> FactorPair:
    r"""Append ``rank - r`` zero slots: zero columns to ``B``, zero rows to ``A``.

    The product is unchanged: ``pad(p, R).B @ pad(p, R).A == p.B @ p.A``.

    Parameters
    ----------
    pair : FactorPair, rank r
    rank : int, ``rank >= r``

    Examples
    --------
    >>> import numpy as np
    >>> pad(FactorPair(np.ones((4, 1)), np.ones((1, 5))), 3).B[:, 1:].sum()
    np.float64(0.0)
    """
    if not isinstance(pair, FactorPair):
        raise TypeError(f"Expected a FactorPair. Got {type(pair).__name__}.")
    rank = check_rank(rank, low=pair.rank, high=None)
    extra = rank - pair.rank
    if extra == 0:
        return pair
    xp = namespace(pair.B, pair.A)
    d_out, d_in = pair.shape
    zB = xp.zeros((d_out, extra), dtype=pair.B.dtype, device=device(pair.B))
    zA = xp.zeros((extra, d_in), dtype=pair.A.dtype, device=device(pair.A))
    return FactorPair(xp.concat([pair.B, zB], axis=1), xp.concat([pair.A, zA], axis=0))


def difference(after: FactorPair, before: FactorPair) -> FactorPair:
    r"""The change ``after - before`` as one pair, never densified: ``[B_1, -B_0] [A_1; A_0]``.

    ``difference(a, b).B @ difference(a, b).A == a.B @ a.A - b.B @ b.A``, of rank ``r_1 + r_0`` (the ranks may
    differ). Used to score what a client learnt in one round (its upload minus its download).

    Examples
    --------
    >>> import numpy as np
    >>> d = difference(FactorPair(np.ones((4, 2)), np.ones((2, 5))), FactorPair(np.ones((4, 1)), np.ones((1, 5))))
    >>> d.rank, float((d.B @ d.A).max())
    (3, 1.0)
    """
    if not isinstance(after, FactorPair) or not isinstance(before, FactorPair):
        raise TypeError(f"Expected two FactorPairs. Got {type(after).__name__} and {type(before).__name__}.")
    if after.shape != before.shape:
        raise ValueError(f"difference: after has shape {after.shape} and before {before.shape}; expected the same "
                         f"(d_out, d_in).")
    xp = namespace(after.B, after.A, before.B, before.A)
    return FactorPair(xp.concat([after.B, -xp.astype(before.B, after.B.dtype)], axis=1),
                      xp.concat([after.A, xp.astype(before.A, after.A.dtype)], axis=0))
