r"""FLoRA: stack the clients' factors, merge the product into the base, restart from fresh adapters.

.. math:: S = \operatorname{stack}(\{B_k, A_k\}),\quad S_B S_A = \sum_k p_k B_k A_k\ \text{(exact, rank } \textstyle\sum_k r_k),
          \qquad W_0^{(t)} = W_0^{(t-1)} + S_B^{(t)} S_A^{(t)}

The server keeps each round's stacked pair ``S^{(t)}`` until every client has confirmed it. The merged
base lives on each client: a client
records the last merge it applied, and its download carries every merge since the one its last reply
confirmed (a client that skipped rounds catches up; those bytes are counted). Each round a client trains
a fresh adapter (``B = 0``, ``A`` random from its round seed) of its own rank on top of its base.
The server also holds the global base ``sum_t S^{(t)}_B S^{(t)}_A`` (dense) to score the global model,
and the same sum as a factor pair ``T^{(t)} = T^{(t-1)} + S^{(t)}``, compressed each round to its
numerical rank by the factored SVD (singular values above ``s_1 max(d_out, d_in) eps``): the global
adapter written in PEFT format. A run started from an adapter (``init_adapter``) has it as merge 0
(:meth:`FLoRA.start_from`): every client merges ``Delta W_0`` into its base before its first round, exactly.

Source: Wang et al., "FLoRA: federated fine-tuning large language models with heterogeneous low-rank
adaptations", NeurIPS 2024 [paper].
"""

from __future__ import annotations

import torch

from lowrank_fed import FactorPair, aggregate, factored_svd

from ..peft_bridge import init_pairs
from ..protocol import Message, decode_extras, decode_pairs, encode_extras, encode_pairs
from .base import ClientState, LocalPlan, Method, Model, weights_of

__all__ = ["FLoRA"]


def _base(arrays) -> dict:
    return {k[len("base/") :]: v for k, v in arrays.items() if k.startswith("base/")}


def numerical_rank_pair(pairs: list[FactorPair]) -> FactorPair:
    r"""``sum_i B_i A_i`` as ``(U_t diag(S_t), Vh_t)`` with ``t`` its numerical rank (factored SVD, never dense).

    ``t = #{S_j > S_1 max(d_out, d_in) eps}`` (NumPy's ``matrix_rank`` tolerance, ``eps`` of the dtype);
    at least 1.
    """
    U, S, Vh = factored_svd(pairs, [1.0] * len(pairs))
    S = S * len(pairs)  # factored_svd averages (weights normalised): undo it for the sum
    d_out, d_in = U.shape[0], Vh.shape[1]
    tol = float(S[0]) * max(d_out, d_in) * torch.finfo(S.dtype).eps if S.numel() else 0.0
    t = max(int((S > tol).sum()), 1)
    return FactorPair(U[:, :t] * S[:t], Vh[:t])


class FLoRA(Method):
    """FLoRA: ``aggregate("stack", ...)`` merged into the base on every client; fresh adapters each round."""

    name, title, rule = "flora", "FLoRA", "stack"
    upload_is_model = False  # the client's model is its merged base plus the fresh pair it uploads

    def init_server(self, init, extras, ranks, *, init_seed):
        server = super().init_server(init, extras, ranks, init_seed=init_seed)
        server.pairs = {}
        return server

    def start_from(self, server, start):
        r"""Round 0 from an adapter: its ``Delta W_0`` is merge 0, the first merge every client applies to its base.

        ``arrays``: ``merge/0/<m>/B|A`` and ``total/<m>/B|A`` the adapter's folded pair, ``base/<m> = B A``
        (dense), for each module the adapter has; exact at any rank (a merge has no rank limit). The adapter's head
        replaces the fresh head. A client that has confirmed no merge yet is sent merges from 0 on.
        """
        arrays = dict(server.arrays)
        for m, pair in start.pairs.items():
            B, A = pair.B, pair.A
            arrays[f"merge/0/{m}/B"], arrays[f"merge/0/{m}/A"] = B, A
            arrays[f"total/{m}/B"], arrays[f"total/{m}/A"] = B, A
            arrays[f"base/{m}"] = B @ A  # the merge into the frozen weights (FLoRA), not a rule
        server.arrays = arrays
        server.extras = {**server.extras, **start.extras}
        server.info = {**server.info, "init_adapter": True}
        server.cache["start_errors"] = {m: 0.0 for m in start.pairs}
        return server

    @staticmethod
    def _unsynced(server) -> int:
        """The merge a client that has confirmed none is at: -1 when merge 0 (the adapter) exists, else 0."""
        return -1 if server.info.get("init_adapter") else 0

    def configure(self, server, client):
        since = int(server.info.get("synced", {}).get(str(client), self._unsynced(server)))
        rounds = list(range(since + 1, server.round + 1))
        arrays = {}
        for t in rounds:
            arrays.update(encode_pairs(self._merge(server, t), prefix=f"merge/{t}"))
        arrays.update(encode_extras(server.extras))
        return Message(arrays, {"round": server.round + 1, "rank": server.ranks[client], "client": int(client),
                                "merges": rounds})

    @staticmethod
    def _merge(server, t: int) -> dict[str, FactorPair]:
        return decode_pairs(server.arrays, prefix=f"merge/{t}")

    def downloaded_model(self, server, rank):
        return self.global_model(server)  # a fresh adapter has B = 0: the model is the merged base

    def download_is_global(self, server, rank):
        return True

    def global_model(self, server):
        return Model(None, server.extras, _base(server.arrays) or None)

    def aggregation_result(self, new):
        """The round's merge (the stacked pairs of its fresh adapters), not the whole merged base."""
        return self._merge(new, new.round)

    def export_pairs(self, server):
        return decode_pairs(server.arrays, prefix="total") or None

    def aggregate(self, server, replies):
        decoded = [decode_pairs(r.arrays) for r in replies.values()]
        t = server.round + 1
        arrays = dict(server.arrays)
        for m in server.shapes:
            stacked = aggregate(self.rule, [d[m] for d in decoded], weights_of(replies))
            arrays[f"merge/{t}/{m}/B"], arrays[f"merge/{t}/{m}/A"] = stacked.B, stacked.A
            delta = stacked.B @ stacked.A  # the merge into the frozen weights (FLoRA), not a rule
            arrays[f"base/{m}"] = arrays[f"base/{m}"] + delta if f"base/{m}" in arrays else delta
            total = [FactorPair(arrays[f"total/{m}/B"], arrays[f"total/{m}/A"])] if f"total/{m}/B" in arrays else []
            total = numerical_rank_pair([*total, stacked])
            arrays[f"total/{m}/B"], arrays[f"total/{m}/A"] = total.B, total.A
        synced = {**server.info.get("synced", {}), **{str(k): int(r.config["base_round"]) for k, r in replies.items()}}
        # A merge every client of the federation has confirmed is never sent again: drop it.
        done = min(int(synced.get(str(k), self._unsynced(server))) for k in server.ranks)
        arrays = {key: v for key, v in arrays.items() if not (key.startswith("merge/") and int(key.split("/")[1]) <= done)}
        return self.next_state(server, replies, arrays=arrays, info={"synced": synced})

    def check_reply(self, server, client, reply):
        super().check_reply(server, client, reply)
        base_round = reply.config.get("base_round")
        if not isinstance(base_round, int) or base_round != server.round:
            raise ValueError(f"Reply config 'base_round' is {base_round!r}; expected {server.round} (every merge applied).")

    def client_plan(self, message, state, context, generator):
        merges = message.config["merges"]
        base = _base(state.arrays)
        done = int(state.info.get("base_round", -1 if merges and merges[0] == 0 else 0))  # merge 0: the adapter
        for t in merges:
            if t <= done:
                continue
            if t != done + 1:
                raise ValueError(f"FLoRA client {message.config['client']}: merge {t} arrived but merge {done + 1} "
                                 "is missing; expected consecutive merges.")
            for m, pair in decode_pairs(message.arrays, prefix=f"merge/{t}").items():
                delta = pair.B @ pair.A
                base[m] = base[m] + delta if m in base else delta
            done = t
        state = ClientState({f"base/{m}": v for m, v in base.items()}, {**state.info, "base_round": done})
        lr = context.settings.lr
        fresh = init_pairs(context.workspace.shapes, int(message.config["rank"]), generator, device=context.device)
        return LocalPlan(fresh, decode_extras(message.arrays), {"A": lr, "B": lr, "extras": lr}, base=base or None), state

    def client_reply(self, plan, pairs, extras, state, message):
        reply, state = super().client_reply(plan, pairs, extras, state, message)
        reply.config["base_round"] = int(state.info.get("base_round", 0))
        return reply, state
