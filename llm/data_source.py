r"""A run's data source (:class:`DataSource`): a packaged data set or the user's data file, row by row.

The server's and every node's handle on the data of a run without ``[[clients]]`` (those are in :mod:`.sites`):
the catalogue of labels for the partition (:func:`~lowrank_fed.llm.federation.plan_rows`) and the examples of the
rows asked for, nothing more. Imported by :mod:`.federation`, which re-exports every name.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .config import ConfigError, RunConfig
from .data import TextDataset, load_dataset
from .data.files import USER_DATA, DataFileError, load_data_file
from .data.instructions import count_truncated
from .sources import is_packaged_dataset, model_task
from .streams import EVAL_SUBSET, TRAIN_SUBSET

__all__ = ["DataSource", "config_key", "is_user_data", "truncation_counts"]


@contextlib.contextmanager
def config_key(key: str, value):
    """Turn a ``ValueError`` of the data or model set-up into a :class:`ConfigError` naming ``key``."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError.from_errors([(key, f"a value this data and model allow ({err})", value)]) from err


class DataSource:
    r"""A run's data set, row by row: the label of every training row for anyone, an example only on request.

    The training rows are those of ``load_dataset(cfg.dataset, seed=cfg.seed)``'s training split (a data file or
    folder: :func:`~lowrank_fed.llm.data.files.load_data_file` for the model's task), after the
    ``train_size`` draw (stream ``TRAIN_SUBSET``); the test rows are the test split after the ``eval_size`` draw
    (``EVAL_SUBSET``). :attr:`labels` (the catalogue: a class, or a topic for generation) is what the partition
    needs; :meth:`examples` is the one way the set-up reads a training example's text, label and target. A client
    calls it once, with its own rows; tests count the rows it hands out.

    BBC News is one file per article, and only the files of the rows asked for are opened (``bbc_news``: a node
    opens its own articles, no other). The other packaged sets are single files (20 Newsgroups' ``.tab``) or
    generated from the seed, which the loader parses or generates whole; the rows a node does not hold are
    never handed out, encoded or trained on.
    """

    def __init__(self, cfg: RunConfig):
        train, test = load_dataset(cfg.dataset, seed=cfg.seed) if is_packaged_dataset(cfg.dataset) \
            else _read_data_file(cfg)
        if cfg.train_size and cfg.train_size < len(train):
            train = train.subset(np.sort(TRAIN_SUBSET.rng(cfg.seed).permutation(len(train))[: cfg.train_size]))
        if cfg.eval_size < len(test):
            test = test.subset(np.sort(EVAL_SUBSET.rng(cfg.seed).permutation(len(test))[: cfg.eval_size]))
        self._train, self.test = train, test
        self.labels = train.labels.copy()
        self.label_names = tuple(train.label_names)
        self.task = train.task
        self.has_other_targets = train.other_targets is not None

    def __len__(self) -> int:
        return len(self._train)

    def examples(self, rows) -> TextDataset:
        """The training examples of ``rows`` (positions in ``0 .. len(self) - 1``), in that order, read now."""
        out = self._train.subset(rows)
        out.texts = list(out.texts)  # BBC News: only these articles' files are opened
        return out


def _read_data_file(cfg: RunConfig) -> tuple[TextDataset, TextDataset]:
    """``(train, test)`` of the data file ``cfg.dataset``; a problem of the file is a :class:`ConfigError` (one line
    naming the file, the row and the column)."""
    with config_key("task", cfg.task):
        task = model_task(cfg.model, cfg.task)
    try:
        return load_data_file(cfg.dataset, task, cfg)
    except DataFileError as err:
        raise ConfigError(str(err)) from err


def is_user_data(examples: TextDataset) -> bool:
    """Whether ``examples`` come from a user's data file (:data:`~lowrank_fed.llm.data.files.USER_DATA`)."""
    return examples.meta.get("source") == USER_DATA["source"]


def truncation_counts(tokenizer, splits: dict[str, TextDataset], max_length: int) -> dict[str, int] | None:
    """A user's generation data: how many examples of each split the instruction encoding truncates
    (:func:`~lowrank_fed.llm.data.instructions.count_truncated`); None for other data."""
    if not any(d.task == "generation" and is_user_data(d) for d in splits.values()):
        return None
    return {name: count_truncated(tokenizer, d, max_length) if len(d) else 0 for name, d in splits.items()}
