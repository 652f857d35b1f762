r"""Contaminated clients: who they are (``[[attacks]]`` of a run config) and what they do.

A contaminated client is contaminated for the whole run and for every method, so methods face the
same federation. Which clients: the ids an entry names, then ``round(fraction * K)`` (at least one)
of the remaining clients per ``fraction`` entry, drawn from the stream ``ATTACKERS`` (``(seed, 13)``,
:mod:`.streams`): a function of the ids and the seed only, so a node knows whether it is contaminated without
reading anyone's data.

Data attacks: the client trains honestly on wrong data (its own rows change, :func:`poison_examples`):

- ``label_flip``: ``y -> (y + 1) mod C`` (classification);
- ``shuffle_targets``: the client's labels (or generation targets) permuted among its own examples;
- ``other_task``: another task on the same inputs. Classification: the length class of the text,
  ``y = #{quantiles q_1..q_{C-1} of the training texts' word counts below its word count}`` (the quantiles,
  :func:`length_edges`, are a statistic of every client's texts: in a federation the server computes them and
  sends them to the nodes);
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

When: from the entry's ``from_round`` on (1 if absent: the whole run). Before it the client is honest: it trains
on its own data as it is and its reply is sent as it is; the detection scores of those rounds count it benign
(:func:`attackers_at`). Which clients does not depend on it, and the oracle is told them for the whole run.

All randomness derives from ``(seed, round, client)``, so ``--resume`` replays the same attacks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .catalog import DATA_ATTACKS, UPDATE_ATTACKS, attack_counts
from .data import TextDataset
from .protocol import Message
from .streams import ATTACK_DIRECTION, ATTACKERS, SHARED_ATTACK_DIRECTION, SHUFFLE_TARGETS

__all__ = ["DATA_ATTACKS", "UPDATE_ATTACKS", "attack_counts", "choose_attackers", "attackers_at", "check_data_attack",
           "length_edges", "poison_examples", "poison_dataset", "attack_reply"]

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
    rest = [int(k) for k in ATTACKERS.rng(seed).permutation(n_clients) if int(k) not in chosen]
    for a, count in zip(attacks, attack_counts(attacks, n_clients), strict=True):
        if a.clients is None:
            take, rest = rest[:count], rest[count:]
            chosen.update({k: a for k in take})
    if len(chosen) >= n_clients:
        raise ValueError(f"The attacks contaminate {len(chosen)} of {n_clients} clients; at least one must be benign.")
    return dict(sorted(chosen.items()))


def attackers_at(attackers: Mapping[int, object], round_: int) -> dict[int, object]:
    r"""The clients contaminated in round ``round_``: those of ``attackers`` whose entry's ``from_round <= round_``."""
    return {k: a for k, a in attackers.items() if round_ >= a.from_round}


def length_edges(reference: Sequence[str], n_classes: int) -> np.ndarray:
    """The ``n_classes - 1`` word-count quantiles of ``reference`` that cut texts into ``other_task``'s length classes."""
    counts = np.array([len(t.split()) for t in reference], dtype=np.float64)
    return np.quantile(counts, np.arange(1, n_classes) / n_classes)


def _length_classes(texts: Sequence[str], edges) -> np.ndarray:
    """The length class of each text: how many of the quantiles ``edges`` lie below its word count."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), np.array([len(t.split()) for t in texts]),
                           side="right").astype(np.int64)


def check_data_attack(kind: str, task: str, has_other_targets: bool) -> None:
    r"""Refuse a data attack the task cannot have.

    Raises
    ------
    ValueError
        ``label_flip`` on generation, or ``other_task`` on a generation data set without ``other_targets``.
    """
    if kind == "label_flip" and task == "generation":
        raise ValueError("Attack 'label_flip' needs a classification task; use 'shuffle_targets' or "
                         "'other_task' for generation.")
    if kind == "other_task" and task == "generation" and not has_other_targets:
        raise ValueError("Attack 'other_task' on a generation data set needs its 'other_targets' "
                         "(the copy task has them); this data set has none.")


def poison_examples(examples: TextDataset, attack, *, client: int, seed: int, edges=None) -> TextDataset:
    r"""Client ``client``'s own training examples as its data attack changes them (a copy; other attacks: as given).

    ``examples`` are the client's rows in order; ``shuffle_targets`` permutes them with the stream
    ``SHUFFLE_TARGETS`` of ``(seed, client)``. ``other_task`` on classification needs ``edges``
    (:func:`length_edges` of the whole training set's texts, which the server sends).

    Raises
    ------
    ValueError
        An attack the task cannot have (:func:`check_data_attack`), or ``other_task`` on classification without
        ``edges``.
    """
    if attack.kind not in DATA_ATTACKS:
        return examples
    generation = examples.task == "generation"
    check_data_attack(attack.kind, examples.task, getattr(examples, "other_targets", None) is not None)
    labels = examples.labels.copy()
    targets = None if examples.targets is None else list(examples.targets)
    if attack.kind == "label_flip":
        labels = (labels + 1) % len(examples.label_names)
    elif attack.kind == "shuffle_targets":
        perm = SHUFFLE_TARGETS.rng(seed, client).permutation(len(examples))
        if generation:
            targets = [examples.targets[j] for j in perm]
        else:
            labels = examples.labels[perm]
    elif generation:
        targets = list(examples.other_targets)
    else:
        if edges is None:
            raise ValueError(f"Attack 'other_task' of client {client} needs the length-class edges of the whole "
                             "training set (attacks.length_edges, sent by the server); none were given.")
        labels = _length_classes(examples.texts, edges)
    out = examples.subset(np.arange(len(examples)))
    out.labels, out.targets = labels, targets
    return out


def poison_dataset(train: TextDataset, client_idx: Sequence[np.ndarray], attackers: Mapping[int, object],
                   seed: int) -> TextDataset:
    r"""The training set with each data attacker's rows changed (labels, or targets for generation).

    Each attacker's rows change as :func:`poison_examples` changes them on its own examples.

    Raises
    ------
    ValueError
        An attack the task cannot have (``label_flip`` on generation, ``other_task`` on a generation
        data set without ``other_targets``).
    """
    labels = train.labels.copy()
    targets = None if train.targets is None else list(train.targets)
    edges = None
    for k, attack in attackers.items():
        if attack.kind not in DATA_ATTACKS:
            continue
        rows = np.asarray(client_idx[k], dtype=np.int64)
        if attack.kind == "other_task" and train.task != "generation" and edges is None:
            edges = length_edges(train.texts, len(train.label_names))
        own = poison_examples(train.subset(rows), attack, client=k, seed=seed, edges=edges)
        labels[rows] = own.labels
        if targets is not None:
            for i, t in zip(rows, own.targets, strict=True):
                targets[i] = t
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
    for i, (module, keys) in enumerate(sorted(modules.items())):
        main = keys.get("B", next(iter(keys.values())))  # the factor that carries the attack
        if kind in ("scaled", "sign_flip"):
            arrays[main] = arrays[main] * (s if kind == "scaled" else -1.0)
            continue
        gen = torch.Generator().manual_seed(SHARED_ATTACK_DIRECTION.seed(seed, round_, i) if kind == "coordinated"
                                            else ATTACK_DIRECTION.seed(seed, round_, client, i))
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
