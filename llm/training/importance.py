r"""AdaLoRA's smoothed sensitivity of every LoRA weight, reduced to one importance score per rank slot.

After each backward pass, for every element ``w`` of every ``lora_B`` and ``lora_A`` weight,

.. math::

    I = |w \cdot \partial L / \partial w|,\qquad
    \bar I \leftarrow \beta_1 \bar I + (1 - \beta_1) I,\qquad
    \bar U \leftarrow \beta_2 \bar U + (1 - \beta_2)\,|I - \bar I|,\qquad
    \mathrm{score} = \bar I\, \bar U

and the score of slot ``i`` of a module is

.. math:: S_i = \operatorname{mean}_j \mathrm{score}(B[j, i]) + \operatorname{mean}_j \mathrm{score}(A[i, j])

where

- ``I`` is the sensitivity of the loss to the element (first-order estimate of the loss change when
  it is zeroed); ``Ibar`` its exponential moving average, ``Ubar`` the moving average of its deviation
  from ``Ibar`` (the uncertainty); both start at zero with no bias correction;
- ``beta_1 = beta_2 = 0.85`` by default;
- ``B`` shape ``(d_out, r)`` and ``A`` shape ``(r, d_in)``: column ``i`` of ``B`` and row ``i`` of ``A``
  make slot ``i``.

**Update order.** ``Ubar`` uses the *updated* ``Ibar`` (``|I^{(t)} - Ibar^{(t)}|``), as the equations
read in order in AdaLoRA (Zhang et al., ICLR 2023, eqs. 8-9) and as the authors' ``RankAllocator.update_ipt``
(loralib, adopted by PEFT) computes it: ``exp_avg_unc = b2 exp_avg_unc + (1 - b2) |ipt - exp_avg_ipt|`` with
``exp_avg_ipt`` already updated, both averages starting at zero. The slot score's means over the rows of
``A`` and the columns of ``B`` follow the same code's ``mask_to_budget`` (``docs/methods.md#hafl``).

**Raw or folded tensors.** ``w`` and ``dL/dw`` are PEFT's raw ``lora_B.weight`` / ``lora_A.weight``
and their ``.grad``. The product is the same on the folded factor ``B_f = s B_peft``
(``dL/dB_f = dL/dB_peft / s``, so ``B_f dL/dB_f = B_peft dL/dB_peft``): the scale cancels, scores of
clients with different ranks (different ``s``) are comparable, and no multiplication by ``s`` is needed.

**Cost.** Six element-wise passes over the LoRA weights per step (``torch._foreach_*``: one call per
pass for all weights; the moving averages as ``lerp``, ``Ibar + (1 - b1) (I - Ibar)``, the same update
up to rounding); the slot reduction runs once, when the scores are read. The hook must run before any
hook that zeroes gradients (:class:`~lowrank_fed.llm.training.SlotMask`), so frozen slots
are scored on their true gradient.

Source: AdaLoRA [paper] (importance); its use per slot in HAFL is [abstract; details ours].
"""

from __future__ import annotations

import torch

from .hooks import Hook

__all__ = ["SlotImportance", "slot_scores"]


def slot_scores(score_B: torch.Tensor, score_A: torch.Tensor) -> torch.Tensor:
    r"""``S_i = mean_j score_B[j, i] + mean_j score_A[i, j]``, shape ``(r,)``.

    Parameters
    ----------
    score_B : tensor, shape (d_out, r)
    score_A : tensor, shape (r, d_in)

    Examples
    --------
    >>> slot_scores(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 3.0]])).tolist()
    [3.0, 4.0]
    """
    if score_B.ndim != 2 or score_A.ndim != 2 or score_B.shape[1] != score_A.shape[0]:
        raise ValueError(f"Element scores must have shapes (d_out, r) and (r, d_in). Got {tuple(score_B.shape)} "
                         f"and {tuple(score_A.shape)}.")
    return score_B.mean(dim=0) + score_A.mean(dim=1)


class SlotImportance(Hook):
    r"""Accumulate AdaLoRA's smoothed sensitivity of the active adapter after every backward pass.

    Parameters
    ----------
    workspace : AdapterWorkspace (or anything with ``lora_parameters() -> {module: (lora_B, lora_A)}``)
        The live adapter being trained; its parameters are read once, at construction.
    beta1, beta2 : float in [0, 1)
        Smoothing of the sensitivity and of the uncertainty.

    Notes
    -----
    A weight with no gradient at a step (not trained) is skipped at that step: its averages do not
    change. :meth:`slot_scores` and :meth:`element_scores` may be read at any time (detached copies).
    """

    def __init__(self, workspace, *, beta1: float = 0.85, beta2: float = 0.85):
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= float(beta) < 1.0:
                raise ValueError(f"The '{name}' parameter must be in [0, 1). Got {beta!r}.")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.modules: list[str] = []
        self._params: list[torch.nn.Parameter] = []  # B_0, A_0, B_1, A_1, ...
        for module, (B, A) in workspace.lora_parameters().items():
            self.modules.append(module)
            self._params += [B, A]
        self._detached = [p.detach() for p in self._params]  # views of the live weights, outside autograd
        self._ibar = [torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for p in self._params]
        self._ubar = [torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for p in self._params]
        self.steps = 0

    def after_backward(self, step: int) -> None:
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):  # untrained weights this step: only the others are updated
            live = [i for i, g in enumerate(grads) if g is not None]
            if not live:
                return
            params, grads = [self._detached[i] for i in live], [grads[i] for i in live]
            ibar, ubar = [self._ibar[i] for i in live], [self._ubar[i] for i in live]
        else:
            params, ibar, ubar = self._detached, self._ibar, self._ubar
        with torch.no_grad():
            sens = torch._foreach_mul(params, grads)  # w * dL/dw
            torch._foreach_abs_(sens)  # I
            torch._foreach_lerp_(ibar, sens, 1.0 - self.beta1)  # Ibar <- b1 Ibar + (1 - b1) I
            torch._foreach_sub_(sens, ibar)
            torch._foreach_abs_(sens)  # |I - Ibar|, with the updated Ibar
            torch._foreach_lerp_(ubar, sens, 1.0 - self.beta2)  # Ubar <- b2 Ubar + (1 - b2) |I - Ibar|
        self.steps += 1

    def averages(self) -> dict[str, tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        """``{module: ((Ibar_B, Ubar_B), (Ibar_A, Ubar_A))}`` (copies)."""
        return {m: ((self._ibar[2 * j].clone(), self._ubar[2 * j].clone()),
                    (self._ibar[2 * j + 1].clone(), self._ubar[2 * j + 1].clone()))
                for j, m in enumerate(self.modules)}

    def element_scores(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{module: (score_B, score_A)}``, ``score = Ibar * Ubar`` per element (shapes of ``lora_B``, ``lora_A``)."""
        return {m: (self._ibar[2 * j] * self._ubar[2 * j], self._ibar[2 * j + 1] * self._ubar[2 * j + 1])
                for j, m in enumerate(self.modules)}

    def slot_scores(self) -> dict[str, torch.Tensor]:
        """``{module: S}``, ``S`` shape ``(r,)`` (:func:`slot_scores` of the element scores)."""
        return {m: slot_scores(sB, sA) for m, (sB, sA) in self.element_scores().items()}
