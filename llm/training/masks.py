r"""Slot masks: train only chosen rank slots; every other entry stays bit-identical.

For module ``m`` with trainable slots ``S_m`` (column ``i`` of ``B``, row ``i`` of ``A``), after each
backward pass

.. math:: \nabla_{B}[:, i] \leftarrow 0,\quad \nabla_{A}[i, :] \leftarrow 0 \qquad (i \notin S_m),

and after each optimiser step the masked slots are written back from the values they had when training
started, so AdamW's weight decay (or any other update rule) cannot move them: the upload of a masked
client differs from its download only in ``S_m``. Used by HAFL's importance-based freezing (the frozen
slots stay in the forward pass) and LoRA-A2's masked local training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .hooks import Hook

__all__ = ["SlotMask"]


class SlotMask(Hook):
    r"""Keep every slot outside ``trainable[module]`` of the named factors fixed during local training.

    Parameters
    ----------
    workspace : AdapterWorkspace
        With the adapter to train active (built just before training, so its values are the start).
    trainable : mapping module -> sequence of slot indices
        The slots that may change; a module not named has no trainable slot.
    factors : sequence of {"B", "A"}
        The factors the mask applies to (a factor left out of the optimiser needs no mask).
    """

    def __init__(self, workspace, trainable: Mapping[str, Sequence[int]], factors: Sequence[str] = ("B", "A")):
        unknown = sorted(set(factors) - {"A", "B"})
        if unknown:
            raise ValueError(f"The 'factors' parameter takes 'A' and 'B'. Got {unknown}.")
        self._frozen = []  # (parameter, slot axis, frozen slot index tensor, original values of those slots)
        for module, (B, A) in workspace.lora_parameters().items():
            rank = B.shape[1]
            keep = {int(i) for i in trainable.get(module, ())}
            bad = sorted(i for i in keep if not 0 <= i < rank)
            if bad:
                raise ValueError(f"Module {module!r}: trainable slots {bad[:3]} out of range; the adapter has rank {rank}.")
            frozen = torch.tensor([i for i in range(rank) if i not in keep], dtype=torch.long, device=B.device)
            if not len(frozen):
                continue
            for name, param, axis in (("B", B, 1), ("A", A, 0)):
                if name in factors:
                    self._frozen.append((param, axis, frozen, param.detach().index_select(axis, frozen).clone()))

    def after_backward(self, step: int) -> None:
        for param, axis, idx, _ in self._frozen:
            if param.grad is not None:
                param.grad.index_fill_(axis, idx, 0.0)

    def after_step(self, step: int) -> None:
        with torch.no_grad():
            for param, axis, idx, values in self._frozen:
                param.index_copy_(axis, idx, values)
