r"""Local training: one client's optimiser steps on the active adapter, with optional hooks.

Per batch ``x`` the step is

.. math:: \mathcal L = \ell(W_0 + s B A; x) + \sum_h \text{penalty}_h,\qquad
          \theta \leftarrow \text{AdamW}(\theta, \nabla_\theta \mathcal L)\ \text{per parameter group}

where ``theta`` are the parameter groups a method trains (``A``, ``B``, the head) each with its own
learning rate (LoRA-A2 trains ``B`` at ``5 eta_A``), and each hook may add a penalty (HetLoRA's tail
regulariser) or act before the forward pass, after the backward pass, or before and after the optimiser
step (truncation masks, frozen slots, importance scores; PreLort's sampled truncation leaves the slots
outside ``tau`` untouched by the step, optimiser state included); one hook may replace the forward pass itself
(PreLort's mean of the truncated losses, ``(1/|T|) sum_tau l(W_0 + s B_{:tau} A_{:tau}; x)``, from
several passes per batch). With no hooks the loop is a plain PEFT loop,
nothing else per step, so its throughput is that of PEFT itself (``make bench``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..logits import tail_batch
from .hooks import Hook

__all__ = ["TrainStats", "train_local", "make_optimizer", "client_batches"]


@dataclass
class TrainStats:
    """What a client reports about its local training."""

    steps: int
    examples: int
    loss: float
    accuracy: float | None
    seconds: float


def make_optimizer(param_groups: Sequence[dict], *, name: str = "adamw", weight_decay: float = 0.0) -> torch.optim.Optimizer:
    r"""A fresh optimiser for one client round over ``param_groups`` (torch's ``[{"params", "lr"}]``).

    ``name``: ``"adamw"`` or ``"sgd"``.
    """
    if name == "adamw":
        return torch.optim.AdamW(list(param_groups), weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(list(param_groups), lr=param_groups[0]["lr"], weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}; expected 'adamw' or 'sgd'.")


def client_batches(n_examples: int, steps: int, batch_size: int, rng) -> list:
    r"""Index batches for ``steps`` local steps: passes over a fresh permutation, concatenated.

    ``rng`` is a NumPy Generator; the same seed gives the same batches.
    """
    if n_examples < 1:
        raise ValueError("A client needs at least one example. Got 0.")
    need = steps * batch_size
    order: list[int] = []
    while len(order) < need:
        order.extend(rng.permutation(n_examples).tolist())
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def train_local(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    param_groups: Sequence[dict],
    *,
    hooks: Sequence[Hook] = (),
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
) -> TrainStats:
    r"""Train the ``param_groups`` of ``model`` on ``batches``, one optimiser step per batch.

    Parameters
    ----------
    model : torch module returning ``.loss`` and ``.logits``
    batches : iterable of batches (dicts with ``labels``)
    param_groups : list of ``{"params": [...], "lr": float}``
        torch's parameter groups; only these are optimised.
    hooks : sequence of :class:`~lowrank_fed.llm.training.hooks.Hook`
        Called around every step in the order given; empty means the plain loop. At most one may
        override ``forward`` (its output replaces ``model(**batch)`` when it returns one).
    optimizer, weight_decay, max_grad_norm
        AdamW (or SGD) settings; ``max_grad_norm`` clips the global gradient norm.

    Returns
    -------
    TrainStats
        Mean model loss (penalties excluded; a replacing hook's ``.loss``) and, for classification,
        the running accuracy.

    Raises
    ------
    ValueError
        More than one hook overrides ``forward``, or an unknown ``optimizer``.
    """
    replacing = [h for h in hooks if getattr(type(h), "forward", Hook.forward) is not Hook.forward]
    if len(replacing) > 1:
        raise ValueError(f"At most one hook may replace the forward pass. Got {[type(h).__name__ for h in replacing]}.")
    forward = replacing[0].forward if replacing else None
    opt = make_optimizer(param_groups, name=optimizer, weight_decay=weight_decay)
    params = [p for g in param_groups for p in g["params"]]
    model.train()
    start = time.perf_counter()
    total_loss, n_steps, n_examples, correct, counted = 0.0, 0, 0, 0, 0
    for step, batch in enumerate(batches):
        batch = tail_batch(model, batch)  # a causal LM's loss from the logits it reads only (llm/logits.py)
        for h in hooks:
            h.before_forward(step, batch)
        out = forward(step, model, batch) if forward is not None else None
        if out is None:
            out = model(**batch)
        loss = out.loss
        full = loss
        for h in hooks:
            extra = h.penalty(step)
            if extra is not None:
                full = full + extra
        full.backward()
        for h in hooks:
            h.after_backward(step)
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        for h in hooks:
            h.before_step(step, opt)
        opt.step()
        opt.zero_grad(set_to_none=True)
        for h in hooks:
            h.after_step(step)
        labels = batch["labels"]
        n_steps += 1
        n_examples += int(labels.shape[0])
        total_loss += float(loss.detach())
        if labels.ndim == 1:
            correct += int((out.logits.detach().argmax(dim=-1) == labels).sum())
            counted += int(labels.shape[0])
    for h in hooks:
        h.close()
    model.eval()
    return TrainStats(
        steps=n_steps,
        examples=n_examples,
        loss=total_loss / n_steps if n_steps else math.nan,
        accuracy=correct / counted if counted else None,
        seconds=time.perf_counter() - start,
    )
