r"""Every random stream of a run, in one table: each is the run's seed (or a seed derived from it) plus a purpose.

A stream's entropy is the list of integers

.. math:: [\,\text{root},\ \text{purpose},\ \text{key}_1, \dots, \text{key}_m\,]

given to ``numpy.random.SeedSequence``: a NumPy ``Generator`` (:meth:`Stream.rng`, ``default_rng(entropy)``) or a
32-bit seed for a torch ``Generator`` (:meth:`Stream.seed`, ``SeedSequence(entropy).generate_state(1)[0]``). The
root is the run's ``seed``, or for a few streams a seed that is itself a stream (:data:`ADAPTER_INIT`'s) or the
``copy-llama`` pretraining seed. Two streams with the same root must never share an entropy list: the purposes
below are distinct except :data:`ATTACKERS` and :data:`BATCHES` (both 13, kept so that existing runs keep their
bytes), which differ in the length of their key and never coincide (see :func:`entropy_overlap`).

``SeedSequence`` reads a list shorter than its 4-word pool as if padded with zeros (``[s, 13]`` and
``[s, 13, 0, 0]`` give the same stream; longer lists are not padded), so the bare seed ``[s]`` (``default_rng(s)``,
:data:`DATA`) is ``[s, 0, 0, 0]``: purpose 0 is reserved for it, and a key that starts with a round (``>= 1``) can
never end in the zeros that would make it equal to a shorter list of the same purpose.

Changing a purpose or a key changes every output that draws from that stream: the numbers are part of the
run's definition, like the config keys.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Stream", "STREAMS", "derive_seed", "entropy_overlap"] + [
    "DATA", "MODEL_INIT", "DATA_SPLIT", "PARTITION", "TRAIN_SUBSET", "EVAL_SUBSET", "ADAPTER_INIT", "RANKS",
    "VALIDATION", "HOLDOUT", "VAL_HOLDOUT", "SAMPLING", "ATTACKERS", "BATCHES", "SHUFFLE_TARGETS",
    "ATTACK_DIRECTION", "SHARED_ATTACK_DIRECTION", "DROPOUT", "CLIENT_FACTORS", "GLOBAL_RANK_PAD",
    "COPY_PRETRAIN_BATCHES", "COPY_PRETRAIN_EVAL", "COPY_PRETRAIN_INIT", "SITE_SPLIT", "SITE_VALIDATION", "SITE_EVAL",
]

_SEED = "seed"
_INIT_SEED = "init_seed"
_PRETRAIN_SEED = "copy-llama pretraining seed"


def derive_seed(*parts: int) -> int:
    """A 32-bit seed derived from integers (``numpy.random.SeedSequence``), e.g. ``(seed, purpose, round, client)``."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass(frozen=True)
class Stream:
    r"""One random stream: ``root`` (whose seed), ``purpose`` (None: the root itself), the names of its ``key``.

    Attributes
    ----------
    name : str
    purpose : int or None
        The second entropy word; None for a stream seeded by the root alone (``default_rng(seed)``,
        ``torch.manual_seed(seed)``).
    key : tuple of str
        What follows the purpose, in order (``("round", "client")``); each call passes one integer per name.
    root : str
        The seed it starts from: the run's ``seed``, ``init_seed`` (:data:`ADAPTER_INIT`'s seed) or the
        ``copy-llama`` pretraining seed.
    kind : str
        ``"numpy"`` (a ``Generator`` from :meth:`rng`) or ``"torch"`` (a 32-bit seed from :meth:`seed`, or the
        root itself for ``torch.manual_seed(root)``).
    doc : str
        What it draws, and where.
    """

    name: str
    purpose: int | None
    key: tuple[str, ...]
    root: str
    kind: str
    doc: str

    def entropy(self, root: int, *key: int) -> list[int]:
        """``[root, purpose, *key]`` (``[root]`` without a purpose).

        Raises
        ------
        ValueError
            One integer per key name is required.
        """
        if len(key) != len(self.key):
            raise ValueError(f"Stream {self.name} takes the key ({', '.join(self.key) or 'nothing'}) after its root; "
                             f"got {len(key)} value(s): {list(key)}.")
        head = [int(root)] if self.purpose is None else [int(root), self.purpose]
        return head + [int(k) for k in key]

    def rng(self, root: int, *key: int) -> np.random.Generator:
        """``numpy.random.default_rng(entropy)``; the bare root (``default_rng(root)``) without a purpose."""
        entropy = self.entropy(root, *key)
        return np.random.default_rng(entropy[0] if self.purpose is None else entropy)

    def seed(self, root: int, *key: int) -> int:
        """A 32-bit seed for a torch ``Generator``: :func:`derive_seed` of the entropy (no purpose: the root itself)."""
        entropy = self.entropy(root, *key)
        return int(entropy[0]) if self.purpose is None else derive_seed(*entropy)


def _s(name, purpose, key, doc, *, root=_SEED, kind="numpy") -> Stream:
    return Stream(name, purpose, tuple(key), root, kind, doc)


#: Synthetic data sets (``synthetic``, ``copy``, ``copy_sub``): their texts, drawn from ``default_rng(seed)``.
DATA = _s("DATA", None, (), "the synthetic data sets' examples (data.make_synthetic, make_copy_task, "
          "make_copy_substitution)")
#: The tiny models' weights and MiniLM's new head: ``torch.manual_seed(seed)`` (models.load_model).
MODEL_INIT = _s("MODEL_INIT", None, (), "the tiny models' weights and MiniLM's classifier head (models.load_model)",
                kind="torch")
#: Train/test split of a data set without an official one (data.load_dataset).
DATA_SPLIT = _s("DATA_SPLIT", 1, (), "the train/test split of sets with no official one (data.load_dataset)")
#: Which client holds which training example (data.partition).
PARTITION = _s("PARTITION", 2, (), "the client partition of the training rows (federation.plan_rows)")
#: The ``train_size`` training rows kept.
TRAIN_SUBSET = _s("TRAIN_SUBSET", 3, (), "the train_size training rows kept (federation.DataSource)")
#: The ``eval_size`` test rows kept.
EVAL_SUBSET = _s("EVAL_SUBSET", 4, (), "the eval_size test rows kept (federation.DataSource)")
#: ``init_seed``: the global adapter's initial factors, and the root of :data:`GLOBAL_RANK_PAD` and FFA's frozen A.
ADAPTER_INIT = _s("ADAPTER_INIT", 5, (), "init_seed: the initial global adapter (peft_bridge.init_pairs), "
                  "FFA's frozen A, root of GLOBAL_RANK_PAD", kind="torch")
#: The shuffle of the rank distributions ``uniform``, ``heavy_tail``, ``normal`` (data.assign_ranks).
RANKS = _s("RANKS", 6, (), "the shuffled rank distributions (data.assign_ranks)")
#: The validation rows held out of the training set (data.split_validation).
VALIDATION = _s("VALIDATION", 7, (), "the val_size validation rows (federation.plan_rows)")
#: Each client's held-out test rows (data.holdout_sets).
HOLDOUT = _s("HOLDOUT", 8, (), "each client's held-out test rows (data.holdout_sets)")
#: Each client's share of the validation rows (data.holdout_sets on the validation split).
VAL_HOLDOUT = _s("VAL_HOLDOUT", 9, (), "each client's share of the validation rows (data.holdout_sets)")
#: The clients of round ``t`` when ``clients_per_round`` is set.
SAMPLING = _s("SAMPLING", 11, ("round",), "the clients sampled in a round (federation.sample_clients)")
#: Which clients a ``fraction`` attack entry contaminates (attacks.choose_attackers).
ATTACKERS = _s("ATTACKERS", 13, (), "the contaminated clients of fraction entries (attacks.choose_attackers)")
#: A client's batch order in a round (client.run_client). Shares 13 with :data:`ATTACKERS`: see the module note.
BATCHES = _s("BATCHES", 13, ("round", "client"), "a client's batch order in a round (client.run_client)")
#: ``shuffle_targets``: the permutation of an attacker's labels or targets (attacks.poison_examples).
SHUFFLE_TARGETS = _s("SHUFFLE_TARGETS", 14, ("client",), "shuffle_targets' permutation (attacks.poison_examples)")
#: ``random``: a module's Gaussian direction, per round, client and module index (attacks.attack_reply).
ATTACK_DIRECTION = _s("ATTACK_DIRECTION", 15, ("round", "client", "module"),
                      "the random attack's Gaussian factors (attacks.attack_reply)", kind="torch")
#: ``coordinated``: the direction every attacker shares, per round and module index (attacks.attack_reply).
SHARED_ATTACK_DIRECTION = _s("SHARED_ATTACK_DIRECTION", 15, ("round", "module"),
                             "the coordinated attack's shared Gaussian factors (attacks.attack_reply)", kind="torch")
#: Dropout during a client's local training (client.run_client).
DROPOUT = _s("DROPOUT", 17, ("round", "client"), "dropout in a client's local training (client.run_client)",
             kind="torch")
#: The generator a method's client plan draws fresh factors from (client.run_client -> Method.client_plan).
CLIENT_FACTORS = _s("CLIENT_FACTORS", 19, ("round", "client"),
                    "fresh factors of a client plan (client.run_client, Method.client_plan)", kind="torch")
#: ``[[clients]]``: a site's held-out rows (``test_fraction`` of each label), keyed by the client id (sites.SiteData).
SITE_SPLIT = _s("SITE_SPLIT", 31, ("client",), "a site's held-out rows of its own data (sites.SiteData)")
#: ``[[clients]]`` without ``dataset``: a site's validation rows among its held-out rows (fedeval.split_held).
SITE_VALIDATION = _s("SITE_VALIDATION", 32, ("client",), "a site's validation rows (fedeval.split_held)")
#: ``[[clients]]`` without ``dataset``: a site's share of ``eval_size`` test rows (fedeval.split_held).
SITE_EVAL = _s("SITE_EVAL", 33, ("client",), "a site's eval_size share of test rows (fedeval.split_held)")
#: LoRA-A2: the rows of A added when the initial adapter is padded to the global rank, from ``init_seed``.
GLOBAL_RANK_PAD = _s("GLOBAL_RANK_PAD", 29, ("rank",), "LoRA-A2's padding rows of A (methods.lora_a2)",
                     root=_INIT_SEED, kind="torch")
#: ``copy-llama``'s pretraining batches (models.pretrain_copy).
COPY_PRETRAIN_BATCHES = _s("COPY_PRETRAIN_BATCHES", 1, (), "copy-llama's pretraining batches (models.pretrain_copy)",
                           root=_PRETRAIN_SEED)
#: ``copy-llama``'s held-out copy texts (models.pretrain_copy).
COPY_PRETRAIN_EVAL = _s("COPY_PRETRAIN_EVAL", 2, (), "copy-llama's held-out texts (models.pretrain_copy)",
                        root=_PRETRAIN_SEED)
#: ``copy-llama``'s initial weights: ``torch.manual_seed(pretraining seed)`` (models.copy_llama).
COPY_PRETRAIN_INIT = _s("COPY_PRETRAIN_INIT", None, (), "copy-llama's initial weights (models.copy_llama)",
                        root=_PRETRAIN_SEED, kind="torch")

#: Every stream, in purpose order.
STREAMS: tuple[Stream, ...] = (
    DATA, MODEL_INIT, DATA_SPLIT, PARTITION, TRAIN_SUBSET, EVAL_SUBSET, ADAPTER_INIT, RANKS, VALIDATION, HOLDOUT,
    VAL_HOLDOUT, SAMPLING, ATTACKERS, BATCHES, SHUFFLE_TARGETS, ATTACK_DIRECTION, SHARED_ATTACK_DIRECTION, DROPOUT,
    CLIENT_FACTORS, GLOBAL_RANK_PAD, SITE_SPLIT, SITE_VALIDATION, SITE_EVAL, COPY_PRETRAIN_BATCHES,
    COPY_PRETRAIN_EVAL, COPY_PRETRAIN_INIT,
)


def _padded(entropy: list[int]) -> tuple[int, ...]:
    """The words ``SeedSequence`` mixes: a list shorter than its 4-word pool reads as padded with zeros."""
    return tuple(entropy) + (0,) * max(4 - len(entropy), 0)


def entropy_overlap(a: Stream, b: Stream, values: range = range(0, 4), rounds: range = range(1, 4)) -> list[tuple]:
    r"""Keys on which streams ``a`` and ``b`` (same root, same kind of generator) would draw the same numbers.

    Enumerates ``root`` and every key in ``values`` (a ``round`` in ``rounds``: rounds start at 1) and compares the
    words ``SeedSequence`` mixes (short lists zero-padded to 4). Returns the colliding ``(entropy_a, entropy_b)``
    pairs; empty when the streams are disjoint on that grid. A torch stream seeded by the bare root
    (``torch.manual_seed(seed)``) does not go through ``SeedSequence`` and overlaps no other stream here.
    """
    import itertools

    def keys(s: Stream):
        grids = [rounds if name == "round" else values for name in s.key]
        for root in values:
            for key in itertools.product(*grids):
                yield s.entropy(root, *key)

    def hashed(s: Stream) -> bool:
        return s.purpose is not None or s.kind == "numpy"

    if a.root != b.root or not (hashed(a) and hashed(b)):
        return []
    seen = {}
    for e in keys(a):
        seen.setdefault(_padded(e), e)
    return [(seen[_padded(e)], e) for e in keys(b) if _padded(e) in seen]
