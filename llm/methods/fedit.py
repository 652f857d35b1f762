r"""FedIT ("FL + LoRA"), with zero-padding when ranks differ.

.. math:: B = \sum_k p_k \operatorname{pad}(B_k, r_{max}),\qquad A = \sum_k p_k \operatorname{pad}(A_k, r_{max})

where ``p_k = n_k / sum_j n_j`` (data weights). Equal ranks make it FedAvg of the factors.
Client: downloads ``truncate(global, r_k)`` and the head, trains ``A``, ``B`` and the head.

Source: Zhang et al., "Towards building the federated GPT: federated instruction tuning", ICASSP 2024
[paper]; zero-padding for mixed ranks as in HetLoRA's baseline.
"""

from __future__ import annotations

from .base import Method, PairOptions

__all__ = ["FedIT"]


class FedIT(Method):
    """FedIT: server ``aggregate("zero_pad", pairs, n_k)``, prefix download."""

    Options = PairOptions
    name, title, rule = "fedit", "FedIT (zero-pad)", "zero_pad"
