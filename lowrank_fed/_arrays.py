r"""The array namespace of the inputs and the rank check: what :mod:`.factors` needs, below :mod:`._validation`.

``_validation`` re-exports both, so every public function still resolves ``xp = namespace(B, A, ...)`` there.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_array_api_obj

__all__ = ["namespace", "check_rank"]


def namespace(*arrays: Any):
    r"""Return the array-API namespace shared by ``arrays``.

    Raises
    ------
    TypeError
        If an input is not an array, or the inputs come from different array libraries
        (for example a NumPy array next to a torch tensor).
    """
    libraries = {}  # top-level module -> a class name seen (torch.nn.Parameter is a torch array)
    for x in arrays:
        if not is_array_api_obj(x):
            raise TypeError(
                f"Expected an array (NumPy, torch or any array-API array). Got {type(x).__name__}."
            )
        library = type(x).__module__.split(".")[0]
        libraries.setdefault(library, f"{library}.{type(x).__name__}")
    if len(libraries) > 1:
        raise TypeError(
            "Mixed array types: all inputs must come from one array library. "
            f"Got {sorted(libraries.values())}."
        )
    return array_namespace(*arrays)


def check_rank(rank: Any, *, low: int, high: int | None, what: str = "rank") -> int:
    """Return ``rank`` as an int if ``low <= rank <= high``; raise a ``ValueError``/``TypeError`` otherwise."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"The {what!r} parameter must be an int. Got {rank!r} ({type(rank).__name__}).")
    rank = int(rank)
    if rank < low or (high is not None and rank > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"The {what!r} parameter must be {bound}. Got {rank}.")
    return rank
