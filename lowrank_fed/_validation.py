r"""Validation at the public boundary and array-namespace resolution.

Every public function of the core resolves the array namespace of its inputs here
(``xp = namespace(B, A, ...)``) and validates once, with one message style: what was wrong,
where (the client index), the expected and the actual value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace, device, is_array_api_obj

from ._arrays import check_rank, namespace
from .factors import FactorPair

__all__ = [
    "namespace",
    "as_weights",
    "check_pairs",
    "check_rank",
    "check_finite",
    "compute_dtype",
    "like",
    "to_numpy",
    "check_previous",
]


def compute_dtype(xp, dtype):
    r"""The floating dtype in which linear algebra runs: float32 for half precisions, else ``dtype``."""
    return dtype if dtype in (xp.float64, xp.float32) else xp.float32


def check_finite(xp, x, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if ``x`` has a NaN or an infinity."""
    if not bool(xp.all(xp.isfinite(x))):
        n_bad = int(xp.sum(xp.astype(~xp.isfinite(x), xp.int64)))
        raise ValueError(f"{what} has {n_bad} non-finite entries (NaN or Inf); expected all finite.")


def check_pairs(pairs: Sequence, *, finite: bool = True, equal_ranks: bool = False):
    r"""Validate a list of client factor pairs.

    Checks: non-empty list of ``FactorPair``; one array library; every ``B_k`` is ``(d_out, r_k)``,
    every ``A_k`` is ``(r_k, d_in)`` with the ``d_out``/``d_in`` of client 0; entries finite;
    optionally all ranks equal.

    Returns
    -------
    xp : namespace
    pairs : list of FactorPair
    """
    if isinstance(pairs, FactorPair) or not isinstance(pairs, Sequence):
        raise TypeError(
            f"Expected a list of FactorPair, one per client. Got {type(pairs).__name__}."
        )
    if len(pairs) == 0:
        raise ValueError("Expected at least one client update. Got an empty list.")
    for k, pair in enumerate(pairs):
        if not isinstance(pair, FactorPair):
            raise TypeError(f"Client {k}: expected a FactorPair(B, A). Got {type(pair).__name__}.")
    xp = namespace(*[x for pair in pairs for x in pair])
    d_out, d_in = pairs[0].B.shape[0], pairs[0].A.shape[1]
    r0 = pairs[0].rank
    for k, pair in enumerate(pairs):
        for name, x in zip("BA", pair, strict=True):
            if not xp.isdtype(x.dtype, "real floating"):
                raise TypeError(f"Client {k}: {name} has dtype {x.dtype}; expected a real floating dtype.")
        if pair.B.shape[0] != d_out:
            raise ValueError(
                f"Client {k}: B has d_out = {pair.B.shape[0]}; expected {d_out} (the d_out of client 0)."
            )
        if pair.A.shape[1] != d_in:
            raise ValueError(
                f"Client {k}: A has d_in = {pair.A.shape[1]}; expected {d_in} (the d_in of client 0)."
            )
        if equal_ranks and pair.rank != r0:
            raise ValueError(
                f"Client {k}: rank {pair.rank}; this rule needs equal ranks, expected {r0} "
                "(the rank of client 0). Use 'segment', 'zero_pad', 'stack' or 'svd' for mixed ranks."
            )
        if finite:
            check_finite(xp, pair.B, f"Client {k}: B")
            check_finite(xp, pair.A, f"Client {k}: A")
    return xp, list(pairs)


def as_weights(weights: Any, n_clients: int) -> np.ndarray:
    r"""Normalised client weights ``p_k = w_k / sum_j w_j`` as a float64 NumPy vector.

    ``None`` means uniform. Weights must be finite, non-negative, one per client, with a positive sum.
    """
    if weights is None:
        return np.full(n_clients, 1.0 / n_clients)
    if is_array_api_obj(weights) and not isinstance(weights, np.ndarray):
        xp = array_namespace(weights)
        weights = [float(v) for v in xp.reshape(weights, (-1,))]
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape[0] != n_clients:
        raise ValueError(
            f"The 'weights' parameter must have one entry per client: expected {n_clients}, got {w.shape[0]}."
        )
    shown = np.array2string(w, precision=4, separator=", ")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(
            f"The 'weights' parameter must be finite and non-negative with a positive sum. Got {shown}."
        )
    return w / w.sum()


def like(xp, values: np.ndarray, ref) -> Any:
    """``values`` (NumPy) as an array of ``ref``'s namespace, dtype and device."""
    return xp.asarray(np.ascontiguousarray(values), dtype=ref.dtype, device=device(ref))


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy copy (or view) of any array-API array, from any device."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach"):  # torch, possibly on an accelerator
        return x.detach().cpu().numpy()
    try:
        return np.from_dlpack(x)
    except (TypeError, RuntimeError, BufferError, AttributeError):
        return np.asarray(x)


def check_previous(xp, previous, shape: tuple[int, int], what: str = "previous"):
    """Validate the ``previous`` global pair of a rule: a finite FactorPair of the clients' ``(d_out, d_in)``."""
    if not isinstance(previous, FactorPair):
        raise TypeError(f"The {what!r} parameter must be a FactorPair. Got {type(previous).__name__}.")
    if namespace(previous.B) is not xp:
        raise TypeError(
            f"The {what!r} parameter must come from the clients' array library. "
            f"Got {type(previous.B).__module__}.{type(previous.B).__name__}."
        )
    if previous.shape != tuple(shape):
        raise ValueError(
            f"The {what!r} parameter has shape (d_out, d_in) = {previous.shape}; expected {tuple(shape)} "
            "(that of the client updates)."
        )
    check_finite(xp, previous.B, f"The {what!r} parameter: B")
    check_finite(xp, previous.A, f"The {what!r} parameter: A")
