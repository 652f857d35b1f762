r"""LoRA-A2: alternating-freeze server step and model-wide adaptive slot selection."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from array_api_compat import device

from .._validation import as_weights, check_finite, check_rank, namespace, to_numpy
from ..factors import FactorPair
from ._common import weighted_sum
from .slotwise import check_slots, slot_embedding

__all__ = ["alternating_update", "select_slots"]


def alternating_update(global_pair: FactorPair, deltas, weights=None, *, factor: str = "B", slots=None) -> FactorPair:
    r"""LoRA-A2's server step: update one factor by the weighted mean of the client deltas.

    .. math::

        \text{factor="B"}:\ B \leftarrow B + \sum_k p_k\, \Delta B_k,\ A \text{ unchanged};\qquad
        \text{factor="A"}:\ A \leftarrow A + \sum_k p_k\, \Delta A_k,\ B \text{ unchanged}

    Exact for the product: with ``A`` frozen, ``(B + sum_k p_k dB_k) A = sum_k p_k (B + dB_k) A``,
    the weighted mean of the clients' local products (likewise for ``B`` frozen).

    where ``p_k`` are the normalised weights; no per-slot renormalisation (LoRA-A2, ACL 2025).

    Parameters
    ----------
    global_pair : FactorPair, rank R
    deltas : list of arrays
        ``dB_k`` shape ``(d_out, R)`` (or ``(d_out, |slots_k|)`` with ``slots``) when
        ``factor="B"``; ``dA_k`` shape ``(R, d_in)`` (or ``(|slots_k|, d_in)``) when ``factor="A"``.
    weights : array-like, shape (K,), optional
    factor : {"B", "A"}
        The factor trained this round (odd rounds B, even rounds A, 1-based).
    slots : list of int arrays, optional
        Masked uploads: client ``k``'s delta holds only the slots ``slots[k]`` (in that order);
        the other slots of its delta are zero.

    Returns
    -------
    FactorPair of rank R.

    Notes
    -----
    LoRA-A2 (ACL 2025), docs/methods.md#lora-a2. [paper]

    Examples
    --------
    >>> import numpy as np
    >>> g = FactorPair(np.zeros((2, 1)), np.ones((1, 3)))
    >>> alternating_update(g, [np.ones((2, 1)), 3 * np.ones((2, 1))]).B.ravel().tolist()
    [2.0, 2.0]
    """
    if factor not in ("B", "A"):
        raise ValueError(f"The 'factor' parameter must be 'B' or 'A'. Got {factor!r}.")
    if not isinstance(global_pair, FactorPair):
        raise TypeError(f"The 'global_pair' parameter must be a FactorPair. Got {type(global_pair).__name__}.")
    if len(deltas) == 0:
        raise ValueError("Expected at least one client delta. Got an empty list.")
    xp = namespace(global_pair.B, global_pair.A, *deltas)
    p = as_weights(weights, len(deltas))
    R = global_pair.rank
    d_out, d_in = global_pair.shape
    ranks = [int(d.shape[1] if factor == "B" else d.shape[0]) if d.ndim == 2 else -1 for d in deltas]
    if slots is not None:
        slots, _ = check_slots(slots, ranks, R)
    for k, d in enumerate(deltas):
        width = R if slots is None else len(slots[k])
        expected = (d_out, width) if factor == "B" else (width, d_in)
        if tuple(d.shape) != expected:
            raise ValueError(f"Client {k}: d{factor} has shape {tuple(d.shape)}; expected {expected}.")
        check_finite(xp, d, f"Client {k}: d{factor}")
    if slots is not None:
        Es = [xp.asarray(slot_embedding(idx, R), dtype=global_pair.B.dtype, device=device(global_pair.B)) for idx in slots]
        if factor == "B":
            deltas = [d @ E for d, E in zip(deltas, Es, strict=True)]
        else:
            deltas = [xp.permute_dims(E, (1, 0)) @ d for d, E in zip(deltas, Es, strict=True)]
    step = weighted_sum(list(deltas), p)
    if factor == "B":
        return FactorPair(global_pair.B + step, global_pair.A)
    return FactorPair(global_pair.B, global_pair.A + step)


def select_slots(scores: Mapping[str, object], budget: int) -> dict[str, np.ndarray]:
    r"""Model-wide top-``budget`` slot selection (LoRA-A2's adaptive rank selection).

    .. math::

        \mathcal S = \operatorname{top}_{\text{budget}} \{ (m, i) : s_{m,i} \},\qquad
        \text{result}[m] = \operatorname{sort}\{ i : (m, i) \in \mathcal S \}

    where ``s_{m,i}`` is the score of slot ``i`` of module ``m``, e.g. ``||dB_k[:, i]|| ||A[i, :]||``
    in a B-round. A module may get anywhere from 0 to all of its slots. Ties go to the earlier
    module (in the mapping's order), then to the lower slot index.

    Parameters
    ----------
    scores : mapping module name -> array, shape (R_m,)
        Finite slot scores.
    budget : int
        Total number of slots to select, ``0 <= budget <= sum_m R_m`` (``r_k * N`` in LoRA-A2).

    Returns
    -------
    dict module name -> sorted int64 NumPy array of slot indices.

    Examples
    --------
    >>> import numpy as np
    >>> sel = select_slots({"q": np.array([0.1, 5.0]), "v": np.array([3.0, 0.2])}, 2)
    >>> {k: v.tolist() for k, v in sel.items()}
    {'q': [1], 'v': [0]}
    """
    if not isinstance(scores, Mapping) or len(scores) == 0:
        raise ValueError("The 'scores' parameter must be a non-empty mapping of module name -> slot scores.")
    names = list(scores)
    values = []
    for name in names:
        s = np.asarray(to_numpy(scores[name]), dtype=np.float64)
        if s.ndim != 1:
            raise ValueError(f"Module {name!r}: scores must have shape (R,). Got shape {s.shape}.")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"Module {name!r}: scores have non-finite entries; expected all finite.")
        values.append(s)
    total = sum(s.size for s in values)
    budget = check_rank(budget, low=0, high=total, what="budget")
    flat = np.concatenate(values)
    owner = np.concatenate([np.full(s.size, m) for m, s in enumerate(values)])
    index = np.concatenate([np.arange(s.size) for s in values])
    chosen = np.argsort(-flat, kind="stable")[:budget]  # stable: ties keep module, then slot order
    return {name: np.sort(index[chosen][owner[chosen] == m]) for m, name in enumerate(names)}
