r"""FFA-LoRA: ``A`` frozen at the shared random initialisation; only ``B`` is trained and sent.

.. math:: \sum_k p_k B_k A_{:r_k} = \Big(\sum_k p_k \operatorname{pad}(B_k, R)\Big) A

where ``A`` (rank ``R = r_max``) is drawn once from a seed every party knows, so the rule is exact
and ``A`` never travels: each download carries ``B``'s prefix ``B[:, :r_k]``, the head and the seed;
the client regenerates ``A[:r_k]`` from the seed. Server: ``B`` from ``aggregate("zero_pad", ...)``
on ``(B_k, A[:r_k])``, ``A`` unchanged. A run started from an adapter (``init_adapter``) freezes the
adapter's ``A`` (:meth:`~.base.Method.start_from`), which no seed regenerates: then ``A[:r_k]`` travels
in each download too.

Source: Sun et al., "Improving LoRA in privacy-preserving federated learning", ICLR 2024 [paper].
"""

from __future__ import annotations

import torch

from lowrank_fed import FactorPair, aggregate, truncate
from lowrank_fed.aggregation import keep_slots

from ..peft_bridge import init_pairs
from ..protocol import decode_extras, decode_factors, encode_pairs
from .base import LocalPlan, Method, weights_of

__all__ = ["FFALoRA"]


class FFALoRA(Method):
    """FFA-LoRA: ``A`` from the shared seed, frozen; ``B`` trained, sent and zero-pad averaged."""

    name, title, rule = "ffa", "FFA-LoRA", "zero_pad"
    uploads = downloads = ("B",)

    def configure(self, server, client):
        message = super().configure(server, client)
        message.config["init_seed"] = server.info["init_seed"]
        message.config["init_rank"] = next(iter(server.pairs.values())).rank
        if server.info.get("init_adapter"):  # A is the adapter's, not the seed's: it travels
            message.arrays.update(encode_pairs(self.client_pairs(server, client), factors=("A",)))
        return message

    def client_plan(self, message, state, context, generator):
        rank, cfg = int(message.config["rank"]), message.config
        Bs = decode_factors(message.arrays, "lora", "B")
        init = init_pairs(context.workspace.shapes, cfg["init_rank"], torch.Generator().manual_seed(cfg["init_seed"]),
                          device=context.device)
        As = decode_factors(message.arrays, "lora", "A")  # sent when the run starts from an adapter
        pairs = {m: FactorPair(Bs[m], As[m] if m in As else truncate(init[m], rank).A) for m in init}
        lr = context.settings.lr
        return LocalPlan(pairs, decode_extras(message.arrays), {"B": lr, "extras": lr}), state

    def aggregate(self, server, replies):
        held = max(server.ranks[k] for k in replies)
        pairs = {}
        for m, previous in server.pairs.items():
            clients = []
            for r in replies.values():
                B = r.arrays[f"lora/{m}/B"]
                clients.append(FactorPair(B, previous.A[: B.shape[1], :]))
            new = keep_slots(aggregate(self.rule, clients, weights_of(replies)), previous, held)
            pairs[m] = FactorPair(new.B, previous.A)
        return self.next_state(server, replies, pairs=pairs)

    def aggregation_target(self, server, replies, new):
        """Client ``k`` trained ``(B_k, A[:r_k])``: its ``B`` on the shared frozen ``A``."""
        clients = [{m: FactorPair(r.arrays[f"lora/{m}/B"], p.A[: r.arrays[f"lora/{m}/B"].shape[1], :])
                    for m, p in server.pairs.items()} for r in replies.values()]
        return clients, weights_of(replies)
