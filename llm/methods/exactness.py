r"""How exact a round's aggregation is: ``aggregation_error`` per module and for the whole adapter.

For a round whose aggregated clients ``k`` trained the pairs ``(B_k, A_k)`` of module ``m`` (their whole
adapter after the round, folded: ``B_k A_k = Delta W_k``) with data weights ``p_k = n_k / sum_j n_j``, and whose
server produced the global pair ``(B_hat, A_hat)``:

.. math::

    e_m = \frac{\lVert \sum_k p_k B_k A_k - \hat B \hat A \rVert_F}{\lVert \sum_k p_k B_k A_k \rVert_F},
    \qquad
    e = \frac{\sqrt{\sum_m \lVert \cdot \rVert_F^2}}{\sqrt{\sum_m \lVert \sum_k p_k B_k A_k \rVert_F^2}}

computed from small QR cores, never a ``d_out x d_in`` matrix (:func:`lowrank_fed.linalg.aggregation_error`,
:func:`lowrank_fed.linalg.pooled_error`). The target is the data-weighted mean of the clients' trained updates,
the aggregate full fine-tuning with FedAvg would give, for every method alike; what a method does differently
shows up in ``e``:

- 0 (to rounding): FlexLoRA (``svd``), FLoRA (``stack``; its target and result are the round's merge), FFA-LoRA
  (``A`` shared and frozen) and LoRA-A2 (one factor frozen a round);
- the cross terms of averaging factors and the dilution of zero-padding: FedIT, HetLoRA (whose norm weights
  also differ from the data weights), replication, PreLort's segments, HAFL's slot-wise average; and slots no
  participant held keep their earlier value, which the error includes;
- CLAIR and the oracle: the target is over the clients they kept (not flagged), with their weights ``pi``;
  the error is the truncation of the benign mean to ``r_max``;
- none (no global adapter): FedSA-LoRA (``B`` stays on the clients), local training.

A method says what its clients trained with :meth:`~.base.Method.aggregation_target` and what its server made
with :meth:`~.base.Method.aggregation_result`; :func:`aggregation_errors` compares them.
"""

from __future__ import annotations

from collections.abc import Mapping

from lowrank_fed.linalg import aggregation_error, pooled_error

from ..protocol import Message
from .base import Method, ServerState

__all__ = ["aggregation_errors", "error_fields"]


def aggregation_errors(method: Method, server: ServerState, replies: Mapping[int, Message],
                       new: ServerState) -> dict[str, tuple[float, float]] | None:
    r"""``{module: (numerator, denominator)}`` of :func:`~lowrank_fed.linalg.aggregation_error` for one round.

    ``server`` is the state before the round, ``replies`` the replies the method aggregated and ``new`` the state
    it returned. None when the method has no global adapter to compare (:meth:`Method.aggregation_target`).
    """
    target = method.aggregation_target(server, replies, new)
    if target is None:
        return None
    clients, weights = target
    result = method.aggregation_result(new)
    return {m: aggregation_error([c[m] for c in clients], weights, result[m]) for m in sorted(result)}


def error_fields(parts: Mapping[str, tuple[float, float]] | None) -> dict:
    """The round's metrics: ``aggregation_error`` (whole adapter) and ``aggregation_error_modules`` (per module)."""
    if parts is None:
        return {}
    per_module = {m: (n / d if d > 0 else 0.0) for m, (n, d) in parts.items()}
    return {"aggregation_error": pooled_error(parts.values()), "aggregation_error_modules": per_module}
