r"""LoRA-A2: alternating freeze and model-wide adaptive rank selection; heterogeneity is the upload budget.

Round ``t`` (1-based) trains one factor, ``F = B`` when ``t`` is odd and ``F = A`` when ``t`` is even.
Server, for each adapted module:

.. math::

    t \text{ odd}:\ B \leftarrow B + \sum_k p_k\, \Delta B_k,\ A \text{ unchanged};\qquad
    t \text{ even}:\ A \leftarrow A + \sum_k p_k\, \Delta A_k,\ B \text{ unchanged}

which is exact for the product, ``(B + sum_k p_k dB_k) A = sum_k p_k (B + dB_k) A`` (the weighted mean
of the clients' local products), computed by the core's
:func:`~lowrank_fed.aggregation.alternating_update` with the uploads' ``slots``, where

- ``B`` shape ``(d_out, r_G)``, ``A`` shape ``(r_G, d_in)``: the global folded pair; every client holds
  the global rank ``r_G`` (``global_rank``);
- ``p_k = n_k / sum_j n_j`` over the round's participants (data weights; no per-slot renormalisation);
- ``dB_k`` (``dA_k``): client ``k``'s delta, zero outside the slots ``S_k`` it selected.

Client ``k``, with upload budget ``r_k`` (its rank in the federation), in a round that trains ``F``:

1. **probe**: from the global state, train ``F`` (and the head, unless ``freeze_head``) without a mask,
   on the round's first ``steps`` batches with the round's learning rates and dropout seed; its result
   gives ``dB_k`` (``dA_k``), then it is discarded;
2. **scores** on the folded factors of the download,

   .. math:: s_{m,i} = \lVert \Delta B_{k,m}[:, i] \rVert\, \lVert A_m[i, :] \rVert \ \text{(B-round)},\qquad
             s_{m,i} = \lVert B_m[:, i] \rVert\, \lVert \Delta A_{k,m}[i, :] \rVert \ \text{(A-round)};

3. **selection**: ``S_k = select_slots(s, r_k N)``, the top ``r_k N`` slots across the whole model
   (``N`` adapted modules), so a module gets anywhere from 0 to ``r_G`` slots;
4. **training** restarts from the global state and updates only ``S_k`` at every step
   (:class:`~lowrank_fed.llm.training.SlotMask` on ``F``; the other factor is not in the optimiser);
5. **upload** for each module with selected slots: ``"delta/<module>/B"`` (shape ``(d_out, |S_{k,m}|)``,
   the selected columns of ``dB_k``) or ``"delta/<module>/A"`` (shape ``(|S_{k,m}|, d_in)``, rows of
   ``dA_k``) and ``"slots/<module>"`` (int64 indices, in the same order). A module with no selected slot
   sends no key. The head (trained at ``eta_A``) travels and is data-weighted averaged unless frozen.

Learning rates: ``eta_A`` = the run's ``lr``, ``eta_B = lr_ratio * eta_A``.

Source: Koo et al., "Towards robust and efficient federated low-rank adaptation with heterogeneous
clients" (LoRA-A2), ACL 2025 [paper]; docs/methods.md#lora-a2. Our reconstruction where the paper
leaves a choice:

- the server's initial pair has rank ``r_G``: the shared initial adapter (rank ``r_max``) is truncated
  to its first ``r_G`` slots, or padded with zero columns of ``B`` and fresh rows of ``A`` drawn as PEFT
  draws them (``U(-1/sqrt(d_in), 1/sqrt(d_in))``) from ``(init_seed, r_G)``; a zero row of ``A`` would
  never learn in a B-round;
- "one probe epoch" (option ``probe``): ``"epoch"`` (default) is one pass over the client's data, the
  round's first ``min(steps, ceil(n_k / batch_size))`` batches (the paper's one probe epoch before five
  local epochs: then the probe adds a fifth of a round's compute); ``"round"`` is one pass over exactly
  the batches of the local round (the same number of steps, the same order), so a probe costs a second
  local round. With ``local_steps`` shorter than an epoch both give the same batches;
- the probe trains what the round trains (the active factor and, unless frozen, the head), so with a
  budget of every slot (``r_k = r_G``) the masked round reproduces the probe;
- a frozen head (``freeze_head``, the paper's setting) is the shared initial head: sent once, in a
  client's first download, and kept by the client; it neither trains nor travels afterwards.

Options
-------
global_rank : int
    ``r_G``, the rank every client holds (16 in the paper); every budget ``r_k`` must be at most ``r_G``.
lr_ratio : float
    ``eta_B / eta_A`` (5 in the paper).
freeze_head : bool
    Keep the classifier head at its initial value (the paper); False trains and averages it.
probe : {"round", "epoch"}
    The probe's batches (see above).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from lowrank_fed import FactorPair, alternating_update, select_slots, truncate
from lowrank_fed.linalg import slot_scores as core_slot_scores

from ..peft_bridge import init_pairs
from ..protocol import Message, decode_extras, decode_pairs, encode_extras
from ..streams import GLOBAL_RANK_PAD
from ..training import SlotMask
from .base import ClientState, LocalPlan, Method, weights_of
from .options import LoRAA2Options

__all__ = ["LoRAA2", "factor_of", "slot_scores"]


def factor_of(round_: int) -> str:
    """The factor round ``round_`` (1-based) trains: ``"B"`` in odd rounds, ``"A"`` in even rounds.

    Examples
    --------
    >>> [factor_of(t) for t in (1, 2, 3)]
    ['B', 'A', 'B']
    """
    return "B" if round_ % 2 == 1 else "A"


def slot_scores(start: Mapping[str, FactorPair], probe: Mapping[str, FactorPair],
                factor: str) -> dict[str, torch.Tensor]:
    r"""LoRA-A2's slot scores from a probe.

    .. math:: s_{m,i} = \lVert \Delta B_m[:, i] \rVert \lVert A_m[i, :] \rVert \ (\text{factor="B"}),\qquad
              s_{m,i} = \lVert B_m[:, i] \rVert \lVert \Delta A_m[i, :] \rVert \ (\text{factor="A"})

    where ``B_m, A_m`` are the folded factors of ``start[m]`` and ``Delta B_m = probe[m].B - B_m``
    (``Delta A_m = probe[m].A - A_m``): the core's :func:`lowrank_fed.linalg.slot_scores` of
    ``(Delta B_m, A_m)`` or ``(B_m, Delta A_m)``.

    Returns
    -------
    dict module -> tensor, shape ``(r,)``.

    Examples
    --------
    >>> start = {"q": FactorPair(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, 2.0]]))}
    >>> probe = {"q": FactorPair(torch.tensor([[3.0, 1.0], [4.0, 0.0]]), start["q"].A)}
    >>> slot_scores(start, probe, "B")["q"].tolist()  # [||(3, 4)|| * 1, ||(1, 0)|| * 2]
    [5.0, 2.0]
    """
    out = {}
    for m, p in start.items():
        if factor == "B":
            out[m] = core_slot_scores(probe[m].B - p.B, p.A)
        else:
            out[m] = core_slot_scores(p.B, probe[m].A - p.A)
    return out


def _to_global_rank(init: Mapping[str, FactorPair], rank: int, init_seed: int) -> dict[str, FactorPair]:
    """``truncate(init, rank)``, or pad: zero columns of ``B``, fresh PEFT rows of ``A`` from ``(init_seed, rank)``."""
    generator = torch.Generator().manual_seed(GLOBAL_RANK_PAD.seed(init_seed, rank))
    out = {}
    for m, pair in init.items():
        if pair.rank >= rank:
            out[m] = truncate(pair, rank)
            continue
        d_out, d_in = pair.shape
        extra = init_pairs({m: (d_out, d_in)}, rank - pair.rank, generator, dtype=pair.A.dtype, device=pair.A.device)[m]
        out[m] = FactorPair(torch.cat([pair.B, extra.B.to(pair.B.dtype)], dim=1), torch.cat([pair.A, extra.A], dim=0))
    return out


class LoRAA2(Method):
    """LoRA-A2: one factor per round (B odd, A even), model-wide top-``r_k N`` slots, ``alternating_update``."""

    name, title, rule = "lora_a2", "LoRA-A2", "alternating"  # the core's alternating_update (deltas, not pairs)
    uploads = ()
    Options = LoRAA2Options

    @property
    def head(self) -> str:  # type: ignore[override]
        return "local" if self.options.freeze_head else "average"

    # ------------------------------------------------------------------ server side
    def init_server(self, init, extras, ranks, *, init_seed):
        """Round-0 state: the shared init brought to rank ``r_G`` (module docstring); the ranks are the budgets.

        Raises
        ------
        ValueError
            A budget outside ``[1, global_rank]``.
        """
        r_G = self.options.global_rank
        self.check_ranks(list(ranks.values()))
        return super().init_server(_to_global_rank(init, r_G, init_seed), extras, ranks, init_seed=init_seed)

    def check_ranks(self, ranks):
        r_G = self.options.global_rank
        bad = sorted({int(r) for r in ranks if not 1 <= int(r) <= r_G})
        if bad:
            raise ValueError(f"LoRA-A2's upload budgets (the clients' ranks) must be in [1, global_rank = {r_G}]. "
                             f"Got ranks {bad}; raise [lora_a2] global_rank or lower the ranks.")

    def download_pairs(self, server, rank):
        """The global pair of rank ``r_G``, whatever the client's budget."""
        return dict(server.pairs)

    def download_is_global(self, server, rank):
        return True

    def configure(self, server, client):
        message = super().configure(server, client)
        if self.options.freeze_head and not self.has_joined(server, client):
            message.arrays.update(encode_extras(server.extras))  # the frozen initial head, once
        return message

    def check_reply(self, server, client, reply):
        r"""Reject a malformed reply: the base checks (config, rank, head), then the deltas and slots.

        A reply of a round training ``F`` holds, for each module with selected slots, ``"delta/<m>/F"``
        and ``"slots/<m>"`` (1-d int64, distinct, in ``[0, r_G)``, as many as the delta's columns of
        ``B`` or rows of ``A``), all finite; the slots count ``r_k N`` in all.
        """
        factor = factor_of(server.round + 1)
        arrays = reply.arrays
        head = {key: v for key, v in arrays.items() if key.startswith("extra/")}
        parts: dict[str, set] = {}
        unknown = []
        for key in arrays:
            kind, _, rest = key.partition("/")
            module, _, f = rest.rpartition("/")
            if kind == "slots" and rest in server.shapes:
                parts.setdefault(rest, set()).add("slots")
            elif kind == "delta" and module in server.shapes and f == factor:
                parts.setdefault(module, set()).add("delta")
            elif kind != "extra":
                unknown.append(key)
        if unknown:
            raise ValueError(f"Reply has unknown keys {sorted(unknown)[:3]}; a {factor}-round reply holds "
                             f"'delta/<module>/{factor}' and 'slots/<module>' for modules with selected slots.")
        unpaired = sorted(m for m, got in parts.items() if len(got) != 2)
        if unpaired:
            raise ValueError(f"Modules {unpaired[:3]}: a reply holds both 'delta/<module>/{factor}' and "
                             "'slots/<module>', or neither.")
        super().check_reply(server, client, Message(head, reply.config, reply.metrics))
        r_G, budget = self.options.global_rank, server.ranks[client] * len(server.shapes)
        total = 0
        for m, (d_out, d_in) in server.shapes.items():
            if m not in parts:
                continue
            idx, delta = arrays[f"slots/{m}"], arrays[f"delta/{m}/{factor}"]
            if idx.dtype != torch.int64 or idx.ndim != 1 or idx.numel() == 0:
                raise ValueError(f"slots/{m}: expected a non-empty 1-d int64 tensor. Got dtype {idx.dtype}, "
                                 f"shape {tuple(idx.shape)}.")
            values = idx.tolist()
            if len(set(values)) != len(values) or min(values) < 0 or max(values) >= r_G:
                raise ValueError(f"slots/{m}: indices must be distinct and in [0, {r_G - 1}]. Got {values[:8]}.")
            want = (d_out, len(values)) if factor == "B" else (len(values), d_in)
            if not delta.is_floating_point() or tuple(delta.shape) != want:
                raise ValueError(f"delta/{m}/{factor}: dtype {delta.dtype}, shape {tuple(delta.shape)}; expected "
                                 f"a floating-point tensor of shape {want}.")
            if not bool(torch.isfinite(delta).all()):
                n_bad = int((~torch.isfinite(delta)).sum())
                raise ValueError(f"delta/{m}/{factor}: {n_bad} non-finite entries (NaN or Inf); expected all finite.")
            total += len(values)
        if total != budget:
            raise ValueError(f"Reply selects {total} slots in all; expected r_k * N = {server.ranks[client]} * "
                             f"{len(server.shapes)} = {budget}.")

    def aggregate(self, server, replies):
        r"""``alternating_update(global, [dF_k], n_k, factor=F, slots=[S_k])`` per module.

        A client that selected no slot of a module contributes an empty delta there (its weight still
        counts in ``p_k``: no per-slot renormalisation).
        """
        factor = factor_of(server.round + 1)
        weights = weights_of(replies)
        pairs = {}
        for m, previous in server.pairs.items():
            deltas, slots = [], []
            for r in replies.values():
                delta = r.arrays.get(f"delta/{m}/{factor}")
                if delta is None:
                    (d_out, d_in), ref = previous.shape, previous.B
                    delta = ref.new_zeros((d_out, 0) if factor == "B" else (0, d_in))
                    deltas.append(delta)
                    slots.append(torch.zeros(0, dtype=torch.int64))
                else:
                    deltas.append(delta)
                    slots.append(r.arrays[f"slots/{m}"])
            pairs[m] = alternating_update(previous, deltas, weights, factor=factor, slots=slots)
        info = {}
        if self.options.freeze_head:
            info["joined"] = self.joined(server, replies)
        return self.next_state(server, replies, pairs=pairs, info=info)

    def aggregation_target(self, server, replies, new):
        """Client ``k`` trained the global pair with ``dB_k`` (``dA_k``) added on its slots ``S_k``."""
        factor, clients = factor_of(server.round + 1), []
        for r in replies.values():
            mine = {}
            for m, p in server.pairs.items():
                delta, idx = r.arrays.get(f"delta/{m}/{factor}"), r.arrays.get(f"slots/{m}")
                if delta is None:
                    mine[m] = p
                elif factor == "B":
                    mine[m] = FactorPair(p.B.index_add(1, idx.to(p.B.device), delta), p.A)
                else:
                    mine[m] = FactorPair(p.B, p.A.index_add(0, idx.to(p.A.device), delta))
            clients.append(mine)
        return clients, weights_of(replies)

    # ------------------------------------------------------------------ client side
    def client_plan(self, message, state, context, generator):
        """The global pair and head; only this round's factor (and the head, unless frozen) trains."""
        factor = factor_of(int(message.config["round"]))
        lr = context.settings.lr
        lrs = {factor: lr * self.options.lr_ratio if factor == "B" else lr}
        if self.options.freeze_head:
            extras = decode_extras(state.arrays) or decode_extras(message.arrays)
            missing = sorted(set(context.workspace.extras_template()) - set(extras))
            if missing:
                raise ValueError(f"LoRA-A2 client {message.config['client']}: no frozen head weights {missing[:2]} in "
                                 "its state or its download (a client that lost its state).")
        else:
            extras = decode_extras(message.arrays)
            lrs["extras"] = lr
        return LocalPlan(decode_pairs(message.arrays), extras, lrs, info={"factor": factor}), state

    def client_probe(self, plan, message, state, context):
        """The unmasked round from the same start: ``(plan without hooks, steps)`` (option ``probe``)."""
        n, settings = len(context.indices), context.settings
        steps = settings.steps(n)
        if self.options.probe == "epoch":
            steps = min(steps, math.ceil(n / settings.batch_size))
        return LocalPlan(plan.pairs, plan.extras, dict(plan.lrs), base=plan.base), steps

    def client_after_probe(self, plan, pairs, extras, state, message):
        """Select ``S_k = select_slots(slot_scores(global, probe), r_k N)``; mask the round to ``S_k``."""
        factor = plan.info["factor"]
        budget = int(message.config["rank"]) * len(plan.pairs)
        selected = select_slots(slot_scores(plan.pairs, pairs, factor), budget)
        hooks = [*plan.hooks, lambda ws: SlotMask(ws, selected, factors=(factor,))]
        return dataclasses.replace(plan, hooks=hooks, info={**plan.info, "slots": selected}), state

    def client_reply(self, plan, pairs, extras, state, message):
        """The selected columns of ``dB`` (rows of ``dA``) and their indices; the head unless frozen."""
        factor, arrays = plan.info["factor"], {}
        for m, chosen in plan.info["slots"].items():
            if not len(chosen):
                continue
            start = plan.pairs[m]
            idx = torch.as_tensor(chosen, dtype=torch.int64, device=start.B.device)
            if factor == "B":
                delta = pairs[m].B.index_select(1, idx) - start.B.index_select(1, idx)
            else:
                delta = pairs[m].A.index_select(0, idx) - start.A.index_select(0, idx)
            arrays[f"delta/{m}/{factor}"], arrays[f"slots/{m}"] = delta, idx
        if self.options.freeze_head:
            state = ClientState({**state.arrays, **encode_extras(plan.extras)}, dict(state.info))
        else:
            arrays.update(encode_extras(extras))
        return Message(arrays, {"rank": int(message.config["rank"])}), state
