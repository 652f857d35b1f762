r"""Contaminated clients: who they are (``[[attacks]]`` of a run config) and what they do.

A contaminated client is contaminated for the whole run and for every method, so methods face the
same federation. Which clients: the ids an entry names, then ``round(fraction * K)`` (at least one)
of the remaining clients per ``fraction`` entry, drawn from ``(seed, 13)``.

Data attacks: the client trains honestly on wrong data (its rows of the training set change):

- ``label_flip``: ``y -> (y + 1) mod C`` (classification);
- ``shuffle_targets``: the client's labels (or generation targets) permuted among its own examples;
- ``other_task``: another task on the same inputs. Classification: the length class of the text,
  ``y = #{quantiles q_1..q_{C-1} of the training texts' word counts below its word count}``;
  generation: the data set's ``other_targets`` (the copy task's other transformation).

Update attacks: the reply is replaced after honest training (the head stays honest). For each module,
the uploaded factors ``B``, ``A`` (or the one factor or delta a method uploads):

- ``scaled``: ``B -> s B`` (``Delta W -> s Delta W``);
- ``sign_flip``: ``B -> -B`` (``Delta W -> -Delta W``);
- ``random``: ``B, A -> c G_B, G_A ||A||_F / ||G_A||_F``, Gaussian ``G`` from ``(seed, round, client)``,
  ``c`` such that ``||B' A'||_F = s ||B A||_F``;
- ``coordinated``: as ``random`` but ``G`` from ``(seed, round)`` only: every attacker sends the same
  direction (a shared off-subspace attack), each at its own honest norm times ``s``.

``s`` is the entry's ``scale`` (``scaled``: the factor, 5 if absent; ``random``, ``coordinated``: the
norm ratio, 1 if absent).
All randomness derives from ``(seed, round, client)``, so ``--resume`` replays the same attacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .data import TextDataset
from .protocol import Message

__all__ = ["DATA_ATTACKS", "UPDATE_ATTACKS", "attack_counts", "choose_attackers", "poison_dataset", "attack_reply"]

DATA_ATTACKS = ("label_flip", "shuffle_targets", "other_task")
UPDATE_ATTACKS = ("random", "scaled", "sign_flip", "coordinated")


def attack_counts(attacks: Sequence, n_clients: int) -> list[int]:
    """Clients per ``[[attacks]]`` entry: ``len(clients)``, or ``max(1, round(fraction * n_clients))``."""
    return [len(a.clients) if a.clients is not None else max(1, int(round(a.fraction * n_clients))) for a in attacks]


def choose_attackers(attacks: Sequence, n_clients: int, seed: int) -> dict[int, object]:
    r"""``{client id: attack entry}``: named clients first, then each ``fraction`` entry's share of the rest.

    Raises
    ------
    ValueError
        If the entries name a client twice or contaminate every client.
    """
    chosen: dict[int, object] = {}
    for a in attacks:
        for k in a.clients or []:
            if k in chosen or not 0 <= k < n_clients:
                raise ValueError(f"Attack client {k}: expected a distinct id in [0, {n_clients}).")
            chosen[int(k)] = a
    rest = [int(k) for k in np.random.default_rng([seed, 13]).permutation(n_clients) if int(k) not in chosen]
    for a, count in zip(attacks, attack_counts(attacks, n_clients), strict=True):
        if a.clients is None:
            take, rest = rest[:count], rest[count:]
            chosen.update({k: a for k in take})
    if len(chosen) >= n_clients:
        raise ValueError(f"The attacks contaminate {len(chosen)} of {n_clients} clients; at least one must be benign.")
    return dict(sorted(chosen.items()))


def _length_classes(texts: Sequence[str], reference: Sequence[str], n_classes: int) -> np.ndarray:
    """The length class of each text: how many of the reference's word-count quantiles lie below it."""
    counts = np.array([len(t.split()) for t in reference], dtype=np.float64)
    edges = np.quantile(counts, np.arange(1, n_classes) / n_classes)
    return np.searchsorted(edges, np.array([len(t.split()) for t in texts]), side="right").astype(np.int64)


def poison_dataset(train: TextDataset, client_idx: Sequence[np.ndarray], attackers: Mapping[int, object],
                   seed: int) -> TextDataset:
    r"""The training set with each data attacker's rows changed (labels, or targets for generation).

    Raises
    ------
    ValueError
        An attack the task cannot have (``label_flip`` on generation, ``other_task`` on a generation
        data set without ``other_targets``).
    """
    labels = train.labels.copy()
    targets = None if train.targets is None else list(train.targets)
    generation = train.task == "generation"
    for k, attack in attackers.items():
        if attack.kind not in DATA_ATTACKS:
            continue
        rows = np.asarray(client_idx[k], dtype=np.int64)
        if attack.kind == "label_flip":
            if generation:
                raise ValueError("Attack 'label_flip' needs a classification task; use 'shuffle_targets' or "
                                 "'other_task' for generation.")
            labels[rows] = (labels[rows] + 1) % len(train.label_names)
        elif attack.kind == "shuffle_targets":
            perm = rows[np.random.default_rng([seed, 14, k]).permutation(len(rows))]
            if generation:
                for i, j in zip(rows, perm, strict=True):
                    targets[i] = train.targets[j]
            else:
                labels[rows] = train.labels[perm]
        elif generation:
            other = getattr(train, "other_targets", None)
            if other is None:
                raise ValueError("Attack 'other_task' on a generation data set needs its 'other_targets' "
                                 "(the copy task has them); this data set has none.")
            for i in rows:
                targets[i] = other[i]
        else:
            labels[rows] = _length_classes([train.texts[i] for i in rows], train.texts, len(train.label_names))
    out = train.subset(np.arange(len(train)))
    out.labels, out.targets = labels, targets
    return out


def _gaussian_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)


def attack_reply(reply: Message, attack, *, seed: int, round_: int, client: int) -> Message:
    r"""The reply a client with an update attack sends instead of ``reply`` (see the module docstring).

    Acts on the uploaded factors ``lora/<module>/B|A`` and deltas ``delta/<module>/<factor>``; the
    head, indices and scores are left as they are. Returns a new message; ``reply`` is not changed.
    """
    kind = attack.kind
    s = float(attack.scale if attack.scale is not None else (5.0 if kind == "scaled" else 1.0))
    if kind not in UPDATE_ATTACKS:
        return reply
    arrays = dict(reply.arrays)
    modules: dict[str, dict[str, str]] = {}
    for key, t in arrays.items():
        parts = key.split("/")
        if parts[0] in ("lora", "delta") and t.is_floating_point():
            modules.setdefault("/".join(parts[:-1]), {})[parts[-1]] = key
    shared = [seed, 15, round_] if kind == "coordinated" else [seed, 15, round_, client]
    for i, (module, keys) in enumerate(sorted(modules.items())):
        main = keys.get("B", next(iter(keys.values())))  # the factor that carries the attack
        if kind in ("scaled", "sign_flip"):
            arrays[main] = arrays[main] * (s if kind == "scaled" else -1.0)
            continue
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([*shared, i]).generate_state(1)[0]))
        if "B" in keys and "A" in keys:
            B, A = arrays[keys["B"]].double(), arrays[keys["A"]].double()
            GB, GA = _gaussian_like(B, gen).double(), _gaussian_like(A, gen).double()
            GA = GA * (A.norm() / GA.norm().clamp_min(1e-300))
            c = s * (B @ A).norm() / (GB @ GA).norm().clamp_min(1e-300)
            arrays[keys["B"]] = (c * GB).to(B.device, reply.arrays[keys["B"]].dtype)
            arrays[keys["A"]] = GA.to(A.device, reply.arrays[keys["A"]].dtype)
        else:
            T = arrays[main]
            G = _gaussian_like(T, gen)
            arrays[main] = G * (s * T.norm() / G.norm().clamp_min(1e-30))
    return Message(arrays, dict(reply.config), dict(reply.metrics))
