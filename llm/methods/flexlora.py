r"""FlexLoRA: exact SVD aggregation and SVD redistribution to each client's rank.

.. math:: \sum_k p_k B_k A_k = U \operatorname{diag}(S) V^h,\qquad
          B^{(k)} = U_{:, :r_k} \operatorname{diag}(S_{:r_k}),\quad A^{(k)} = V^h_{:r_k, :}

The server's rule is ``aggregate("svd", pairs, n_k)`` (never densified), every module at once on parallel
threads (:func:`lowrank_fed.aggregation.aggregate_modules`). A client of rank ``r_k``
downloads the best rank-``r_k`` approximation in the reference convention: ``A`` with orthonormal rows,
completed by an orthonormal complement when the global has fewer than ``r_k`` directions (so every
slot a client holds has a gradient). Before the first aggregation clients take the prefix of the shared
initial adapter.

Source: Bai et al., "Federated fine-tuning of large language models under heterogeneous tasks and client
resources", NeurIPS 2024 [paper; download convention from FederatedScope's ``distribute_weight_fast``].
"""

from __future__ import annotations

from lowrank_fed import redistribute
from lowrank_fed.aggregation import aggregate_modules

from ..protocol import decode_pairs
from .base import Method, weights_of

__all__ = ["FlexLoRA"]


class FlexLoRA(Method):
    """FlexLoRA: ``aggregate("svd", ...)``; download ``redistribute(global, r_k, "svd")``."""

    name, title, rule = "flexlora", "FlexLoRA", "svd"

    def download_pairs(self, server, rank):
        if not server.info.get("aggregated"):
            return super().download_pairs(server, rank)
        # redistribute(g, r, "svd") is the first r slots of redistribute(g, r_cap, "svd"): one SVD per
        # module serves every rank (computed once per round).
        if "svd" not in server.cache:
            r_cap = max(server.ranks.values())
            server.cache["svd"] = {m: redistribute(p, r_cap, method="svd") for m, p in server.pairs.items()}
        return {m: redistribute(p, rank, method="prefix") for m, p in server.cache["svd"].items()}

    def download_is_global(self, server, rank):
        return False  # an SVD re-factorisation: the same product only up to rounding

    def aggregate(self, server, replies):
        decoded = [decode_pairs(r.arrays) for r in replies.values()]
        pairs = aggregate_modules(self.rule, {m: [d[m] for d in decoded] for m in server.shapes}, weights_of(replies))
        return self.next_state(server, replies, pairs=pairs)
