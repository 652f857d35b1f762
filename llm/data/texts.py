r"""Texts with labels: the one data type of the torch layer (:class:`TextDataset`, :class:`LazyTexts`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TextDataset", "LazyTexts"]


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
    turns : list of (list of {role, content}) or None
        A user's chat data (``messages_column``): each prompt's turns, for the tokenizer's chat template
        (``texts`` holds their plain rendering).
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    targets: list[str] | None = None
    task: str = "classification"
    meta: dict = field(default_factory=dict)
    other_targets: list[str] | None = None
    turns: list[list[dict]] | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "TextDataset":
        idx = np.asarray(idx, dtype=np.int64)
        texts = self.texts.take(idx) if isinstance(self.texts, LazyTexts) else [self.texts[i] for i in idx]
        return TextDataset(
            texts, self.labels[idx], list(self.label_names),
            None if self.targets is None else [self.targets[i] for i in idx], self.task, dict(self.meta),
            None if self.other_targets is None else [self.other_targets[i] for i in idx],
            None if self.turns is None else [self.turns[i] for i in idx],
        )
