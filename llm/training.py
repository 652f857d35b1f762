r"""Local training: one client's steps on the active adapter, and the HetLoRA tail regulariser.

The loop is a plain PEFT training loop (forward, loss, backward, optimiser step) on a list of
parameters chosen by the method's client policy (FFA-LoRA freezes ``A``); an optional
regulariser is added to the loss, computed on the live adapter tensors so that it has a gradient.
Nothing else runs per step, which keeps the throughput that of the plain loop
(``benchmarks/bench_llm.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from lowrank_fed import FactorPair

__all__ = ["TrainStats", "train_local", "make_optimizer", "tail_norm_product", "client_batches"]


@dataclass
class TrainStats:
    """What a client reports about its local training."""

    steps: int
    examples: int
    loss: float
    accuracy: float | None
    seconds: float


def make_optimizer(params: list[torch.nn.Parameter], *, name: str = "adamw", lr: float = 1e-3,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """A fresh optimiser for one client round (``"adamw"`` or ``"sgd"``)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"Unknown optimizer {name!r}; expected 'adamw' or 'sgd'.")


def client_batches(n_examples: int, steps: int, batch_size: int, rng) -> list:
    r"""Index batches for ``steps`` local steps: passes over a fresh permutation, concatenated.

    ``rng`` is a NumPy Generator; the same seed gives the same batches.
    """
    if n_examples < 1:
        raise ValueError("A client needs at least one example.")
    need = steps * batch_size
    order = []
    while len(order) < need:
        order.extend(rng.permutation(n_examples).tolist())
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def train_local(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    params: list[torch.nn.Parameter],
    *,
    lr: float = 1e-3,
    optimizer: str = "adamw",
    weight_decay: float = 0.0,
    regularizer: Callable[[], torch.Tensor] | None = None,
    max_grad_norm: float | None = None,
) -> TrainStats:
    r"""Train ``params`` of ``model`` on ``batches`` (one optimiser step per batch).

    Loss per step: the model's own loss (cross-entropy for classification, next-token loss on
    the labelled tokens for causal LM) ``+ regularizer()`` when given.

    Returns
    -------
    TrainStats
        Mean loss (model loss only) and, for classification, the running accuracy on the batches.
    """
    opt = make_optimizer(params, name=optimizer, lr=lr, weight_decay=weight_decay)
    model.train()
    start = time.perf_counter()
    total_loss, n_steps, n_examples, correct, counted = 0.0, 0, 0, 0, 0
    for batch in batches:
        out = model(**batch)
        loss = out.loss
        full = loss + regularizer() if regularizer is not None else loss
        full.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        labels = batch["labels"]
        n_steps += 1
        n_examples += int(labels.shape[0])
        total_loss += float(loss.detach())
        if labels.ndim == 1:
            correct += int((out.logits.detach().argmax(dim=-1) == labels).sum())
            counted += int(labels.shape[0])
    model.eval()
    return TrainStats(
        steps=n_steps,
        examples=n_examples,
        loss=total_loss / n_steps if n_steps else math.nan,
        accuracy=correct / counted if counted else None,
        seconds=time.perf_counter() - start,
    )


def tail_norm_product(pairs: Mapping[str, FactorPair], t: int | Mapping[str, int]) -> torch.Tensor:
    r"""HetLoRA's tail term ``sum_m ||B_m[:, t:]||_F ||A_m[t:, :]||_F`` (differentiable).

    where ``t`` (per module or one for all) is the first tail slot, ``floor(gamma r_k)``. With live
    pairs (``AdapterWorkspace.extract(live=True)``) the gradient reaches the adapter weights;
    ``B`` is the folded ``s B_peft``.
    """
    total = None
    for name, pair in pairs.items():
        tm = t[name] if isinstance(t, Mapping) else t
        term = torch.linalg.vector_norm(pair.B[:, tm:]) * torch.linalg.vector_norm(pair.A[tm:, :])
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())
