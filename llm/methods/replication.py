r"""Replication padding (Byun & Lee, 2024).

.. math:: \tilde B_k[:, i] = \begin{cases} B_k[:, i] & i < r_k \\ \bar b_i & i \ge r_k \end{cases},\qquad
          B = \sum_k p_k \tilde B_k,\qquad \bar b_i = \frac{\sum_{j: r_j > i} p_j b_{j,i}}{\sum_{j: r_j > i} p_j}

(``A`` likewise): a client's missing slots are filled with the mean of the clients that have them, then
FedAvg. Algebraically equal to the segment rule. Client: prefix download, ``A``, ``B`` and head trained.

Source: Byun & Lee, "Towards federated low-rank adaptation of language models with rank heterogeneity",
2024 [paper].
"""

from __future__ import annotations

from .base import Method, PairOptions

__all__ = ["Replication"]


class Replication(Method):
    """Replication padding: server ``aggregate("replication", pairs, n_k)``, prefix download."""

    Options = PairOptions
    name, title, rule = "replication", "Replication", "replication"
