r"""HetLoRA: tail regulariser, self-pruning of the rank, and norm-weighted zero-padding.

Client ``k`` of rank ``r_k`` (``t = floor(gamma r_k)``, ``r' = max(r_min, t)``) trains with

.. math:: \mathcal L + \lambda \sum_m \lVert B_m[:, t:] \rVert_F \lVert A_m[t:, :] \rVert_F

on the live *folded* factors (``B_m = s B_peft``, so the penalty is on ``Delta W`` whatever the scale).
If the tail product is lower after training than at download, it prunes, ``r_k <- r'``, and uploads
its first ``r_k`` slots with its new rank in the reply. When ``r' >= r_k`` pruning cannot reduce the
rank, and neither the regulariser nor pruning applies (with ``r_k = 1``, ``t = 0`` would otherwise
penalise the whole adapter).

Server: zero-padding weighted by the norm of each update alone,

.. math:: q_k = \frac{\lVert B_k A_k \rVert_F}{\sum_j \lVert B_j A_j \rVert_F},\qquad B = \sum_k q_k \operatorname{pad}(B_k),\quad A = \sum_k q_k \operatorname{pad}(A_k)

(no data weights). A slot that every client holding it pruned becomes zero; a slot no participant held
keeps its value. The server sends each client the rank its last reply reported.

Source: Cho et al., "Heterogeneous LoRA for federated fine-tuning of on-device foundation models",
EMNLP 2024 [paper abstract + public implementations].
"""

from __future__ import annotations

import math

import torch

from lowrank_fed import truncate

from ..training.hooks import TailRegulariser, tail_norm_product
from .base import Method
from .options import HetLoRAOptions

__all__ = ["HetLoRA"]


class HetLoRA(Method):
    """HetLoRA: Frobenius-weighted ``zero_pad``; tail regulariser and self-pruning on the client."""

    name, title, rule = "hetlora", "HetLoRA", "zero_pad"
    Options = HetLoRAOptions

    def rule_options(self, server, module):
        return {"weighting": "frobenius"} if self.rule == "zero_pad" else {}

    def rule_weights(self, replies):
        return None if self.rule == "zero_pad" else super().rule_weights(replies)  # q_k from the norms alone

    def upload_ranks(self, rank):
        return tuple(sorted({min(self.pruned_rank(rank), rank), rank}))  # kept, or pruned once

    def pruned_rank(self, rank: int) -> int:
        """``max(r_min, floor(gamma r))``."""
        return max(self.options.r_min, int(math.floor(self.options.gamma * rank)))

    def client_plan(self, message, state, context, generator):
        plan, state = super().client_plan(message, state, context, generator)
        rank = int(message.config["rank"])
        if self.pruned_rank(rank) < rank:
            t = int(math.floor(self.options.gamma * rank))
            with torch.no_grad():
                plan.info["tail_start"] = float(tail_norm_product(plan.pairs, t))
            plan.info["t"] = t
            if self.options.lam > 0:
                lam = self.options.lam
                plan.hooks.append(lambda ws: TailRegulariser(ws, lam, t))
        return plan, state

    def client_reply(self, plan, pairs, extras, state, message):
        rank = int(message.config["rank"])
        if "t" in plan.info:
            with torch.no_grad():
                tail_end = float(tail_norm_product(pairs, plan.info["t"]))
            if tail_end < plan.info["tail_start"]:
                rank = self.pruned_rank(rank)
        reply, state = super().client_reply(plan, {m: truncate(p, rank) for m, p in pairs.items()}, extras, state,
                                            message)
        reply.config["rank"] = rank
        return reply, state
