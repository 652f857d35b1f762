r"""Server and client states as flat tensors plus JSON: what a checkpoint and a final adapter file hold.

:func:`state_from_flat` inverts :func:`state_to_flat` exactly (the same tensors, the same JSON), so a resumed run
continues from the bytes an uninterrupted run held.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..methods import ClientState, ServerState
from ..protocol import Message, decode_extras, decode_pairs, encode_extras, encode_pairs, from_flat, to_flat

__all__ = ["state_to_flat", "state_from_flat", "load_final"]


def state_to_flat(server: ServerState, clients: dict[int, ClientState]) -> tuple[dict, dict]:
    r"""Server and client states as flat tensors plus JSON (a checkpoint's content).

    Each state is written as a :class:`Message` and encoded by :func:`~lowrank_fed.llm.protocol.to_flat`,
    the one encoding that the Flower apps use too: ``server/`` (the global pairs, the head, the method's
    arrays; config: round, ranks, info) and ``client/<k>/`` (a client's arrays; config: its info).
    """
    arrays = {**encode_pairs(server.pairs), **encode_extras(server.extras),
              **{f"arrays/{n}": v for n, v in server.arrays.items()}}
    config = {"round": server.round, "ranks": {str(k): r for k, r in server.ranks.items()}, "info": server.info}
    tensors, meta = to_flat(Message(arrays, config), "server/")
    metas = {"server": meta, "clients": {}}
    for k, c in clients.items():
        t, metas["clients"][str(k)] = to_flat(Message(c.arrays, c.info), f"client/{k}/")
        tensors.update(t)
    return tensors, metas


def state_from_flat(tensors: dict, metas: dict, shapes: dict) -> tuple[ServerState, dict[int, ClientState]]:
    """Inverse of :func:`state_to_flat`."""
    msg = from_flat(tensors, metas["server"], "server/")
    pairs, cfg = decode_pairs(msg.arrays), msg.config
    arrays = {k[len("arrays/"):]: v for k, v in msg.arrays.items() if k.startswith("arrays/")}
    server = ServerState(cfg["round"], {m: pairs[m] for m in shapes if m in pairs}, decode_extras(msg.arrays),
                         dict(shapes), {int(k): int(r) for k, r in cfg["ranks"].items()}, arrays, cfg["info"])
    clients = {}
    for k, meta in metas["clients"].items():
        c = from_flat(tensors, meta, f"client/{k}/")
        clients[int(k)] = ClientState(c.arrays, c.config)
    return server, clients


def load_final(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a method's final server state (``adapters/<method>.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(path))
