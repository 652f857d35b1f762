r"""Rank assignments: one LoRA rank per client (explicit, FLoRA's mix, LoRA-A2's distributions, top 10%)."""

from __future__ import annotations

import numpy as np

from ..catalog import FLORA_RANKS, RANK_DISTRIBUTIONS
from .partitions import _allocate

__all__ = ["assign_ranks", "FLORA_RANKS", "RANK_DISTRIBUTIONS"]

# FLORA_RANKS and RANK_DISTRIBUTIONS are name tables, written once in ..catalog (torch-free), re-exported here.



def assign_ranks(spec, n_clients: int, *, rng: np.random.Generator | None = None, rank_set=(1, 2, 4, 8, 16, 32),
                 scores=None, high: int = 20, low: int = 5) -> list[int]:
    r"""One LoRA rank per client.

    Parameters
    ----------
    spec : list of int, int, or str
        - a list: explicit ranks (length ``n_clients``); an int: every client;
        - ``"flora"``: FLoRA's ``[64, 32, 16, 16, 8, 8, 4, 4, 4, 4]``, cycled past 10 clients;
        - ``"uniform"``, ``"heavy_tail"``, ``"normal"``: LoRA-A2's client counts over ``rank_set``
          (6/6/6/6/6/6, 16/8/4/2/2/0, 3/7/10/7/3/0), scaled to ``n_clients`` by largest remainder,
          then shuffled with ``rng``;
        - ``"top10"``: Byun & Lee (2024): the top 10% of clients by ``scores`` get rank ``high``
          (20), the others ``low`` (5). Byun & Lee rank clients by validation accuracy; the runner
          passes the client data sizes as the quality score [ours].
    n_clients : int
    rng : numpy Generator, for the shuffled distributions
    """
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        ranks = [int(spec)] * n_clients
    elif isinstance(spec, (list, tuple)):
        if len(spec) != n_clients:
            raise ValueError(f"The 'ranks' list must have one entry per client: expected {n_clients}, got {len(spec)}.")
        ranks = [int(r) for r in spec]
    elif spec == "flora":
        ranks = [FLORA_RANKS[k % len(FLORA_RANKS)] for k in range(n_clients)]
    elif spec in RANK_DISTRIBUTIONS:
        counts = RANK_DISTRIBUTIONS[spec]
        if len(rank_set) != len(counts):
            raise ValueError(f"Rank distribution {spec!r} needs a rank set of {len(counts)} ranks. Got {list(rank_set)}.")
        alloc = _allocate(counts, n_clients)
        ranks = [int(r) for r, m in zip(rank_set, alloc, strict=True) for _ in range(m)]
        ranks = [ranks[i] for i in (rng if rng is not None else np.random.default_rng(0)).permutation(n_clients)]
    elif spec == "top10":
        if scores is None or len(scores) != n_clients:
            raise ValueError("Rank assignment 'top10' needs one quality score per client.")
        n_top = max(1, int(round(0.1 * n_clients)))
        top = set(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:n_top].tolist())
        ranks = [high if k in top else low for k in range(n_clients)]
    else:
        raise ValueError(
            f"Unknown rank assignment {spec!r}; expected a list of ints, an int, or one of "
            f"{['flora', 'top10', *RANK_DISTRIBUTIONS]}."
        )
    bad = [r for r in ranks if r < 1]
    if bad:
        raise ValueError(f"Ranks must be positive. Got {ranks}.")
    return ranks
