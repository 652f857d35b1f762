r"""The client step: ``run_client(method, message, client_state, context) -> (reply, client_state, stats)``.

One function does everything a client does in a round, so the in-process runner and a Flower
``ClientApp`` (a function of ``(Message, Context)``) run the same code:

1. seeds from ``(seed, round, client id)``: the batch order, the fresh factors a method draws, dropout
   (the streams ``BATCHES``, ``CLIENT_FACTORS``, ``DROPOUT`` of :mod:`.streams`);
2. the method's local plan from the download and the client's own state (:meth:`Method.client_plan`);
3. an optional probe (:meth:`Method.client_probe`; LoRA-A2): a first training pass on the round's
   batches, from the same start, whose result the method reads (:meth:`Method.client_after_probe`)
   to finish the plan (LoRA-A2 chooses the slots to train); the probe's adapter is then discarded;
4. the plan loaded into the live PEFT adapter (frozen base ``W0 + base`` for FLoRA), the parameter
   groups with their learning rates, the hooks built on the live adapter;
5. training (:func:`~lowrank_fed.llm.training.train_local`);
6. the upload extracted from the adapter (:meth:`Method.client_reply`); the reply's config carries
   ``num_examples``, ``rank`` and ``client``, its metrics the training loss, accuracy and time
   (probe included), the probe's time, the number of parameters uploaded and the update's energy per
   prefix of slots (``prefix_energy``, :func:`update_prefix_energy`).

Nothing here reads or writes server state.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from lowrank_fed.linalg import prefix_update_energy

from .data import make_batch
from .methods.base import ClientState, Method
from .protocol import Message
from .streams import BATCHES, CLIENT_FACTORS, DROPOUT, derive_seed
from .training import TrainStats, client_batches, train_local

__all__ = ["TrainSettings", "ClientContext", "run_client", "derive_seed", "update_prefix_energy"]


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings of every client (from the run config)."""

    lr: float
    batch_size: int
    local_steps: int = 5
    local_epochs: int = 0  # > 0: that many passes over the client's data instead of local_steps
    optimizer: str = "adamw"
    weight_decay: float = 0.0

    def steps(self, n_examples: int) -> int:
        """Optimiser steps of one local round for a client with ``n_examples`` examples."""
        return self.local_epochs * math.ceil(n_examples / self.batch_size) if self.local_epochs else self.local_steps


@dataclass
class ClientContext:
    r"""What a client has that no message carries: its id, data, model and settings.

    Built by :func:`~lowrank_fed.llm.federation.build_client` from the client's own examples only (``data`` holds
    exactly the client's rows, ``indices`` is ``0 .. n_k - 1``).

    Attributes
    ----------
    client_id : int
    seed : int
        The run's seed (client randomness is derived from ``(seed, round, client_id)``).
    workspace : AdapterWorkspace
        The model with its PEFT adapters (shared by in-process clients, who train one at a time).
    data : dict of tensors
        Encoded training examples (``input_ids``, ``attention_mask``, ``labels``, ...).
    indices : int array
        This client's rows of ``data`` (all of them when ``data`` is the client's own).
    settings : TrainSettings
    device : torch.device
    honest_data : dict of tensors, optional
        A data attacker's own rows as they are, trained on in rounds before ``attack_from`` (``data`` holds
        them as the attack changes them); None: ``data`` in every round.
    attack_from : int
        The first round ``data`` is trained on when ``honest_data`` is given (the attack's ``from_round``).
    """

    client_id: int
    seed: int
    workspace: object
    data: dict
    indices: np.ndarray
    settings: TrainSettings
    device: torch.device
    honest_data: dict | None = None
    attack_from: int = 1


def update_prefix_energy(start, end) -> list[float] | None:
    r"""The local update's energy per prefix of slots, summed over modules: ``[e_1, .., e_R]``.

    .. math:: e_t = \sum_m \lVert \Delta W_{m, :t} \rVert_F^2,\qquad
              \Delta W_{m, :t} = B'_{m, :, :t} A'_{m, :t, :} - B_{m, :, :t} A_{m, :t, :}

    with ``(B_m, A_m)`` the folded adapter the client started the round from (``start``, the plan's) and
    ``(B'_m, A'_m)`` the one it trained (``end``); a module of rank ``r_m < t`` counts whole
    (:func:`lowrank_fed.linalg.prefix_update_energy` per module, ``R`` the largest rank). ``e_R`` is the
    whole update's ``sum_m ||Delta W_m||_F^2`` and ``e_t / e_R`` the share of it in slots ``0..t-1``
    (:func:`~lowrank_fed.llm.training.prefix_shares`). From the factors alone: two ``2r x 2r`` Gram
    matrices per module, no forward pass. None when ``start`` and ``end`` differ in modules or shapes.
    """
    if set(start) != set(end) or not start:
        return None
    if any(tuple(start[m].B.shape) != tuple(end[m].B.shape) or tuple(start[m].A.shape) != tuple(end[m].A.shape)
           for m in start):
        return None
    per_module = [prefix_update_energy(start[m], end[m]) for m in sorted(start)]
    rank = max(len(e) for e in per_module)
    total = np.zeros(rank)
    for e in per_module:
        total += np.concatenate([e, np.full(rank - len(e), e[-1])])
    return [float(v) for v in total]


def _train(plan, batches, context: ClientContext, dropout_seed: int):
    """Load ``plan`` into the workspace adapter, train it on ``batches``; ``(pairs, extras, stats)`` read back."""
    ws = context.workspace
    ws.set_base(plan.base)
    ws.load(plan.pairs, plan.extras)
    groups = ws.param_groups(plan.lrs)
    hooks = [make(ws) for make in plan.hooks]
    torch.manual_seed(dropout_seed)  # dropout, on every device
    stats = train_local(ws.peft, batches, groups, hooks=hooks, optimizer=context.settings.optimizer,
                        weight_decay=context.settings.weight_decay)
    pairs, extras = ws.extract()
    return pairs, extras, stats


def run_client(method: Method, message: Message, client_state: ClientState | None,
               context: ClientContext) -> tuple[Message, ClientState, TrainStats]:
    r"""Run one client's round: plan, (probe,) train, reply.

    Parameters
    ----------
    method : Method
    message : Message
        The download; its config has ``round`` and ``rank``.
    client_state : ClientState or None
        What the client kept from earlier rounds (None on its first round).
    context : ClientContext

    Returns
    -------
    reply : Message
        Arrays to upload; config ``num_examples``, ``rank``, ``client``, ``round`` and the method's
        own keys; metrics ``train_loss``, ``train_accuracy``, ``steps`` (of the local training),
        ``train_seconds`` (local compute: the probe's seconds plus the training's), ``probe_seconds``
        (0.0 without a probe), ``params_up`` (floating-point entries uploaded: factors, deltas and
        head; integer slot indices are bytes, not parameters) and ``prefix_energy`` (the local update's
        energy per prefix of slots, :func:`update_prefix_energy`; None when the trained adapter is not
        shaped like the start).
    client_state : ClientState
    stats : TrainStats
        Of the local training (the probe excluded).

    Notes
    -----
    A probe trains on the first ``steps`` of the round's batches with the round's dropout seed, so a
    probe with the plan's own learning rates and no hooks is the round's training without its hooks.
    """
    round_, k = int(message.config["round"]), int(context.client_id)
    if method.options.lr is not None:  # the method's own learning rate (option lr)
        context = dataclasses.replace(context, settings=dataclasses.replace(context.settings, lr=method.options.lr))
    state = client_state if client_state is not None else ClientState()
    generator = torch.Generator().manual_seed(CLIENT_FACTORS.seed(context.seed, round_, k))
    plan, state = method.client_plan(message, state, context, generator)
    if method.head_frozen:  # option freeze_head: the head is never trained (nor uploaded: client_reply)
        plan.lrs.pop("extras", None)

    idx = context.indices
    steps = context.settings.steps(len(idx))
    rng = BATCHES.rng(context.seed, round_, k)
    data = context.honest_data if context.honest_data is not None and round_ < context.attack_from else context.data
    batches = [make_batch(data, idx[b], context.device)
               for b in client_batches(len(idx), steps, context.settings.batch_size, rng)]
    dropout_seed = DROPOUT.seed(context.seed, round_, k)
    probe_seconds = 0.0
    probe = method.client_probe(plan, message, state, context)
    if probe is not None:
        start = time.perf_counter()
        probe_plan, probe_steps = probe
        probe_pairs, probe_extras, _ = _train(probe_plan, batches[:probe_steps], context, dropout_seed)
        plan, state = method.client_after_probe(plan, probe_pairs, probe_extras, state, message)
        probe_seconds = time.perf_counter() - start
    pairs, extras, stats = _train(plan, batches, context, dropout_seed)

    energy = update_prefix_energy(plan.pairs, pairs)
    reply, state = method.client_reply(plan, pairs, extras, state, message)
    reply.config.update(num_examples=int(len(idx)), client=k, round=round_)
    params_up = sum(t.numel() for t in reply.arrays.values() if t.is_floating_point())
    reply.metrics.update(train_loss=stats.loss, train_accuracy=stats.accuracy,
                         train_seconds=stats.seconds + probe_seconds, probe_seconds=probe_seconds,
                         params_up=int(params_up), steps=stats.steps, prefix_energy=energy)
    return reply, state, stats
