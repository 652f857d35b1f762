r"""Hooks of the local training loop, and HetLoRA's tail regulariser as one of them.

A hook is called around each optimiser step of :func:`~lowrank_fed.llm.training.train_local`:

- ``before_forward(step, batch)``: e.g. PreLort's truncation of the adapter to a sampled prefix;
- ``forward(step, model, batch) -> output | None``: replaces ``model(**batch)`` when a hook returns an
  output (an object with ``.loss``, the loss to minimise, and ``.logits``, scored for the running
  accuracy), e.g. PreLort's mean of several truncated losses per batch; ``None`` (the default) keeps the
  model's own forward pass. At most one hook of a loop may override it;
- ``penalty(step) -> tensor | None``: a term added to the loss (HetLoRA's tail regulariser);
- ``after_backward(step)``: e.g. masking the gradients of frozen slots, accumulating importance;
- ``before_step(step, optimizer)``: just before ``optimizer.step()`` (after gradient clipping), with the
  optimiser, whose state a hook may read or save (PreLort's sampled truncation saves the slots outside
  ``tau``, parameters and optimiser state, to put them back after the step);
- ``after_step(step)``: e.g. restoring slots that must not move;
- ``close()``: once after the last step (undo anything the hook changed on the model).

Each hook is built by a method's client policy with the live adapter (an
:class:`~lowrank_fed.llm.peft_bridge.AdapterWorkspace`), so it reads and edits the very tensors
being trained; the plain loop has no hook and pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lowrank_fed import FactorPair
from lowrank_fed.linalg import tail_norm_product as core_tail_norm_product

__all__ = ["Hook", "TailRegulariser", "tail_norm_product"]


class Hook:
    """Base hook: every call does nothing. Subclasses override the calls they need."""

    def before_forward(self, step: int, batch: Mapping[str, torch.Tensor]) -> None:
        return None

    def forward(self, step: int, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]):
        """The model's output for ``batch`` in place of ``model(**batch)``; None keeps ``model(**batch)``."""
        return None

    def penalty(self, step: int) -> torch.Tensor | None:
        return None

    def after_backward(self, step: int) -> None:
        return None

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        return None

    def after_step(self, step: int) -> None:
        return None

    def close(self) -> None:
        return None


def tail_norm_product(pairs: Mapping[str, FactorPair], t: int | Mapping[str, int]) -> torch.Tensor:
    r"""HetLoRA's tail term, summed over modules (differentiable on live pairs).

    .. math:: \sum_m \lVert B_m[:, t:] \rVert_F\, \lVert A_m[t:, :] \rVert_F

    where ``t`` (one for all modules, or per module) is the first tail slot, ``floor(gamma r_k)``,
    and ``B_m`` is the *folded* factor ``s B_peft`` (``B_m @ A_m = Delta W_m``), so the penalty is on
    the update itself whatever the client's PEFT scale. Each module's term is the core's
    :func:`lowrank_fed.linalg.tail_norm_product`.
    """
    total = None
    for name, pair in pairs.items():
        tm = t[name] if isinstance(t, Mapping) else t
        term = core_tail_norm_product(pair.B, pair.A, tm)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


class TailRegulariser(Hook):
    r"""HetLoRA's rank regulariser, added to the loss at every step.

    .. math:: \lambda \sum_m \lVert B_m[:, t:] \rVert_F \lVert A_m[t:, :] \rVert_F,\qquad t = \lfloor \gamma r_k \rfloor

    computed on the live adapter tensors (:meth:`AdapterWorkspace.live_pairs`), so it has a gradient
    (one public copy computes it on ``.data`` and so never regularises). ``B`` is folded (``s B_peft``).

    Parameters
    ----------
    workspace : AdapterWorkspace
        Holds the active adapter being trained.
    lam : float
        Regularisation strength ``lambda >= 0``.
    t : int
        First tail slot.
    """

    def __init__(self, workspace, lam: float, t: int):
        self.workspace, self.lam, self.t = workspace, float(lam), int(t)

    def penalty(self, step: int) -> torch.Tensor:
        return self.lam * tail_norm_product(self.workspace.live_pairs(), self.t)
