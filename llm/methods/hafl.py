r"""HAFL: importance-ranked slots, truncation or freezing on the client, slot-wise aggregation on the server.

The server holds the global adapter at rank ``R`` (the largest client rank, the initial adapter's).
Each slot ``i`` of module ``m`` has an importance ``S_{m,i}``; client ``k`` of rank ``r_k`` is given,
per module, the ``r_k`` slots of highest importance (an index set, sorted, not necessarily a prefix;
ties to the lower index):

.. math:: \mathcal S_{k,m} = \operatorname{top}_{r_k} \{ S_{m,i} : 0 \le i < R \}

- ``variant="truncation"``: the client receives only those slots, ``B[:, S_k]`` and ``A[S_k, :]``
  (a rank-``r_k`` adapter), trains them and uploads them;
- ``variant="freezing"`` (default): the client receives all ``R`` slots, trains only ``S_k`` (the
  others stay in the forward pass, their gradients zeroed and their values restored after every
  optimiser step: :class:`~lowrank_fed.llm.training.SlotMask`) and uploads only ``S_k``.

Either way the upload is compact, ``B_k`` shape ``(d_out, r_k)`` and ``A_k`` shape ``(r_k, d_in)`` with
column ``j`` being global slot ``S_k[j]``, and the server applies the adaptive rank-1 rule
(``aggregate("slotwise", pairs, n_k, slots=S, previous=global)``):

.. math:: b_i = \frac{\sum_{k \in U_i} p_k b_{k,i}}{\sum_{k \in U_i} p_k},\quad a_i \text{ likewise},
          \qquad U_i = \{k : i \in \mathcal S_k\},

a slot nobody updated keeping its value. The head is averaged with data weights. Two other server rules keep
everything on the clients unchanged (``aggregate_slotwise``'s ``absent``): ``aggregation = "zero_pad"`` counts a
client that did not update slot ``i`` as a zero there (zero-padding at the same slots: the rule HAFL's speed claim
compares the adaptive one with), ``"held_mean"`` as the previous global value, which under freezing is the value it
holds (the factor-wise FedAvg of every client's whole held adapter: ``b_i = b_i^{prev} + sum_{k in U_i} p_k (b_{k,i}
- b_i^{prev})``).

**Who scores** (``scorer``; our reconstruction, the abstract does not say):

- ``"client"`` (default): each client runs :class:`~lowrank_fed.llm.training.SlotImportance` during its
  local round (AdaLoRA's smoothed sensitivity ``Ibar * Ubar`` per element, reduced to
  ``S_i = mean_j score(B[j, i]) + mean_j score(A[i, j])``) and uploads the scores of the slots it held
  (``S_k`` under truncation; all ``R`` under freezing, where frozen slots still have a gradient). The
  server keeps, per slot, the data-weighted mean of the scores reported in the latest round that
  reported that slot,

  .. math:: S_i \leftarrow \frac{\sum_{k \in H_i} n_k S_{k,i}}{\sum_{k \in H_i} n_k}\ \ (H_i \ne \emptyset),
            \qquad H_i = \{k \text{ this round} : k \text{ held } i\},

  otherwise unchanged (the ``slotwise`` rule applied to the ``1 x R`` score row; a slot never reported
  scores 0). Round 1 (no scores yet): the prefix ``0..r_k-1``.
- ``"server"``: the server scores the global adapter itself, without client data, by the magnitude of
  each rank-1 term, ``S_i = ||b_i|| ||a_i||`` (a reconstruction: the norm of ``b_i a_i^T``). In round 1
  ``B = 0``, every score is 0, and the ties give the prefix ``0..r_k-1``.

**Messages.** Download: ``lora/<m>/B|A`` (the ``r_k`` selected slots under truncation, all ``R`` under
freezing), ``slots/<m>`` (int64 ``S_k``, shape ``(r_k,)``), the head; config ``round``, ``rank``,
``client``. Upload: ``lora/<m>/B|A`` (compact, ``r_k`` slots), ``slots/<m>`` (the same indices), the head,
and with ``scorer="client"`` ``scores/<m>`` (float32, shape ``(r_k,)`` aligned with ``slots/<m>`` under
truncation, ``(R,)`` indexed by slot under freezing). Indices and scores count in the bytes.

Options
-------
variant : "truncation" | "freezing"
    What a client holds: only its slots, or all ``R`` with the others frozen.
scorer : "client" | "server"
    Who computes the slot importance (see above).
beta1, beta2 : float in [0, 1)
    AdaLoRA's smoothing of the sensitivity and of its uncertainty (0.85 each).

Source: HAFL [abstract; details ours] (docs/methods.md#hafl);
importance from AdaLoRA [paper]. Who scores, the score bookkeeping on the server and the server-side
magnitude score are our reconstruction.
"""

from __future__ import annotations


import numpy as np
import torch

from lowrank_fed import FactorPair, aggregate
from lowrank_fed.aggregation import select_slots
from lowrank_fed.linalg import slot_scores

from ..protocol import Message, decode_extras, decode_pairs, encode_extras, encode_pairs
from ..training import SlotImportance, SlotMask
from .base import LocalPlan, Method, Model, weights_of
from .options import HAFLOptions

__all__ = ["HAFL"]

# what a client that did not update a slot counts as there, per server rule (aggregate_slotwise's ``absent``)
_ABSENT = {"slotwise": "skip", "zero_pad": "zero", "held_mean": "previous"}


def _slots_of(arrays) -> dict[str, torch.Tensor]:
    return {k[len("slots/"):]: v for k, v in arrays.items() if k.startswith("slots/")}


def _take(pair: FactorPair, idx: torch.Tensor) -> FactorPair:
    """Slots ``idx`` of ``pair``, in that order: ``B[:, idx]``, ``A[idx, :]``."""
    idx = idx.to(pair.B.device)
    return FactorPair(pair.B.index_select(1, idx), pair.A.index_select(0, idx))


def _put(pair: FactorPair, idx: torch.Tensor, part: FactorPair) -> FactorPair:
    """``pair`` with slots ``idx`` replaced by ``part``'s (in that order): the inverse of :func:`_take`."""
    idx = idx.to(pair.B.device)
    return FactorPair(pair.B.index_copy(1, idx, part.B), pair.A.index_copy(0, idx, part.A))


class HAFL(Method):
    """HAFL: top-``r_k`` slots by importance (truncated or frozen), ``aggregate("slotwise", ...)`` with ``previous``."""

    name, title, rule = "hafl", "HAFL", "slotwise"
    Options = HAFLOptions

    @property
    def upload_is_model(self) -> bool:  # type: ignore[override]
        """Truncation uploads the client's whole (top-r_k) adapter; freezing only its trained slots."""
        return self.options.variant == "truncation"

    # ------------------------------------------------------------------ server side
    def slot_scores(self, server) -> dict[str, torch.Tensor] | None:
        """The importance of every global slot per module, shape ``(R,)``; None before any score (client scorer)."""
        if self.options.scorer == "server":
            return {m: slot_scores(p.B, p.A) for m, p in server.pairs.items()}
        scores = {m: server.arrays.get(f"scores/{m}") for m in server.pairs}
        return None if any(s is None for s in scores.values()) else scores

    def selection(self, server, rank: int) -> dict[str, torch.Tensor]:
        """Each module's top-``rank`` slots (sorted int64 indices; the prefix before any score)."""
        key = ("hafl-selection", int(rank))
        if key not in server.cache:
            scores = self.slot_scores(server)
            device = next(iter(server.pairs.values())).B.device
            if scores is None:
                chosen = {m: np.arange(rank) for m in server.pairs}
            else:  # per module, ties to the lower slot index (the core's select_slots on one module)
                chosen = {m: select_slots({m: s.float()}, rank)[m] for m, s in scores.items()}
            server.cache[key] = {m: torch.as_tensor(idx, dtype=torch.int64, device=device) for m, idx in chosen.items()}
        return server.cache[key]

    def _download(self, server, rank: int) -> dict[str, FactorPair]:
        if self.options.variant == "freezing":
            return dict(server.pairs)
        return {m: _take(p, self.selection(server, rank)[m]) for m, p in server.pairs.items()}

    def configure(self, server, client):
        rank = server.ranks[client]
        arrays = encode_pairs(self._download(server, rank))
        arrays.update({f"slots/{m}": idx for m, idx in self.selection(server, rank).items()})
        arrays.update(encode_extras(server.extras))
        return Message(arrays, {"round": server.round + 1, "rank": rank, "client": int(client)})

    def downloaded_model(self, server, rank):
        return Model(self._download(server, rank), dict(server.extras), None)

    def download_is_global(self, server, rank):
        R = next(iter(server.pairs.values())).rank
        return self.options.variant == "freezing" or rank >= R  # R sorted slots of R: the global itself

    def _held(self, server, client) -> int:
        """How many slots' scores a client reports: its ``r_k`` (truncation) or all ``R`` (freezing)."""
        return next(iter(server.pairs.values())).rank if self.options.variant == "freezing" else server.ranks[client]

    def check_reply(self, server, client, reply):
        r"""The base checks on the factors and head, then the slot indices and scores.

        ``slots/<m>``: int64, shape ``(r_k,)``, distinct, in ``[0, R)``, and the slots this client was
        given; ``scores/<m>`` (client scorer): floating, shape ``(r_k,)`` (truncation) or ``(R,)``
        (freezing), finite and non-negative.
        """
        base = {k: v for k, v in reply.arrays.items() if k.startswith(("lora/", "extra/"))}
        super().check_reply(server, client, Message(base, reply.config, reply.metrics))
        expected = {f"slots/{m}" for m in server.shapes}
        if self.options.scorer == "client":
            expected |= {f"scores/{m}" for m in server.shapes}
        other = set(reply.arrays) - set(base)
        missing, unknown = sorted(expected - other), sorted(other - expected)
        if missing or unknown:
            raise ValueError(f"Reply has missing keys {missing[:3]} and unknown keys {unknown[:3]}; expected "
                             f"{len(expected)} slot and score keys.")
        rank, R = server.ranks[client], next(iter(server.pairs.values())).rank
        given = self.selection(server, rank)
        for m in server.shapes:
            idx = reply.arrays[f"slots/{m}"]
            if idx.dtype != torch.int64 or tuple(idx.shape) != (rank,):
                raise ValueError(f"slots/{m}: dtype {idx.dtype}, shape {tuple(idx.shape)}; expected torch.int64, "
                                 f"shape {(rank,)}.")
            values = idx.detach().cpu().tolist()
            if len(set(values)) != len(values) or any(not 0 <= i < R for i in values):
                raise ValueError(f"slots/{m}: indices {values} must be distinct and in [0, {R - 1}].")
            if values != given[m].cpu().tolist():
                raise ValueError(f"slots/{m}: indices {values}; expected the slots this client was given, "
                                 f"{given[m].cpu().tolist()}.")
            if self.options.scorer == "client":
                s, held = reply.arrays[f"scores/{m}"], self._held(server, client)
                if not s.is_floating_point() or tuple(s.shape) != (held,):
                    raise ValueError(f"scores/{m}: dtype {s.dtype}, shape {tuple(s.shape)}; expected floating, "
                                     f"shape {(held,)}.")
                if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
                    raise ValueError(f"scores/{m}: entries must be finite and >= 0. Got {s.detach().cpu().tolist()}.")

    def aggregate(self, server, replies):
        r"""``aggregate("slotwise", pairs, n_k, slots=S, previous=global, absent=...)`` per module (``absent`` from
        ``aggregation``); scores and head updated."""
        decoded = [decode_pairs(r.arrays) for r in replies.values()]
        slots = [_slots_of(r.arrays) for r in replies.values()]
        weights = weights_of(replies)
        absent = _ABSENT[self.options.aggregation]
        pairs = {m: aggregate(self.rule, [d[m] for d in decoded], weights, slots=[s[m] for s in slots], previous=prev,
                              absent=absent)
                 for m, prev in server.pairs.items()}
        arrays = dict(server.arrays)
        if self.options.scorer == "client":
            arrays.update(self._mean_scores(server, replies, slots, weights))
        return self.next_state(server, replies, pairs=pairs, arrays=arrays)

    def aggregation_target(self, server, replies, new):
        """Truncation: the uploaded top-``r_k`` pairs; freezing: the global with the client's slots replaced."""
        if self.options.variant == "truncation":
            return super().aggregation_target(server, replies, new)
        clients = []
        for r in replies.values():
            mine, slots = decode_pairs(r.arrays), _slots_of(r.arrays)
            clients.append({m: _put(p, slots[m], mine[m]) for m, p in server.pairs.items()})
        return clients, weights_of(replies)

    def _mean_scores(self, server, replies, slots, weights) -> dict[str, torch.Tensor]:
        r"""Per slot, the data-weighted mean of this round's reports; unreported slots keep their score.

        That is the ``slotwise`` rule on the ``1 x R`` score row (a zero ``A`` column rides along).
        """
        out = {}
        for m, prev in server.pairs.items():
            R, dev = prev.rank, prev.B.device
            last = server.arrays.get(f"scores/{m}")
            last = torch.zeros(R, device=dev) if last is None else last.to(dev, torch.float32)
            rows, held = [], []
            for r, s in zip(replies.values(), slots, strict=True):
                score = r.arrays[f"scores/{m}"].to(dev, torch.float32)
                rows.append(FactorPair(score[None, :], torch.zeros(score.shape[0], 1, device=dev)))
                held.append(s[m] if self.options.variant == "truncation" else torch.arange(R))
            mean = aggregate("slotwise", rows, weights, slots=held,
                             previous=FactorPair(last[None, :], torch.zeros(R, 1, device=dev)))
            out[f"scores/{m}"] = mean.B[0].clone()
        return out

    # ------------------------------------------------------------------ client side
    def client_plan(self, message, state, context, generator):
        r"""Train A, B and the head from the download; hooks: importance (client scorer), then the slot mask (freezing).

        The importance hook comes first, so frozen slots are scored on their gradient before the mask zeroes it.
        """
        slots = _slots_of(message.arrays)
        lr = context.settings.lr
        plan = LocalPlan(decode_pairs(message.arrays), decode_extras(message.arrays), {"A": lr, "B": lr, "extras": lr},
                         info={"slots": slots})
        if self.options.scorer == "client":
            built: list[SlotImportance] = []
            beta1, beta2 = self.options.beta1, self.options.beta2

            def importance(ws):
                built.append(SlotImportance(ws, beta1=beta1, beta2=beta2))
                return built[-1]

            plan.hooks.append(importance)
            plan.info["importance"] = built
        if self.options.variant == "freezing":
            trainable = {m: idx.cpu().tolist() for m, idx in slots.items()}
            plan.hooks.append(lambda ws: SlotMask(ws, trainable))
        return plan, state

    def client_reply(self, plan, pairs, extras, state, message):
        slots = plan.info["slots"]
        if self.options.variant == "freezing":
            pairs = {m: _take(p, slots[m]) for m, p in pairs.items()}
        arrays = encode_pairs(pairs)
        arrays.update({f"slots/{m}": idx.clone() for m, idx in slots.items()})
        if self.head_shared:
            arrays.update(encode_extras(extras))
        if self.options.scorer == "client":
            scores = plan.info["importance"][-1].slot_scores()
            arrays.update({f"scores/{m}": s.detach().float() for m, s in scores.items()})
        return Message(arrays, {"rank": int(message.config["rank"])}), state
