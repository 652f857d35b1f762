r"""FedSA-LoRA: only ``A`` is shared; ``B`` and the classifier head stay on each client.

.. math:: a_i = \frac{\sum_{k: r_k > i} p_k a_{k,i}}{\sum_{k: r_k > i} p_k}

(``aggregate("segment", [FactorPair(0, A_k)], n_k, previous=global).A``): each row of ``A`` averaged
over the clients that hold it, which is FedAvg of ``A`` for equal ranks [ours for mixed ranks]. Each
client trains ``B_k`` and its head locally and is scored with its own model (personalised). The head a
client starts from is the shared initial head, sent once, in the client's first download. A run started
from an adapter (``init_adapter``) sends the adapter's ``B`` (its prefix at ``r_k``) once too, with the head, and
the server keeps that initial ``B`` in its state; otherwise every ``B_k`` starts at zero.

Source: Guo et al., "Selective aggregation for low-rank adaptation in federated learning", ICLR 2025 [paper].
"""

from __future__ import annotations

import torch

from lowrank_fed import FactorPair, aggregate

from ..protocol import Message, decode_extras, decode_factors, encode_extras, encode_pairs
from .base import ClientState, LocalPlan, Method, Model, weights_of

__all__ = ["FedSALoRA"]


class FedSALoRA(Method):
    """FedSA-LoRA: ``A`` segment-averaged, ``B`` and the head personal."""

    name, title, rule = "fedsa", "FedSA-LoRA", "segment"
    uploads = downloads = ("A",)
    head = "local"
    personalised = True
    scores_global = False

    def configure(self, server, client):
        message = super().configure(server, client)
        if not self.has_joined(server, client):
            message.arrays.update(encode_extras(server.extras))  # the initial head, once
            if server.info.get("init_adapter"):  # the adapter's B, once: the client's own B starts from it
                message.arrays.update(encode_pairs(self.client_pairs(server, client), factors=("B",)))
        return message

    def aggregate(self, server, replies):
        pairs = {}
        for m, previous in server.pairs.items():
            zero_B = torch.zeros_like(previous.B)
            clients = [FactorPair(zero_B[:, : r.arrays[f"lora/{m}/A"].shape[0]], r.arrays[f"lora/{m}/A"])
                       for r in replies.values()]
            new = aggregate(self.rule, clients, weights_of(replies), previous=FactorPair(zero_B, previous.A))
            B = previous.B if server.info.get("init_adapter") else torch.zeros_like(new.B)  # the initial B, kept
            pairs[m] = FactorPair(B, new.A)
        return self.next_state(server, replies, pairs=pairs, info={"joined": self.joined(server, replies)})

    @staticmethod
    def _own(message, state: ClientState, shapes) -> Model:
        As, sent = decode_factors(message.arrays, "lora", "A"), decode_factors(message.arrays, "lora", "B")
        pairs = {}
        for m, A in As.items():
            B = state.arrays.get(f"B/{m}", sent.get(m))
            pairs[m] = FactorPair(B if B is not None else A.new_zeros(shapes[m][0], A.shape[0]), A)
        extras = decode_extras(state.arrays) or decode_extras(message.arrays)
        return Model(pairs, extras, None)

    def client_plan(self, message, state, context, generator):
        own = self._own(message, state, context.workspace.shapes)
        missing = sorted(set(context.workspace.extras_template()) - set(own.extras))
        if missing:
            raise ValueError(f"FedSA-LoRA client {message.config['client']}: no head weights {missing[:2]} in its "
                             "state or its download (a client that lost its state); expected its own head.")
        lr = context.settings.lr
        return LocalPlan(own.pairs, own.extras, {"A": lr, "B": lr, "extras": lr}), state

    def client_reply(self, plan, pairs, extras, state, message):
        arrays = {f"B/{m}": p.B for m, p in pairs.items()}
        arrays.update(encode_extras(extras))
        return Message(encode_pairs(pairs, factors=("A",)), {"rank": int(message.config["rank"])}), ClientState(arrays, dict(state.info))

    def personal_model(self, message, state, shapes):
        return self._own(message, state, shapes)
