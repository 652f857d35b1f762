r"""Federated LoRA methods, one file each: a client policy plus a server rule taken from the core.

=============  ===============================  ============================================================
name           server rule                      client policy
=============  ===============================  ============================================================
fedit          ``zero_pad`` (data weights)      prefix download ``truncate(global, r_k)``; train A, B, head
ffa            ``zero_pad`` on B                A regenerated from the shared seed and frozen; B sent
fedsa          ``segment`` on A                 only A travels; B and the head stay on the client
hetlora        ``zero_pad`` (norm weights)      prefix; tail regulariser hook; self-pruning of the rank
replication    ``replication``                  prefix download; train A, B, head
flora          ``stack``                        merges into the client's base; fresh adapters each round
flexlora       ``svd``                          SVD download ``U_r diag(S_r)``, ``Vh_r`` (+ complement)
prelort        ``segment`` (``previous=``)      prefix download; prefix-nested training (truncation hooks)
hafl           ``slotwise`` (``previous=``)     top-r_k slots by importance: truncation, or freezing (SlotMask)
lora_a2        ``alternating_update``           rank-r_G download; one factor a round; probe -> top r_k N
                                                slots model-wide; masked delta + indices uploaded
clair          CLAIR per module (robust)        FedIT's client; downloads its refined adapter (flagged
                                                clients and new ones: the benign mean)
oracle         benign FedAvg (told the truth)   FedIT's client; an upper bound for contaminated runs
clair_nodetect CLAIR's refinement, nobody        as clair; the reference separating detection from the
               flagged                          refinement's personalisation
local          none                             trains its own adapter and head; uploads nothing
=============  ===============================  ============================================================

Composition: a client policy that downloads a prefix and uploads whole pairs (fedit, hetlora,
replication, prelort) can be served by another core rule, ``[prelort] server = "svd"`` (one of
:data:`PAIR_RULES`); the other methods need their own rule and refuse any other with a clear error.

Shared pieces (state, plan, base class) are in :mod:`.base`; messages in :mod:`lowrank_fed.llm.protocol`.
"""

from __future__ import annotations

from .base import PAIR_RULES, ClientState, LocalPlan, Method, Model, Options, PairOptions, ServerState, weights_of
from .clair import CLAIR, ClairNoDetect, Oracle
from .fedit import FedIT
from .fedsa import FedSALoRA
from .ffa import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hafl import HAFL
from .hetlora import HetLoRA
from .local import Local
from .lora_a2 import LoRAA2
from .prelort import PreLort
from .replication import Replication

__all__ = [
    "METHODS",
    "make_method",
    "ClientState",
    "LocalPlan",
    "Method",
    "Model",
    "Options",
    "PairOptions",
    "PAIR_RULES",
    "ServerState",
    "weights_of",
    "FedIT",
    "FFALoRA",
    "FedSALoRA",
    "HetLoRA",
    "Replication",
    "FLoRA",
    "FlexLoRA",
    "PreLort",
    "HAFL",
    "LoRAA2",
    "CLAIR",
    "Oracle",
    "ClairNoDetect",
    "Local",
]

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FedIT, FFALoRA, FedSALoRA, HetLoRA, Replication, FLoRA, FlexLoRA, PreLort, HAFL, LoRAA2,
                              CLAIR, Oracle, ClairNoDetect, Local)
}


def make_method(name: str, **options) -> Method:
    """A method by name (a key of :data:`METHODS`) with its options.

    Raises
    ------
    ValueError
        An unknown name (the message lists the valid ones), or options its ``Options`` model rejects.
    """
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; expected one of {sorted(METHODS)}.")
    return METHODS[name](**options)
