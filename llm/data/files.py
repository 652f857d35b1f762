r"""The user's own data: a JSONL, JSON, CSV or Parquet file, or a ``datasets`` ``save_to_disk`` folder.

Read through the ``datasets`` library (:func:`read_table`), then turned into the torch layer's one data type,
:class:`~.texts.TextDataset` (:func:`to_text_dataset`), with the run's column names:

- **classification**: ``text_column`` (the input) and ``label_column`` (a string or an integer per row). The label
  set is fixed before training: the config's ``labels``, else the sorted union of every source's labels
  (:func:`label_set`); a row whose label is outside it is an error naming the file, the row and the label.
- **generation**: ``prompt_column`` and ``response_column`` (``texts`` are the prompts, ``targets`` the responses).

Every problem is a :class:`DataFileError` (a ``ValueError``) naming the file, the column and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..packages import cache_dir
from ..sources import DATA_SUFFIXES, data_problem
from .texts import TextDataset

__all__ = ["DataFileError", "read_table", "label_set", "to_text_dataset", "read_data"]


class DataFileError(ValueError):
    """A user's data file that cannot be read as the run's data (the message names the file and the column)."""


def read_table(path_text: str):
    r"""The rows of a data file or ``save_to_disk`` folder as a ``datasets.Dataset`` or ``DatasetDict``.

    A file's format comes from its suffix (:data:`~lowrank_fed.llm.sources.DATA_SUFFIXES`); a folder is read with
    ``datasets.load_from_disk`` (a ``DatasetDict`` keeps its splits). The library's cache is under
    :func:`~lowrank_fed.llm.packages.cache_dir` (never next to the user's file).

    Raises
    ------
    DataFileError
        The path does not name a readable data source, or it holds no rows.
    """
    problem = data_problem(path_text)
    if problem is not None:
        raise DataFileError(f"Data {path_text!r}: expected {problem}.")
    import datasets

    datasets.disable_progress_bars()
    path = Path(path_text).expanduser()
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
        else:
            builder = DATA_SUFFIXES[path.suffix.lower()]
            table = datasets.load_dataset(builder, data_files=str(path), split="train",
                                          cache_dir=str(cache_dir() / "datasets"))
    except Exception as err:  # the library's parse errors have many types; the message says which
        raise DataFileError(f"Data {str(path)!r}: expected a readable {path.suffix or 'save_to_disk'} data source; "
                            f"reading it failed: {type(err).__name__}: {err}") from err
    sizes = {name: len(t) for name, t in table.items()} if isinstance(table, datasets.DatasetDict) else {"": len(table)}
    if not any(sizes.values()):
        raise DataFileError(f"Data {str(path)!r}: expected rows; it holds none.")
    return table


def _column(table, column: str, key: str, path: str) -> list:
    if column not in table.column_names:
        raise DataFileError(f"Data {path!r}: expected a column {column!r} (config key {key!r}); its columns are "
                            f"{table.column_names}.")
    return list(table[column])


def label_set(values: Sequence, given: Sequence[str] = ()) -> list[str]:
    r"""The label names of a classification run: ``given`` (the config's ``labels``) when not empty, else the sorted
    union of ``values`` (as strings; integers sort numerically)."""
    if given:
        return [str(v) for v in given]
    unique = set(values)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in unique):
        return [str(v) for v in sorted(int(v) for v in unique)]
    return sorted(str(v) for v in unique)


def to_text_dataset(table, task: str, cfg, *, path: str, labels: Sequence[str] | None = None) -> TextDataset:
    r"""A ``datasets.Dataset``'s rows as a :class:`TextDataset` of ``task``, with ``cfg``'s column names.

    ``labels``: the run's label set (:func:`label_set`); None for this table's own. For generation, ``labels`` of
    the result are all 0 (one group, for the partition).

    Raises
    ------
    DataFileError
        A column missing, an empty or non-string text, or a label outside ``labels``.
    """
    if task == "classification":
        texts = _column(table, cfg.text_column, "text_column", path)
        raw = _column(table, cfg.label_column, "label_column", path)
        names = label_set(raw) if labels is None else list(labels)
        index = {name: i for i, name in enumerate(names)}
        ids = []
        for row, value in enumerate(raw):
            key = str(value)
            if key not in index:
                raise DataFileError(f"Data {path!r}, row {row}, column {cfg.label_column!r}: expected a label of the "
                                    f"run's label set {names}; got {value!r}.")
            ids.append(index[key])
        _check_texts(texts, cfg.text_column, path)
        return TextDataset([str(t) for t in texts], np.asarray(ids, dtype=np.int64), names)
    prompts = _column(table, cfg.prompt_column, "prompt_column", path)
    responses = _column(table, cfg.response_column, "response_column", path)
    _check_texts(prompts, cfg.prompt_column, path)
    _check_texts(responses, cfg.response_column, path)
    return TextDataset(list(prompts), np.zeros(len(prompts), dtype=np.int64), ["all"], list(responses),
                       "generation")


def _check_texts(values, column: str, path: str) -> None:
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise DataFileError(f"Data {path!r}, row {row}, column {column!r}: expected a non-empty string; got "
                                f"{value!r}.")


def read_data(path_text: str, task: str, cfg, *, labels: Sequence[str] | None = None) -> TextDataset:
    """:func:`read_table` then :func:`to_text_dataset` (a ``DatasetDict``'s splits concatenated in order)."""
    import datasets

    table = read_table(path_text)
    if isinstance(table, datasets.DatasetDict):
        table = datasets.concatenate_datasets([table[s] for s in table])
    return to_text_dataset(table, task, cfg, path=path_text, labels=labels)
