r"""A :class:`~lowrank_fed.llm.protocol.Message` as Flower records, and back, bit for bit.

A message ``(arrays, config, metrics)`` becomes a Flower ``RecordDict`` with three records:

- ``"<part>.arrays"``: an ``ArrayRecord`` of the named tensors (``lora/<module>/B`` of shape ``(d_out, r)``, ...);
- ``"<part>.config"``: a ``ConfigRecord`` with one key ``"meta"``, ``json.dumps`` of
  :func:`~lowrank_fed.llm.protocol.to_flat`'s ``meta`` (the config: round, rank, client id, ``num_examples``,
  slot indices, ...; the metrics) and one key ``"dtypes"``, the tensors' names and torch dtypes in their order
  (so the decoded message has its tensors in the order they were sent);
- ``"<part>.metrics"``: a ``MetricRecord`` of the numeric metrics, for Flower's own logs only.

Per-client metadata travels in the ``ConfigRecord``, never in a ``MetricRecord``: Flower's strategies average
``MetricRecord`` values across replies, which would blend one client's rank or id with another's. Tensors travel
as NumPy arrays of their own dtype, except ``bfloat16`` (``ArrayRecord`` rejects it, NumPy has no such dtype),
which is sent as ``float32`` and cast back on receipt: every bfloat16 value is a float32 value, so the round trip
is exact. ``<part>`` names the message inside the ``RecordDict`` (``"msg"``; the client state travels as
``"state"``), so several messages can share one.

Examples
--------
>>> import torch
>>> m = Message({"lora/q/B": torch.ones(2, 1, dtype=torch.bfloat16)}, {"round": 1, "rank": 1}, {"loss": 0.5})
>>> back = from_records(to_records(m))
>>> back.arrays["lora/q/B"].dtype, back.config, back.metrics
(torch.bfloat16, {'round': 1, 'rank': 1}, {'loss': 0.5})
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..protocol import Message, from_flat, to_flat

__all__ = ["to_records", "from_records", "has_part"]

#: torch dtypes sent as another NumPy dtype (ArrayRecord cannot hold them), cast back on receipt.
_WIRE = {torch.bfloat16: torch.float32}
_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                                     torch.int8, torch.int16, torch.int32, torch.int64,
                                                     torch.uint8, torch.bool)}


def _array(t: torch.Tensor) -> Array:
    t = t.detach().to("cpu")
    t = t.to(_WIRE.get(t.dtype, t.dtype)).contiguous()
    return Array(t.numpy())


def _tensor(a: Array, dtype: str) -> torch.Tensor:
    if dtype not in _DTYPES:
        raise ValueError(f"Record tensor dtype {dtype!r} is not one this protocol sends; expected one of "
                         f"{sorted(_DTYPES)}.")
    return torch.from_numpy(np.array(a.numpy(), copy=True)).to(_DTYPES[dtype])


def to_records(message: Message, part: str = "msg", into: RecordDict | None = None) -> RecordDict:
    """Add ``message`` to ``into`` (a new ``RecordDict`` if None) as the records ``<part>.arrays|config|metrics``."""
    tensors, meta = to_flat(message)
    content = RecordDict() if into is None else into
    content[f"{part}.arrays"] = ArrayRecord({k: _array(t) for k, t in tensors.items()})
    dtypes = [[k, str(t.dtype).removeprefix("torch.")] for k, t in tensors.items()]  # a list: keeps the order
    content[f"{part}.config"] = ConfigRecord({"meta": json.dumps(meta), "dtypes": json.dumps(dtypes)})
    numeric = {k: v for k, v in message.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    content[f"{part}.metrics"] = MetricRecord(numeric)
    return content


def has_part(content: RecordDict, part: str) -> bool:
    """Whether ``content`` holds a message named ``part``."""
    return f"{part}.config" in content.config_records


def from_records(content: RecordDict, part: str = "msg") -> Message:
    """Inverse of :func:`to_records`.

    Raises
    ------
    ValueError
        ``content`` has no message ``part``, or its tensors and their dtypes do not match.
    """
    if not has_part(content, part):
        raise ValueError(f"Flower message has no records {part!r}; expected '{part}.arrays' and '{part}.config'. "
                         f"Got {sorted(content.keys())}.")
    config = content.config_records[f"{part}.config"]
    meta, dtypes = json.loads(str(config["meta"])), dict(json.loads(str(config["dtypes"])))
    arrays = content.array_records.get(f"{part}.arrays", ArrayRecord())
    if set(arrays.keys()) != set(dtypes):
        raise ValueError(f"Flower message {part!r}: tensors {sorted(arrays.keys())[:3]} do not match the dtypes "
                         f"listed for {sorted(dtypes)[:3]}.")
    tensors = {k: _tensor(arrays[k], dtypes[k]) for k in dtypes}
    return from_flat(tensors, meta)
