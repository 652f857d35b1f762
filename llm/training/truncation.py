r"""Prefix truncation of the live adapter: PreLort's prefix-nested training as hooks.

Truncating an adapter of rank ``r`` to its first ``tau`` slots is a mask on the rank axis,

.. math:: W_0 + s B\, \operatorname{diag}(m_\tau) A = W_0 + s B_{:, :\tau} A_{:\tau, :},\qquad
          (m_\tau)_i = [\, i < \tau \,]

applied in the forward pass: a forward hook on each LoRA layer's ``lora_A`` module fills the slots
``i >= tau`` of ``lora_A(x)`` (shape ``(..., r)``) with zeros, so ``lora_B`` sees only the prefix, and
both ``B[:, i]`` and ``A[i, :]`` of a masked slot get an exactly zero gradient from that pass. The
adapter's tensors are never copied or edited; :meth:`PrefixMask.close` removes the hooks, so the
adapter's forward pass is the untruncated one again.

Two ways to train under a set of truncations ``T`` (PreLort's ``T_k``, :func:`truncation_set`):

- :class:`SampledTruncation`: one ``tau`` per batch, drawn uniformly from ``T`` with a seeded
  generator (ordered dropout / Matryoshka); one forward pass per batch;
- :class:`AllTruncations`: the mean of the ``|T|`` truncated losses per batch,

  .. math:: \mathcal L = \frac{1}{|T|} \sum_{\tau \in T} \ell(W_0 + s B_{:, :\tau} A_{:\tau, :}; x)

  (``|T|`` forward passes, one backward pass; it replaces the loop's forward pass through
  :meth:`~lowrank_fed.llm.training.hooks.Hook.forward`).

Only vanilla, unmerged LoRA ``Linear`` layers can be masked this way (PEFT calls ``lora_A`` as a module
there); anything else is an error at construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace

import torch

from .hooks import Hook

__all__ = ["truncation_set", "PrefixMask", "SampledTruncation", "AllTruncations"]


def truncation_set(ladder: Iterable[int], rank: int) -> tuple[int, ...]:
    r"""PreLort's truncations of a client of rank ``r_k``: ``T_k = {rho_l <= r_k} ∪ {r_k}``, ascending.

    Parameters
    ----------
    ladder : iterable of int
        The federation's ranks ``rho_1 < .. < rho_L`` (any order, repeats allowed).
    rank : int
        The client's rank ``r_k >= 1``.

    Raises
    ------
    ValueError
        A rank below 1.

    Examples
    --------
    >>> truncation_set([2, 4, 8], 4), truncation_set([2, 4, 8], 2), truncation_set([2, 8], 5)
    ((2, 4), (2,), (2, 5))
    """
    ladder = [int(r) for r in ladder]
    bad = [r for r in [*ladder, int(rank)] if r < 1]
    if bad:
        raise ValueError(f"Ranks must be positive ints. Got {bad[:3]} (ladder {ladder}, rank {rank}).")
    return tuple(sorted({r for r in ladder if r <= rank} | {int(rank)}))


class PrefixMask(Hook):
    r"""Mask the slots ``i >= tau`` of the active adapter in every forward pass (``tau = None``: none).

    Parameters
    ----------
    workspace : AdapterWorkspace
        With the adapter to train active.
    truncations : sequence of int
        The values ``tau`` may take; the masks are built once for these.

    Attributes
    ----------
    tau : int or None
        The current truncation (set it to change the next forward passes); a module whose rank is
        at most ``tau`` is not masked.

    Raises
    ------
    ValueError
        An empty or non-positive truncation; a LoRA layer that is merged, uses a LoRA variant
        (DoRA), or whose ``lora_A`` is not a ``Linear``.
    """

    def __init__(self, workspace, truncations: Sequence[int]):
        self.truncations = tuple(sorted({int(t) for t in truncations}))
        if not self.truncations or self.truncations[0] < 1:
            raise ValueError(f"The 'truncations' parameter must hold positive ints. Got {list(truncations)}.")
        from ..peft_bridge import lora_layers  # here, so that importing the loop does not import PEFT

        self.tau: int | None = None
        self._handles = []
        adapter = workspace.active
        layers = {name: layer for name, layer in lora_layers(workspace.peft).items() if adapter in layer.lora_A}
        for name, layer in layers.items():  # every layer checked before any hook is registered
            variant = adapter in getattr(layer, "lora_variant", {})
            if layer.merged or variant or not isinstance(layer.lora_A[adapter], torch.nn.Linear):
                raise ValueError(f"Module {name!r}: only unmerged vanilla LoRA Linear layers can be truncated.")
        for layer in layers.values():
            lora_A = layer.lora_A[adapter]
            rank, device = lora_A.out_features, lora_A.weight.device
            drops = {t: torch.arange(rank, device=device) >= t for t in self.truncations if t < rank}
            self._handles.append(lora_A.register_forward_hook(self._masker(drops)))

    def _masker(self, drops: Mapping[int, torch.Tensor]):
        def hook(module, args, output):
            drop = drops.get(self.tau)
            return None if drop is None else output.masked_fill(drop, 0.0)

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.tau = [], None


class SampledTruncation(PrefixMask):
    r"""One truncation per batch, ``tau ~ Uniform(T)`` drawn from ``generator`` before each forward pass.

    Parameters
    ----------
    workspace : AdapterWorkspace
    truncations : sequence of int
        ``T`` (PreLort: :func:`truncation_set`).
    generator : torch.Generator
        The client's round generator; the same seed gives the same ``taus``.

    Attributes
    ----------
    taus : list of int
        The truncation of every step so far, in order.
    """

    def __init__(self, workspace, truncations: Sequence[int], generator: torch.Generator):
        super().__init__(workspace, truncations)
        self.generator, self.taus = generator, []

    def before_forward(self, step: int, batch) -> None:
        i = int(torch.randint(len(self.truncations), (1,), generator=self.generator))
        self.tau = self.truncations[i]
        self.taus.append(self.tau)


class AllTruncations(PrefixMask):
    r"""The mean of the truncated losses over every ``tau`` in ``T``, per batch (``|T|`` forward passes).

    The output's ``loss`` is ``(1/|T|) sum_tau loss_tau``; its ``logits`` are those of the largest
    ``tau`` (the client's whole adapter), which the loop scores for its running accuracy. The ``|T|``
    graphs are kept until the backward pass (``|T|`` times the activation memory of one pass); in
    training mode each pass draws its own dropout masks.

    Attributes
    ----------
    steps : int
        Batches seen so far (each used every ``tau`` once).
    """

    def __init__(self, workspace, truncations: Sequence[int]):
        super().__init__(workspace, truncations)
        self.steps = 0

    def forward(self, step: int, model: torch.nn.Module, batch) -> SimpleNamespace:
        total, out = None, None
        for tau in self.truncations:
            self.tau = tau
            out = model(**batch)
            total = out.loss if total is None else total + out.loss
        self.tau = None
        self.steps += 1
        return SimpleNamespace(loss=total / len(self.truncations), logits=out.logits)
