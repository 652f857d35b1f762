r"""The user's own data: a JSONL, JSON, CSV or Parquet file, or a ``datasets`` ``save_to_disk`` folder.

Read through the ``datasets`` library (:func:`read_table`), then turned into the torch layer's one data type,
:class:`~.texts.TextDataset` (:func:`to_text_dataset`), with the run's column names:

- **classification**: ``text_column`` (the input) and ``label_column`` (a string or an integer per row). The label
  set is fixed before training: the config's ``labels``, else the sorted union of every source's labels
  (:func:`label_set`); a row whose label is outside it is an error naming the file, the row and the label.
- **generation** (instruction tuning): ``prompt_column`` and ``response_column`` (``texts`` are the prompts,
  ``targets`` the responses), or ``messages_column``: a list of ``{role, content}`` turns per row, the **last
  assistant turn** the response and the turns before it the prompt (kept as :attr:`~.texts.TextDataset.turns` for
  the tokenizer's chat template; ``texts`` is their plain rendering ``"role: content"``, one line per turn).

A user's data set is marked ``meta["source"] == "file"`` (:data:`USER_DATA`), so
:func:`~lowrank_fed.llm.federation.encode_examples` encodes it with :func:`~.instructions.encode_instructions`
instead of the packaged ``"Article: ... Headline:"`` prompt. :func:`load_data_file` gives a run's ``(train,
test)``: a ``DatasetDict`` folder's ``train`` and ``test`` splits, else a split stratified by label with
``test_fraction`` (stream ``DATA_SPLIT``, as :func:`~.loaders.load_dataset` splits BBC News).
:func:`data_label_set` is the label set of several sources (the union of their labels, or the config's).

Every problem is a :class:`DataFileError` (a ``ValueError``) naming the file, the column and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..packages import cache_dir
from ..sources import DATA_SUFFIXES, data_problem
from ..streams import DATA_SPLIT
from .partitions import stratified_split
from .texts import TextDataset

__all__ = ["DataFileError", "USER_DATA", "read_table", "label_set", "to_text_dataset", "read_data", "load_data_file",
           "data_label_set", "label_values", "split_rows"]

#: ``TextDataset.meta`` of a user's data set (read from a file): picks the instruction encoder for generation.
USER_DATA = {"source": "file"}

#: The columns each task reads (config keys), for the message of a file that fits the other task.
_TASK_COLUMNS = {"classification": ("text_column", "label_column"),
                 "generation": ("prompt_column", "response_column")}


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
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors are logged too: one line only
    try:
        if path.is_dir():
            table = datasets.load_from_disk(str(path))
        else:
            builder = DATA_SUFFIXES[path.suffix.lower()]
            table = datasets.load_dataset(builder, data_files=str(path), split="train",
                                          cache_dir=str(cache_dir() / "datasets"))
    except Exception as err:  # the library's parse errors have many types; the innermost cause says what
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        why = " ".join(f"{type(cause).__name__}: {cause}".split())
        raise DataFileError(f"Data {str(path)!r}: expected a readable {path.suffix or 'save_to_disk'} data source; "
                            f"reading it failed: {why[:300]}") from err
    finally:
        datasets.logging.set_verbosity(verbosity)
    sizes = {name: len(t) for name, t in table.items()} if isinstance(table, datasets.DatasetDict) else {"": len(table)}
    if not any(sizes.values()):
        raise DataFileError(f"Data {str(path)!r}: expected rows; it holds none.")
    return table


def _column(table, column: str, key: str, path: str, cfg=None, task: str | None = None) -> list:
    if column not in table.column_names:
        hint = ""
        if cfg is not None and task is not None:
            other = "generation" if task == "classification" else "classification"
            cols = [getattr(cfg, k) for k in _TASK_COLUMNS[other]]
            if other == "generation" and cfg.messages_column:
                cols = [cfg.messages_column]
            if all(c in table.column_names for c in cols):
                hint = (f" (it has the {other} columns {cols}, but the model's task is {task}: a {other} file "
                        f"does not fit this model)")
        raise DataFileError(f"Data {path!r}: expected a column {column!r} (config key {key!r}) for the "
                            f"{task + ' ' if task else ''}task; its columns are {table.column_names}{hint}.")
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


def to_text_dataset(table, task: str, cfg, *, path: str, labels: Sequence[str] | None = None,
                    row_offset: int = 0) -> TextDataset:
    r"""A ``datasets.Dataset``'s rows as a :class:`TextDataset` of ``task``, with ``cfg``'s column names.

    ``labels``: the run's label set (:func:`label_set`); None for this table's own. For generation, ``labels`` of
    the result are all 0 (one group, for the partition). ``row_offset`` is added to the row numbers in messages
    (a split after others). The result is marked :data:`USER_DATA`.

    Raises
    ------
    DataFileError
        A column missing (with a note when the file has the other task's columns), an empty or non-string text, a
        label outside ``labels``, or a ``messages`` value that is not a list of ``{role, content}`` tables ending
        in an assistant turn.
    """
    if task == "classification":
        texts = _column(table, cfg.text_column, "text_column", path, cfg, task)
        raw = _column(table, cfg.label_column, "label_column", path, cfg, task)
        names = label_set(_label_values(raw, cfg.label_column, path, row_offset)) if labels is None else list(labels)
        index = {name: i for i, name in enumerate(names)}
        ids = []
        for row, value in enumerate(raw):
            key = _label_key(value, cfg.label_column, path, row + row_offset)
            if key not in index:
                raise DataFileError(f"Data {path!r}, row {row + row_offset}, column {cfg.label_column!r}: expected a "
                                    f"label of the run's label set {names}; got {value!r}.")
            ids.append(index[key])
        _check_texts(texts, cfg.text_column, path, row_offset)
        return TextDataset([str(t) for t in texts], np.asarray(ids, dtype=np.int64), names, meta=dict(USER_DATA))
    turns = None
    if cfg.messages_column:
        conversations = _column(table, cfg.messages_column, "messages_column", path, cfg, task)
        turns, responses = [], []
        for row, value in enumerate(conversations):
            before, response = _split_messages(value, cfg.messages_column, path, row + row_offset)
            turns.append(before)
            responses.append(response)
        prompts = [render_turns(t) for t in turns]
    else:
        prompts = _column(table, cfg.prompt_column, "prompt_column", path, cfg, task)
        responses = _column(table, cfg.response_column, "response_column", path, cfg, task)
        _check_texts(prompts, cfg.prompt_column, path, row_offset)
        _check_texts(responses, cfg.response_column, path, row_offset)
    return TextDataset(list(prompts), np.zeros(len(prompts), dtype=np.int64), ["all"], list(responses),
                       "generation", dict(USER_DATA), turns=turns)


def render_turns(turns: Sequence[dict]) -> str:
    r"""The plain text of chat turns (no chat template): ``"role: content"``, one line per turn."""
    return "\n".join(f"{t['role']}: {t['content']}" for t in turns)


def _split_messages(value, column: str, path: str, row: int) -> tuple[list[dict], str]:
    """``(turns before the last assistant turn, that turn's content)`` of one ``messages`` value."""
    where = f"Data {path!r}, row {row}, column {column!r}"
    if not isinstance(value, (list, tuple)) or not value:
        raise DataFileError(f"{where}: expected a non-empty list of {{role, content}} tables; got {_show(value)}.")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                or not isinstance(turn.get("content"), str) or not turn["content"].strip():
            raise DataFileError(f"{where}, turn {i}: expected a table with a string 'role' and a non-empty string "
                                f"'content'; got {_show(turn)}.")
        turns.append({"role": turn["role"], "content": turn["content"]})
    last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise DataFileError(f"{where}: expected an assistant turn (the response) after at least one other turn; got "
                            f"roles {[t['role'] for t in turns]}.")
    return turns[:last], turns[last]["content"]


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _label_key(value, column: str, path: str, row: int) -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int, np.integer)) \
            or (isinstance(value, str) and not value.strip()):
        raise DataFileError(f"Data {path!r}, row {row}, column {column!r}: expected a label (a non-empty string or an "
                            f"integer); got {value!r}.")
    return str(value)


def _label_values(raw, column: str, path: str, row_offset: int = 0) -> list:
    for row, value in enumerate(raw):
        _label_key(value, column, path, row + row_offset)
    return list(raw)


def _check_texts(values, column: str, path: str, row_offset: int = 0) -> None:
    for row, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise DataFileError(f"Data {path!r}, row {row + row_offset}, column {column!r}: expected a non-empty "
                                f"string; got {_show(value)}.")


def _splits(table) -> list[tuple[str, object]]:
    """``[(split name, Dataset)]``: one ``("", table)`` for a ``Dataset``; a ``DatasetDict``'s splits in order."""
    import datasets

    if isinstance(table, datasets.DatasetDict):
        return list(table.items())
    return [("", table)]


def _where(path_text: str, split: str) -> str:
    return f"{path_text}[{split}]" if split else path_text


def read_data(path_text: str, task: str, cfg, *, labels: Sequence[str] | None = None) -> TextDataset:
    """:func:`read_table` then :func:`to_text_dataset` (a ``DatasetDict``'s splits concatenated in order)."""
    import datasets

    table = read_table(path_text)
    if isinstance(table, datasets.DatasetDict):
        table = datasets.concatenate_datasets([table[s] for s in table])
    return to_text_dataset(table, task, cfg, path=path_text, labels=labels)


def data_label_set(paths: Sequence[str], cfg) -> list[str]:
    r"""The label set of a classification run over the data sources ``paths``: the config's ``labels`` when not
    empty, else the sorted union (:func:`label_set`) of every source's labels (every split of a ``DatasetDict``
    folder). Only the label column is read.

    Raises
    ------
    DataFileError
        A source that cannot be read, lacks the label column, or holds a value that is no label.
    """
    if cfg.labels:
        return label_set((), cfg.labels)
    return label_set([v for path in paths for v in label_values(path, cfg)])


def label_values(path: str, cfg, table=None) -> list:
    """The values of ``label_column`` in the data source ``path`` (every split of a ``DatasetDict``, in order), each
    checked to be a label (a non-empty string or an integer); what :func:`label_set` takes the union of. ``table``:
    the source already read (:func:`read_table`), else it is read here.

    Raises
    ------
    DataFileError
        A source that cannot be read, lacks the label column, or holds a value that is no label.
    """
    table = read_table(path) if table is None else table
    values: list = []
    for split, part in _splits(table):
        raw = _column(part, cfg.label_column, "label_column", _where(path, split), cfg, "classification")
        values += _label_values(raw, cfg.label_column, _where(path, split))
    return values


def split_rows(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r"""``(train, test)`` rows of a source without a test split: ``round(test_fraction * n_c)`` test rows of each
    label ``c`` (:func:`~.partitions.stratified_split`, stream ``DATA_SPLIT``; generation: one group)."""

    return stratified_split(np.asarray(labels), test_fraction, DATA_SPLIT.rng(seed))


def load_data_file(path_text: str, task: str, cfg, *, labels: Sequence[str] | None = None
                   ) -> tuple[TextDataset, TextDataset]:
    r"""``(train, test)`` of a user's data source for a run of ``task`` with config ``cfg``.

    A ``DatasetDict`` folder with ``train`` and ``test`` splits gives them (each read as is); any other source
    (a file, a single ``Dataset`` folder, a ``DatasetDict`` without both splits: its splits concatenated) is split
    by :func:`split_rows` with ``cfg.test_fraction`` and ``cfg.seed``. Classification labels: ``labels`` (default
    :func:`data_label_set` of this source).

    Raises
    ------
    DataFileError
        Anything :func:`read_table`, :func:`to_text_dataset` or :func:`data_label_set` refuses, or a split with
        too few rows (an empty training or test split).
    """
    import datasets

    table = read_table(path_text)
    if task == "classification" and labels is None:
        labels = label_set(label_values(path_text, cfg, table), cfg.labels)
    parts = dict(_splits(table))
    if isinstance(table, datasets.DatasetDict) and {"train", "test"} <= set(parts):
        train = to_text_dataset(parts["train"], task, cfg, path=_where(path_text, "train"), labels=labels)
        test = to_text_dataset(parts["test"], task, cfg, path=_where(path_text, "test"), labels=labels)
    else:
        if isinstance(table, datasets.DatasetDict):
            table = datasets.concatenate_datasets([part for part in parts.values()])
        full = to_text_dataset(table, task, cfg, path=path_text, labels=labels)
        train_rows, test_rows = split_rows(full.labels, cfg.test_fraction, cfg.seed)
        train, test = full.subset(train_rows), full.subset(test_rows)
    for name, part in (("training", train), ("test", test)):
        if not len(part):
            raise DataFileError(f"Data {path_text!r}: expected rows in its {name} split (test_fraction "
                                f"{cfg.test_fraction} of {len(train) + len(test)} rows); it has none.")
    return train, test
