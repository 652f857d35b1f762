r"""The round-0 global pairs of a method started from an adapter (``init_adapter``; torch and the core only: the
folder is read by :mod:`lowrank_fed.llm.adapters.start`).

The adapter gives per module ``m`` (scale folded in, :class:`~.folders.Adapter`)

.. math:: \Delta W_0 = s_a B_a A_a = B A,\qquad B = s_a B_a \in \mathbb R^{d_{out}\times r_a},\ A = A_a,

with ``s_a`` the adapter's own scale (its ``lora_alpha``, ``r``, ``use_rslora``, ``alpha_pattern``,
``rank_pattern``). A method's global state holds folded pairs at the method's global rank ``R`` (``r_max``,
LoRA-A2's ``global_rank``); the run's scale ``s(R)`` is divided out only when a client writes the pair into
PEFT (``lora_B = B / s(R)``, so PEFT's ``lora_B`` is ``(s_a / s(R)) B_a``). The start pair is

.. math:: R \ge r_a:\quad B_0 = [\,B \mid 0\,],\quad A_0 = \begin{bmatrix} A \\ A_{rand} \end{bmatrix},
          \qquad B_0 A_0 = B A = \Delta W_0\ \text{(exactly)},

where ``A_rand`` are rows ``r_a..R-1`` of the method's usual initial ``A`` (drawn from ``init_seed``), so the
extra slots start at zero and can train; and for ``R < r_a`` the best rank-``R`` approximation (Eckart-Young)
split as FlexLoRA's download splits it, ``B_0 = U_R diag(S_R)``, ``A_0 = V^h_R``
(:func:`lowrank_fed.redistribute` with ``method="svd"``), with relative error

.. math:: \varepsilon = \frac{\lVert \Delta W_0 - B_0 A_0 \rVert_F}{\lVert \Delta W_0 \rVert_F}
          = \sqrt{\frac{\sum_{i > R} S_i^2}{\sum_i S_i^2}}

(reported in ``setup.json``). A module of the run the adapter lacks starts as usual (``B = 0``, ``A`` random).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lowrank_fed import FactorPair, redistribute, truncate

__all__ = ["start_pair", "start_pairs"]


def start_pair(pair: FactorPair, usual: FactorPair) -> tuple[FactorPair, float]:
    r"""The round-0 pair at the rank ``R`` of ``usual`` (the method's usual initial pair) that continues ``pair``
    (the adapter's folded pair, rank ``r_a``), and its relative error ``eps`` (module docstring).

    ``R >= r_a``: ``B_0 = [B | 0]``, ``A_0 = [A ; usual.A[r_a:]]`` (``eps = 0``, ``B_0 A_0 = B A`` exactly);
    ``R < r_a``: the best rank-``R`` approximation ``(U_R diag(S_R), V^h_R)``. Dtype and device of ``usual``.

    Examples
    --------
    >>> p = FactorPair(torch.ones(3, 1), torch.ones(1, 2))
    >>> q, eps = start_pair(p, FactorPair(torch.zeros(3, 2), torch.full((2, 2), 0.5)))
    >>> q.B.tolist(), q.A.tolist(), eps
    ([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [0.5, 0.5]], 0.0)
    """
    R, r_a = usual.rank, pair.rank
    dtype, device = usual.A.dtype, usual.A.device
    B, A = pair.B.to(dtype=dtype, device=device), pair.A.to(dtype=dtype, device=device)
    if r_a <= R:
        zeros = torch.zeros((B.shape[0], R - r_a), dtype=dtype, device=device)
        return FactorPair(torch.cat([B, zeros], dim=1), torch.cat([A, usual.A[r_a:]], dim=0)), 0.0
    full = redistribute(FactorPair(pair.B.double(), pair.A.double()), r_a, method="svd")  # B = U diag(S), A = Vh
    S2 = full.B.norm(dim=0) ** 2
    total = float(S2.sum())
    eps = math.sqrt(float(S2[R:].sum()) / total) if total > 0 else 0.0
    best = truncate(full, R)
    return FactorPair(best.B.to(dtype=dtype, device=device), best.A.to(dtype=dtype, device=device)), eps


def start_pairs(start: Mapping[str, FactorPair], usual: Mapping[str, FactorPair]
                ) -> tuple[dict[str, FactorPair], dict[str, float]]:
    r""":func:`start_pair` for each module of ``usual``: the adapter's where it has the module, ``usual``'s pair
    otherwise. Returns the pairs (in ``usual``'s order) and each adapted module's relative error."""
    pairs, errors = {}, {}
    for m, pair in usual.items():
        if m in start:
            pairs[m], errors[m] = start_pair(start[m], pair)
        else:
            pairs[m] = pair
    return pairs, errors
