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

**The step leaves the slots outside the truncation untouched.** A zero gradient does not stop an
optimiser: AdamW still moves a parameter through its first moment and its decoupled weight decay, and
decays both moment estimates; SGD moves it through its momentum buffer and weight decay. So for a step
taken under truncation ``tau`` (:class:`SampledTruncation`), with ``theta_i = (B[:, i], A[i, :])`` the
slot's entries and ``sigma_i`` its slices of the optimiser state (AdamW: ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``; SGD: ``momentum_buffer``),

.. math:: (\theta_i, \sigma_i)^{(s+1)} =
          \begin{cases} \mathrm{opt}(\theta_i^{(s)}, \sigma_i^{(s)}, g_i^{(s)}) & i < \tau \\
                        (\theta_i^{(s)}, \sigma_i^{(s)}) & i \ge \tau \end{cases}

bit for bit: :meth:`PrefixMask.before_step` saves those slices, :meth:`PrefixMask.after_step` writes
them back (state the optimiser creates at its first step starts at zero, its initial value, so slices
of it are written back as zeros; for SGD with ``dampening = 0`` a zero momentum buffer gives the same
next step as no buffer). Slots ``i < tau`` take exactly the optimiser's step, as without nesting.

*Adam's step counter* is one per tensor, so it counts every step, the held ones included: a slot that
was trained on ``n`` of the tensor's ``t`` steps has moments that are its own averages over those ``n``
steps but is bias-corrected with ``t``: its step is scaled by
``c = [sqrt(1 - b2^t) / (1 - b1^t)] / [sqrt(1 - b2^n) / (1 - b1^n)]`` relative to a per-slot Adam
(``c = 1`` for the slots ``i < min T``, trained at every step; for ``b2 = 0.999`` and ``10 < n <= t << 1000``,
``c ~ sqrt(t / n)``, so a slot trained on a third of the steps takes steps about 1.7 times larger). We keep it:
without the hold, plain AdamW has the same counter *and* moves the held slots, so the hold removes the
movement and leaves the bias correction as torch applies it; a per-slot counter would need an optimiser
of our own in place of torch's, and on the toy regression of ``benchmarks/bench_prelort.py`` one (a
per-slot count, each trained slot's step recomputed from its own ``n``; tried outside the project) moved
the prefix share and the rank-4 error by at most 0.03 and the whole adapter's error by at most 0.02 at
20-300 steps (``docs/methods.md#prelort``). ``"all"`` trains every slot at
every step (``tau`` is unset at the step), so nothing is held.

Only vanilla, unmerged LoRA ``Linear`` layers can be masked this way (PEFT calls ``lora_A`` as a module
there); anything else is an error at construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import SimpleNamespace

import torch

from .hooks import Hook

__all__ = ["truncation_set", "prefix_shares", "PrefixMask", "SampledTruncation", "AllTruncations"]


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


def prefix_shares(energy: Sequence[float] | None, ladder: Iterable[int]) -> dict[str, float | None] | None:
    r"""The share of a client's local update carried by its first ``t`` slots, at each level ``t`` of ``ladder``.

    .. math:: \mathrm{share}_t = \frac{\sum_m \lVert \Delta W_{m, :t} \rVert_F^2}{\sum_m \lVert \Delta W_m \rVert_F^2},
              \qquad \Delta W_{m, :t} = \big(s B_{:, :t} A_{:t, :}\big)_{\text{end of round}}
                                       - \big(s B_{:, :t} A_{:t, :}\big)_{\text{start of round}}

    for every federation rank ``t`` in ``ladder`` below the adapter's rank ``r = len(energy)`` (the
    truncations ``T_k`` of the client but its own rank, whose share is 1). ``energy`` is
    :func:`~lowrank_fed.llm.client.update_prefix_energy`'s ``[e_1, .., e_r]``. The share is about 1 when
    the prefix holds the whole update, ``t / r`` when every slot carries the same, orthogonal, part. It
    can exceed 1 when the prefix's and the tail's updates partly cancel.

    Returns
    -------
    dict or None
        ``{str(t): share_t}`` in ascending ``t`` (empty for a client of the smallest rank; each value None
        when the update is zero); None when ``energy`` is None.

    Examples
    --------
    >>> prefix_shares([1.0, 3.0, 3.5, 4.0], [2, 4, 8])
    {'2': 0.75}
    >>> prefix_shares([1.0, 2.0], [2]), prefix_shares([0.0, 0.0, 0.0], [1, 2]), prefix_shares(None, [1])
    ({}, {'1': None, '2': None}, None)
    """
    if energy is None:
        return None
    r, total = len(energy), float(energy[-1]) if len(energy) else 0.0
    levels = sorted({int(t) for t in ladder if 1 <= int(t) < r})
    return {str(t): (float(energy[t - 1]) / total if total > 0.0 else None) for t in levels}


class PrefixMask(Hook):
    r"""Mask the slots ``i >= tau`` of the active adapter in every forward pass (``tau = None``: none).

    Parameters
    ----------
    workspace : AdapterWorkspace
        With the adapter to train active.
    truncations : sequence of int
        The values ``tau`` may take; the masks are built once for these.
    hold : bool
        Whether an optimiser step taken while ``tau`` is set leaves the slots ``i >= tau`` untouched,
        parameters and optimiser state (module docstring); default True. False gives the optimiser's own
        step (which moves them through momentum and weight decay), for comparison.

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

    def __init__(self, workspace, truncations: Sequence[int], *, hold: bool = True):
        self.truncations = tuple(sorted({int(t) for t in truncations}))
        if not self.truncations or self.truncations[0] < 1:
            raise ValueError(f"The 'truncations' parameter must hold positive ints. Got {list(truncations)}.")
        from ..peft_bridge import lora_layers  # here, so that importing the loop does not import PEFT

        self.tau: int | None = None
        self.hold = bool(hold)
        self._handles = []
        self._factors = []  # (rank, [(lora_B.weight, slot axis 1), (lora_A.weight, slot axis 0)]) per layer
        self._held: list = []  # what before_step saved, for after_step
        self._optimizer = None
        adapter = workspace.active
        layers = {name: layer for name, layer in lora_layers(workspace.peft).items() if adapter in layer.lora_A}
        for name, layer in layers.items():  # every layer checked before any hook is registered
            variant = adapter in getattr(layer, "lora_variant", {})
            if layer.merged or variant or not isinstance(layer.lora_A[adapter], torch.nn.Linear):
                raise ValueError(f"Module {name!r}: only unmerged vanilla LoRA Linear layers can be truncated.")
        for layer in layers.values():
            lora_A = layer.lora_A[adapter]
            rank, device = lora_A.out_features, lora_A.weight.device
            self._factors.append((rank, [(layer.lora_B[adapter].weight, 1), (lora_A.weight, 0)]))
            drops = {t: torch.arange(rank, device=device) >= t for t in self.truncations if t < rank}
            self._handles.append(lora_A.register_forward_hook(self._masker(drops)))

    def _masker(self, drops: Mapping[int, torch.Tensor]):
        def hook(module, args, output):
            drop = drops.get(self.tau)
            return None if drop is None else output.masked_fill(drop, 0.0)

        return hook

    def before_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Save the slots ``i >= tau`` of every masked layer, parameters and optimiser state (``hold``)."""
        self._held, self._optimizer = [], optimizer
        if not self.hold or self.tau is None:
            return
        tau = self.tau
        for rank, params in self._factors:
            if tau >= rank:
                continue
            for param, axis in params:
                state = optimizer.state.get(param, {})
                saved = {key: value.narrow(axis, tau, rank - tau).clone() for key, value in state.items()
                         if torch.is_tensor(value) and value.shape == param.shape}
                self._held.append((param, axis, tau, rank - tau, param.detach().narrow(axis, tau, rank - tau).clone(),
                                   saved))

    def after_step(self, step: int) -> None:
        """Write the saved slots back; optimiser state created by this step gets zeros there (its initial value)."""
        if not self._held:
            return
        with torch.no_grad():
            for param, axis, start, length, values, saved in self._held:
                param.narrow(axis, start, length).copy_(values)
                for key, value in self._optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        part = value.narrow(axis, start, length)
                        if key in saved:
                            part.copy_(saved[key])
                        else:
                            part.zero_()
        self._held = []

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.tau, self._held, self._optimizer = [], None, [], None


class SampledTruncation(PrefixMask):
    r"""One truncation per batch, ``tau ~ Uniform(T)`` drawn from ``generator`` before each forward pass.

    Parameters
    ----------
    workspace : AdapterWorkspace
    truncations : sequence of int
        ``T`` (PreLort: :func:`truncation_set`).
    generator : torch.Generator
        The client's round generator; the same seed gives the same ``taus``.
    hold : bool
        The step leaves the slots ``i >= tau`` untouched (default; see :class:`PrefixMask`).

    Attributes
    ----------
    taus : list of int
        The truncation of every step so far, in order.
    """

    def __init__(self, workspace, truncations: Sequence[int], generator: torch.Generator, *, hold: bool = True):
        super().__init__(workspace, truncations, hold=hold)
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
