r"""Local fine-tuning alone: the reference every federated method must beat for its clients.

Each client starts from the shared initial adapter and head (sent once, in its first download) and
keeps training its own adapter ``(B_k, A_k)`` and head, round after round, on its own data; nothing is
uploaded and the server never aggregates. It is scored with its own model on its own held-out set
(personalised); its "global" model is the untrained initial one.
"""

from __future__ import annotations

from ..protocol import Message, decode_extras, decode_pairs, encode_extras, encode_pairs
from .base import ClientState, LocalPlan, Method, Model

__all__ = ["Local"]


class Local(Method):
    """Local only: no upload, no aggregation; each client's own adapter and head."""

    name, title, rule = "local", "Local only", "none"
    uploads = ()
    head = "local"
    personalised = True
    scores_global = False

    def configure(self, server, client):
        message = super().configure(server, client)
        if self.has_joined(server, client):
            message.arrays.clear()  # the client trains its own adapter from now on
        else:
            message.arrays.update(encode_extras(server.extras))  # the initial head, once
        return message

    def aggregate(self, server, replies):
        return self.next_state(server, replies, info={"joined": self.joined(server, replies)})

    @staticmethod
    def _own(message, state: ClientState | None) -> Model:
        source = state.arrays if state is not None and state.arrays else message.arrays
        return Model(decode_pairs(source), decode_extras(source), None)

    def client_plan(self, message, state, context, generator):
        own = self._own(message, state)
        if not own.pairs:
            raise ValueError(f"Local client {message.config['client']}: no adapter in its state or its download "
                             "(a client that lost its state); expected its own adapter.")
        lr = context.settings.lr
        return LocalPlan(own.pairs, own.extras, {"A": lr, "B": lr, "extras": lr}), state

    def client_reply(self, plan, pairs, extras, state, message):
        kept = ClientState({**encode_pairs(pairs), **encode_extras(extras)}, dict(state.info))
        return Message({}, {"rank": int(message.config["rank"])}), kept

    def personal_model(self, message, state, shapes):
        return self._own(message, state)
