r"""PreLort: prefix-nested training on the clients, segment-wise aggregation on the server.

Client ``k`` of rank ``r_k`` downloads ``truncate(global, r_k)`` and optimises its adapter under the
truncations

.. math:: T_k = \{\rho_l \le r_k\} \cup \{r_k\},\qquad
          \mathcal L_k = \frac{1}{|T_k|} \sum_{\tau \in T_k} \ell\big(W_0 + s\, B_{:, :\tau} A_{:\tau, :};\ x\big)

where ``rho_1 < .. < rho_L`` are the federation's distinct ranks (sent in the download's config as
``ranks_ladder``), ``B_{:, :tau} A_{:tau, :}`` the first ``tau`` slots of the live adapter (a mask in the
forward pass, :mod:`lowrank_fed.llm.training.truncation`, never a copy), and ``x`` a batch. It uploads
its whole ``(B_k, A_k)``. Server: each slot averaged over the clients that hold it,

.. math:: b_i = \frac{\sum_{k: r_k > i} p_k b_{k,i}}{\sum_{k: r_k > i} p_k},\qquad a_i \text{ likewise}

(``aggregate("segment", pairs, n_k, previous=global)``); a slot no participant holds keeps its
previous global value.

Source: PreLort [abstract]. Our reconstruction (``docs/methods.md``, ``ALGORITHMS.md`` section 2): the
segment rule's details; ``T_k`` as every distinct federation rank up to ``r_k``; uniform weights
``lambda_tau = 1/|T_k|``; the cheap variant's uniform draw of one ``tau`` per batch (ordered dropout /
Matryoshka). A client with ``T_k = {r_k}`` (the smallest rank) trains exactly as with ``nested = "off"``.

Options
-------
nested : {"sample", "all", "off"}
    ``"sample"`` (default): one ``tau ~ Uniform(T_k)`` per batch from the client's round generator
    (seeded by ``(seed, round, client)``), one forward pass per batch; the optimiser step of that batch
    leaves the slots ``i >= tau`` untouched, parameters and optimiser state
    (:mod:`~lowrank_fed.llm.training.truncation`). ``"all"``: the mean of the
    ``|T_k|`` truncated losses per batch (``|T_k|`` forward passes). ``"off"``: plain training of the
    whole adapter (PreLort's aggregation alone).

The reply's metrics carry ``nested_truncations`` (``T_k``), ``nested_counts`` (how many batches used
each ``tau``, in that order) and, for ``"sample"``, ``nested_taus`` (the ``tau`` of every step). Whether
nesting acted is read off ``prefix_share`` in ``metrics.jsonl`` (every method's clients report it): the
share of the round's update ``||Delta W_{:t}||_F^2 / ||Delta W||_F^2`` carried by the first ``t`` slots, at
each federation rank ``t < r_k`` (:func:`~lowrank_fed.llm.training.prefix_shares`). It needs local
rounds long enough (``docs/methods.md#prelort``: about 50-100 steps on a toy regression).
"""

from __future__ import annotations



from ..training.truncation import AllTruncations, SampledTruncation, truncation_set
from .base import Method
from .options import PreLortOptions

__all__ = ["PreLort"]


class PreLort(Method):
    """PreLort: prefix-nested training (hooks on the live adapter); ``aggregate("segment", ..., previous=global)``."""

    name, title, rule = "prelort", "PreLort", "segment"
    Options = PreLortOptions

    def rule_options(self, server, module):
        return {"previous": server.pairs[module]} if self.rule == "segment" else {}

    def configure(self, server, client):
        message = super().configure(server, client)
        if self.options.nested != "off":
            message.config["ranks_ladder"] = sorted({int(r) for r in server.ranks.values()})
        return message

    def client_plan(self, message, state, context, generator):
        plan, state = super().client_plan(message, state, context, generator)
        mode = self.options.nested
        if mode == "off":
            return plan, state
        ladder = message.config.get("ranks_ladder")
        if not isinstance(ladder, list) or not ladder:
            raise ValueError(f"PreLort download config 'ranks_ladder' is {ladder!r}; expected the federation's "
                             f"distinct ranks (a non-empty list) for nested = {mode!r}.")
        truncations = truncation_set(ladder, int(message.config["rank"]))
        plan.info["truncations"] = truncations

        def make(ws):
            if mode == "sample":
                hook = SampledTruncation(ws, truncations, generator)
            else:
                hook = AllTruncations(ws, truncations)
            plan.info["hook"] = hook
            return hook

        plan.hooks.append(make)
        return plan, state

    def client_reply(self, plan, pairs, extras, state, message):
        reply, state = super().client_reply(plan, pairs, extras, state, message)
        hook = plan.info.get("hook")
        if hook is not None:
            truncations = list(plan.info["truncations"])
            if isinstance(hook, SampledTruncation):
                counts = [hook.taus.count(t) for t in truncations]
                reply.metrics["nested_taus"] = list(hook.taus)
            else:
                counts = [hook.steps] * len(truncations)
            reply.metrics.update(nested_truncations=truncations, nested_counts=counts)
        return reply, state
