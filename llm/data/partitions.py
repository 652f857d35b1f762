r"""Splits of index sets: train/test and validation hold-outs, client partitions, per-client held-out sets.

Partitioners return one sorted int64 index array per client; every split draws from the generator it is given.
"""

from __future__ import annotations

import numpy as np

__all__ = ["stratified_split", "split_validation", "holdout_sets", "partition", "partition_iid", "partition_dirichlet",
           "partition_pathological"]


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


def _allocate(counts, n: int) -> np.ndarray:
    """Largest-remainder allocation of ``n`` items in proportion to ``counts`` (ties to the first)."""
    share = np.asarray(counts, dtype=np.float64) / np.sum(counts) * n
    out = np.floor(share).astype(int)
    order = np.argsort(-(share - out), kind="stable")
    out[order[: n - out.sum()]] += 1
    return out
