r"""The messages a server and its clients exchange, and the one encoder for checkpoints and Flower.

A :class:`Message` has three parts, as Flower's ``RecordDict`` has:

- ``arrays``: named tensors. Folded LoRA factors are ``"lora/<module>/B"`` (shape ``(d_out, r)``) and
  ``"lora/<module>/A"`` (shape ``(r, d_in)``), so ``B @ A`` is the update ``Delta W`` itself; non-LoRA
  weights (a classifier head) are ``"extra/<name>"``; FLoRA's merges are ``"merge/<round>/<module>/B|A"``.
- ``config``: JSON-able scalars and short lists (round, rank, slot indices, flags, ``num_examples``).
  Everything the other side needs to know about a client travels here, never by reading its objects.
- ``metrics``: numbers the client reports (training loss, accuracy, seconds); never used by a rule.

Bytes on the wire are ``sum numel * element size`` over ``arrays`` (:func:`message_bytes`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lowrank_fed import FactorPair

__all__ = [
    "Message",
    "encode_pairs",
    "decode_pairs",
    "decode_factors",
    "encode_extras",
    "decode_extras",
    "message_bytes",
    "to_flat",
    "from_flat",
]


@dataclass
class Message:
    """One message between server and client: named tensors, a JSON-able config, and metrics."""

    arrays: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors (what moves on the wire)."""
        return message_bytes(self.arrays)


def encode_pairs(pairs: Mapping[str, FactorPair], prefix: str = "lora", factors: Sequence[str] = ("B", "A")):
    """``{"<prefix>/<module>/B": B, "<prefix>/<module>/A": A}`` (only the named ``factors``)."""
    out: dict[str, torch.Tensor] = {}
    for name, pair in pairs.items():
        for f in factors:
            out[f"{prefix}/{name}/{f}"] = pair.B if f == "B" else pair.A
    return out


def decode_factors(arrays: Mapping[str, torch.Tensor], prefix: str, factor: str) -> dict[str, torch.Tensor]:
    """``{module: tensor}`` for the keys ``"<prefix>/<module>/<factor>"``."""
    head, tail = prefix + "/", "/" + factor
    return {k[len(head) : -len(tail)]: v for k, v in arrays.items() if k.startswith(head) and k.endswith(tail)}


def decode_pairs(arrays: Mapping[str, torch.Tensor], prefix: str = "lora") -> dict[str, FactorPair]:
    """Inverse of :func:`encode_pairs` for arrays that carry both factors.

    Raises
    ------
    ValueError
        A module has one factor but not the other.
    """
    Bs, As = decode_factors(arrays, prefix, "B"), decode_factors(arrays, prefix, "A")
    if set(Bs) != set(As):
        raise ValueError(f"Message has unpaired factors for modules {sorted(set(Bs) ^ set(As))[:3]}; expected B and A.")
    return {m: FactorPair(Bs[m], As[m]) for m in Bs}


def encode_extras(extras: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"extra/{n}": v for n, v in extras.items()}


def decode_extras(arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("extra/") :]: v for k, v in arrays.items() if k.startswith("extra/")}


def message_bytes(arrays: Mapping[str, torch.Tensor]) -> int:
    """Bytes on the wire: ``sum numel * element size`` over the tensors."""
    return int(sum(t.numel() * t.element_size() for t in arrays.values()))


def to_flat(message: Message, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict]:
    r"""``(tensors, meta)``: the message as flat named tensors plus one JSON-able dict.

    The single encoding of a message: checkpoints store ``tensors`` in safetensors and ``meta`` in
    JSON, and the Flower apps map ``tensors`` to an ``ArrayRecord`` and ``meta`` to a ``ConfigRecord``
    (``json.dumps`` of the lists). Keys get ``prefix`` so several messages share one file.

    Examples
    --------
    >>> m = Message({"lora/q/B": torch.zeros(2, 1)}, {"round": 1}, {"loss": 0.5})
    >>> t, meta = to_flat(m, "c0/")
    >>> from_flat(t, meta, "c0/") == m
    True
    """
    json.dumps(message.config), json.dumps(message.metrics)  # raises TypeError on non-JSON values
    tensors = {prefix + k: v for k, v in message.arrays.items()}
    return tensors, {"config": message.config, "metrics": message.metrics}


def from_flat(tensors: Mapping[str, torch.Tensor], meta: Mapping, prefix: str = "") -> Message:
    """Inverse of :func:`to_flat`."""
    arrays = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return Message(arrays, dict(meta.get("config", {})), dict(meta.get("metrics", {})))
