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

Shared pieces (state, plan, base class) are in :mod:`.base`; messages in :mod:`lowrank_fed.llm.protocol`. The one
registry of names is :mod:`.registry` (a new method: one file plus one line there); every method's options model is
in :mod:`.options`. Both import no torch; the classes are imported when first asked for.
"""

from __future__ import annotations

import importlib

from .options import PAIR_RULES, Options, PairOptions
from .registry import METHODS, REGISTRY, make_method, method_options, register_method

__all__ = [
    "METHODS",
    "REGISTRY",
    "make_method",
    "method_options",
    "register_method",
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

#: Names imported on first use (their modules import torch): ``from lowrank_fed.llm.methods import HAFL`` works as
#: before, and ``import lowrank_fed.llm.methods`` (the registry, the options) stays torch-free.
_LAZY = {
    "ClientState": "base", "LocalPlan": "base", "Method": "base", "Model": "base", "ServerState": "base",
    "weights_of": "base", "FedIT": "fedit", "FFALoRA": "ffa", "FedSALoRA": "fedsa", "HetLoRA": "hetlora",
    "Replication": "replication", "FLoRA": "flora", "FlexLoRA": "flexlora", "PreLort": "prelort", "HAFL": "hafl",
    "LoRAA2": "lora_a2", "CLAIR": "clair", "Oracle": "clair", "ClairNoDetect": "clair", "Local": "local",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
