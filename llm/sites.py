r"""Data per site: ``[[clients]]`` tables, each client training on its own data source, never partitioned.

A run with ``[[clients]]`` tables (:attr:`RunConfig.sites <lowrank_fed.llm.config.RunConfig.sites>`) has one data
source per client: client ``k`` trains on the rows of ``clients[k].data`` (on Flower, a SuperNode's own
``--node-config data-path``) at rank ``clients[k].rank``. What is computed, and by whom:

- **The label set** ``L`` (classification), fixed before training, the same on the server and every node:
  ``labels`` when the config gives it; else the labels of the server's ``dataset`` file when there is one; else
  (in process only) the sorted union of every site's labels (:func:`~.data.files.label_set`). It travels to the
  nodes in :class:`~.federation.Shared` (``labels``). A site row whose label is outside ``L`` is an error naming
  the file, the row and the label.
- **A site's rows** (:class:`SiteData`): its file read with :func:`~.data.files.read_data`. When ``dataset`` is
  empty, the site holds out ``round(test_fraction * n_c)`` rows of each label ``c`` (stream ``SITE_SPLIT``, keyed
  by the client id; :func:`~.data.partitions.stratified_split`) and trains on the others; with a server
  ``dataset`` it trains on all of its rows. Its data weight is ``weight`` when the table gives one, else its
  number of training rows ``n_k`` (the ``num_examples`` of its reply).
- **The evaluation data**: with a ``dataset`` file, the server's (:class:`SitesSource`): ``val_size`` validation
  rows drawn from its rows (:func:`~.data.partitions.split_validation`, stream ``VALIDATION``), the test set the
  rest, at most ``eval_size`` of them (stream ``EVAL_SUBSET``); client ``k``'s local score (``holdout[k]``) is a
  share of the test set (stream ``HOLDOUT``: the test rows shuffled and cut into ``clients`` near-equal sets),
  since the server knows no site's labels. With an empty ``dataset``, **federated evaluation** (:mod:`.fedeval`):
  each site splits its held-out rows into its own validation and test rows (:func:`~.fedeval.split_held`), scores
  the models on them and sends the per-example scores; the run's validation and test sets are the sites' rows in
  client order, ``holdout[k]`` is site ``k``'s own block.
- **What the server shares** (:class:`~.federation.Shared`): ``labels``; a tiny model's vocabulary and
  ``other_task``'s length classes from the texts the server holds: its ``dataset`` file, else the sites'
  training rows.

In process the runner holds every file (:func:`site_federation` with ``open_sites=True``). On Flower the server
never opens a site's file (``open_sites=False``): the client sizes ``n_k`` are unknown to it (each reply says
its own), and without a ``dataset`` the sites' set sizes come from the sites (an evaluate exchange before the
first round) and their scores from an evaluate message each time a round is scored; such a run needs ``labels``
(classification) and a model with its own tokenizer (:func:`check_flower_sites`). A node builds its own
:class:`NodeSource` from its file alone.

Row layout of :class:`SitesSource` (so that :class:`~.federation.Federation` and :func:`~.federation.build_client`
read it as any data source): rows ``0 .. n_val - 1`` are the validation examples (none on Flower without
``dataset``), rows ``n_val ..`` the sites'
training rows in client order; ``client_idx[k]`` is client ``k``'s block of ``train_rows``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .attacks import DATA_ATTACKS, check_data_attack, choose_attackers, length_edges
from .catalog import DATASETS
from .config import ConfigError, RunConfig
from .data import TextDataset, holdout_sets, split_validation, stratified_split
from .data import files
from .data.files import label_set, read_data
from .federation import DataSource, Federation, Shared, config_key
from .fedeval import federated, site_blocks, split_held
from .models import needs_vocabulary, word_vocabulary
from .sources import data_problem, model_task
from .streams import EVAL_SUBSET, HOLDOUT, SITE_SPLIT, VAL_HOLDOUT, VALIDATION

__all__ = ["SiteData", "SitesSource", "NodeSource", "site_federation", "site_labels", "check_site_paths",
           "check_flower_sites", "site_task", "concat", "open_source", "site_blocks"]


def site_task(cfg: RunConfig) -> str:
    """The run's task: ``task``, the packaged model's, or inferred from the model folder (:func:`.sources.model_task`)."""
    with _key("model", cfg.model):
        return model_task(cfg.model, cfg.task)


class _key:
    """Turn a ``ValueError`` into a :class:`ConfigError` on ``key`` (one line naming the key and the value)."""

    def __init__(self, key: str, value):
        self.key, self.value = key, value

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, ConfigError) or not isinstance(err, ValueError):
            return False
        raise ConfigError.from_errors([(self.key, f"a data source this run can use ({err})", self.value)]) from err


def check_site_paths(cfg: RunConfig, only: Sequence[int] | None = None) -> None:
    r"""Every site's ``data`` (or those in ``only``) names an existing data file or ``save_to_disk`` folder.

    Raises
    ------
    ConfigError
        One line per missing or unreadable source: ``Config key 'clients[i].data': expected ...; got ...``.
    """
    ids = range(len(cfg.sites)) if only is None else only
    errors = [(f"clients[{k}].data", problem, cfg.sites[k].data) for k in ids
              if (problem := data_problem(cfg.sites[k].data)) is not None]
    if errors:
        raise ConfigError.from_errors(errors)


def check_flower_sites(cfg: RunConfig) -> None:
    r"""What a ``[[clients]]`` run without a server ``dataset`` needs on Flower, where the server opens no site's file
    (the sites score the models themselves: :mod:`.fedeval`): the label set ``labels`` (classification), and a
    model with its own tokenizer (a tiny packaged model builds its vocabulary from texts the server holds).

    Raises
    ------
    ConfigError
        ``[[clients]]`` tables with an empty ``dataset`` and, for classification, no ``labels``, or a tiny
        packaged model.
    """
    if not cfg.sites or cfg.dataset:
        return
    errors = []
    if not cfg.labels and site_task(cfg) == "classification":
        errors.append(("labels", (
            "the label set for [[clients]] on Flower without dataset: the server never opens a site's file, so it "
            "cannot take the union of the sites' labels; list them, or set dataset, or run in process"), cfg.labels))
    if needs_vocabulary(cfg.model):
        errors.append(("model", (
            "a model with its own tokenizer (a folder or a hub name) for [[clients]] on Flower without dataset: a "
            "tiny packaged model builds its vocabulary from the server's texts, and this server holds none; set "
            "dataset, or run in process"), cfg.model))
    if errors:  # the first problem: one line
        raise ConfigError.from_errors(errors[:1])


def _check_server_dataset(cfg: RunConfig) -> None:
    if cfg.dataset in DATASETS:
        raise ConfigError.from_errors([("dataset", (
            "with [[clients]] tables: a data file or save_to_disk folder with the run's columns (the server's "
            "evaluation data), or empty (each site holds out test_fraction of its rows); a packaged data set has "
            "its own labels and columns"), cfg.dataset)])


def site_labels(cfg: RunConfig, *, open_sites: bool) -> list[str] | None:
    r"""The run's label set ``L`` (classification; None for generation): ``labels``, else the server ``dataset``'s
    labels, else the sorted union of every site's labels (``open_sites`` only).

    Raises
    ------
    ConfigError
        A data source that cannot be read, or lacks ``label_column`` (named by its config key).
    """
    if site_task(cfg) != "classification":
        return None
    if cfg.labels:
        return label_set([], cfg.labels)
    if cfg.dataset:
        with _key("dataset", cfg.dataset):
            return label_set(files.label_values(cfg.dataset, cfg))
    if not open_sites:
        check_flower_sites(cfg)
    values = []
    for k, site in enumerate(cfg.sites):
        with _key(f"clients[{k}].data", site.data):
            values += files.label_values(site.data, cfg)
    return label_set(values)


def concat(parts: Sequence[TextDataset], task: str, label_names: Sequence[str]) -> TextDataset:
    """The rows of ``parts`` one after another (labels over ``label_names``), with the first non-empty part's ``meta``
    (a user's data keeps its instruction encoding: :func:`~.data_source.is_user_data`) and chat ``turns``."""
    targets = None if task == "classification" else [t for p in parts for t in p.targets]
    labels = np.concatenate([np.asarray(p.labels, dtype=np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    rows = [p for p in parts if len(p)]
    meta = dict(rows[0].meta) if rows else {}
    turns = [t for p in rows for t in p.turns] if rows and all(p.turns is not None for p in rows) else None
    return TextDataset([t for p in parts for t in p.texts], labels, list(label_names), targets, task, meta,
                       turns=turns)


class SiteData:
    r"""Client ``k``'s own rows: its data source read, split into training rows and held-out rows.

    Parameters
    ----------
    cfg : RunConfig
    k : int
        The client id (its ``[[clients]]`` table, and the key of its ``SITE_SPLIT`` stream).
    labels : list of str or None
        The run's label set ``L`` (classification).
    path : str, optional
        The site's data source; default ``clients[k].data`` (a Flower node's ``data-path`` overrides it).

    Attributes
    ----------
    train, held : TextDataset
        The training rows and (with an empty ``dataset``) the held-out rows; ``held`` is empty with a
        ``dataset``.
    val, test : TextDataset
        With an empty ``dataset``: the held-out rows split into the site's own validation and test rows
        (:func:`~.fedeval.split_held`); else empty.

    Raises
    ------
    ConfigError
        The source is missing or unreadable, lacks a named column, has a label outside ``labels``, or keeps no
        training row (named ``clients[k].data``).
    """

    def __init__(self, cfg: RunConfig, k: int, labels: Sequence[str] | None, path: str | None = None):
        self.path = cfg.sites[k].data if path is None else path
        key = f"clients[{k}].data"
        problem = data_problem(self.path)
        if problem is not None:
            raise ConfigError.from_errors([(key, problem, self.path)])
        task = site_task(cfg)
        with _key(key, self.path):
            full = read_data(self.path, task, cfg, labels=labels)
        if cfg.dataset:
            train_idx, held_idx = np.arange(len(full), dtype=np.int64), np.zeros(0, dtype=np.int64)
        else:
            train_idx, held_idx = stratified_split(full.labels, cfg.test_fraction, SITE_SPLIT.rng(cfg.seed, k))
        if not len(train_idx):
            raise ConfigError.from_errors([(key, (
                f"a data source with training rows after test_fraction = {cfg.test_fraction:g} is held out "
                f"({len(full)} rows, all held out)"), self.path)])
        self.train, self.held = full.subset(train_idx), full.subset(held_idx)
        self.val = self.test = self.held  # empty with a server dataset
        if federated(cfg):  # the site's own validation and test rows (federated evaluation, .fedeval)
            val_idx, test_idx = split_held(cfg, k, self.held)
            self.val, self.test = self.held.subset(val_idx), self.held.subset(test_idx)


class _Source:
    """What :class:`~.federation.DataSource` offers: ``labels``, ``label_names``, ``task``, ``has_other_targets``,
    ``test``, :meth:`examples`, ``len``; and :meth:`plan` (the rows :func:`~.federation.plan_rows` gives otherwise)."""

    has_other_targets = False
    _rows: TextDataset

    def __len__(self) -> int:
        return len(self._rows)

    def examples(self, rows) -> TextDataset:
        """The examples of ``rows`` (see the module's row layout), in that order."""
        return self._rows.subset(rows)

    def plan(self, cfg: RunConfig) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """``(train_rows, val_rows, client_idx)``."""
        return self.train_rows, self.val_rows, self.client_idx


class SitesSource(_Source):
    r"""The server's data of a ``[[clients]]`` run: the evaluation pool, and (``open_sites``) every site's rows.

    Attributes
    ----------
    test : TextDataset
        The test set.
    train_rows, val_rows, client_idx
        As :func:`~.federation.plan_rows` gives them (see the module's row layout); ``client_idx[k]`` is empty
        for every client when the sites are not opened.
    n_k : list of int or None
        Each site's training rows (None: not opened).
    holdout : list of int arrays
        Each client's rows of :attr:`test` (its local score).
    val_holdout : list of int arrays
        Each client's rows of the validation set (a personalised model's validation score).
    vocabulary_texts : list of str
        The texts the server's statistics (:class:`~.federation.Shared`) come from.
    sites : list of SiteData or None
        Every site's rows (None: not opened).
    site_sizes : list of (int, int) or None
        Without ``dataset``: each site's ``(validation rows, test rows)`` (federated evaluation; None on Flower,
        where the sites tell them); None with a ``dataset``.
    """

    def __init__(self, cfg: RunConfig, *, open_sites: bool = True):
        _check_server_dataset(cfg)
        if not open_sites:
            check_flower_sites(cfg)
        else:
            check_site_paths(cfg)
        self.task = task = site_task(cfg)
        labels = site_labels(cfg, open_sites=open_sites)
        self.label_names = tuple(labels) if labels is not None else ("all",)
        sites = [SiteData(cfg, k, labels) for k in range(cfg.clients)] if open_sites else None
        self.sites = sites
        labelled = task == "classification"
        empty = TextDataset([], np.zeros(0, np.int64), list(self.label_names), None if labelled else [], task)
        if cfg.dataset:
            with _key("dataset", cfg.dataset):
                pool = read_data(cfg.dataset, task, cfg, labels=labels)
            if cfg.val_size >= len(pool):
                raise ConfigError.from_errors([("val_size", f"below the server's {len(pool)} evaluation rows (the "
                                                            "rows of dataset; the rest are the test set)",
                                                cfg.val_size)])
            rest, val = split_validation(pool.labels if labelled else len(pool), cfg.val_size,
                                         VALIDATION.rng(cfg.seed))
            if cfg.eval_size < len(rest):
                rest = np.sort(rest[EVAL_SUBSET.rng(cfg.seed).permutation(len(rest))[: cfg.eval_size]])
            self.test, val_rows = pool.subset(rest), pool.subset(val)
            self.site_sizes = None
        elif sites is not None:  # federated evaluation, in process: the sites' own rows in client order
            self.test = concat([s.test for s in sites], task, self.label_names)
            val_rows = concat([s.val for s in sites], task, self.label_names)
            self.site_sizes = [(len(s.val), len(s.test)) for s in sites]
        else:  # federated evaluation on Flower: the sizes come from the sites (Simulation.learn_sites)
            self.test, val_rows, self.site_sizes = empty, empty, None
        train = [s.train for s in sites] if sites is not None else []
        self.n_k = [len(t) for t in train] if sites is not None else None
        self._rows = concat([val_rows, *train], task, self.label_names)
        n_val = len(val_rows)
        self.val_rows = np.arange(n_val, dtype=np.int64)
        self.train_rows = np.arange(n_val, len(self._rows), dtype=np.int64)
        edges = np.cumsum([0, *(self.n_k or [0] * cfg.clients)])
        self.client_idx = [np.arange(edges[k], edges[k + 1], dtype=np.int64) for k in range(cfg.clients)]
        self.labels = self._rows.labels[self.train_rows]
        if cfg.dataset:
            equal = [np.zeros(1, dtype=np.int64)] * cfg.clients  # equal shares: the server knows no site's size
            self.holdout = holdout_sets(None, equal, None, HOLDOUT.rng(cfg.seed), n_test=len(self.test))
            self.val_holdout = holdout_sets(None, equal, None, VAL_HOLDOUT.rng(cfg.seed), n_test=n_val)
        else:
            sizes = self.site_sizes or [(0, 0)] * cfg.clients
            self.holdout, self.val_holdout = site_blocks([t for _, t in sizes]), site_blocks([v for v, _ in sizes])
        self.vocabulary_texts = list(pool.texts) if cfg.dataset else [t for s in train for t in s.texts]


class NodeSource(_Source):
    r"""A Flower node's data: client ``k``'s own source alone (``path``: its ``data-path``), no other file opened.

    Its rows are its training rows; :meth:`plan` gives client ``k`` all of them and every other client none.
    """

    def __init__(self, cfg: RunConfig, k: int, labels: Sequence[str] | None, path: str | None = None):
        site = SiteData(cfg, k, labels, path)
        self.task = site_task(cfg)
        self.label_names = tuple(labels) if labels is not None else ("all",)
        self._rows = site.train
        self.labels = site.train.labels
        self.val, self.test = site.val, site.test
        n = len(site.train)
        self.train_rows, self.val_rows = np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
        self.client_idx = [np.arange(n, dtype=np.int64) if j == k else np.zeros(0, dtype=np.int64)
                           for j in range(cfg.clients)]


def site_federation(cfg: RunConfig, *, open_sites: bool = True):
    r"""The server's :class:`~.federation.Federation` of a ``[[clients]]`` run (see the module docstring).

    ``open_sites``: the server reads every site's file (in process); False on Flower (``n_k`` entries None).

    Raises
    ------
    ConfigError
        A site or ``dataset`` source that cannot be used (named by its key), ``val_size`` above the evaluation
        rows, an attack the task cannot have, ``[[clients]]`` without ``dataset`` on Flower.
    """
    source = SitesSource(cfg, open_sites=open_sites)
    attackers = choose_attackers(cfg.attacks, cfg.clients, cfg.seed)
    with config_key("attacks", [a.kind for a in cfg.attacks]):
        for a in attackers.values():
            if a.kind in DATA_ATTACKS:
                check_data_attack(a.kind, source.task, False)
    labelled = source.task == "classification"
    vocab = needs_vocabulary(cfg.model)
    edges = labelled and any(a.kind == "other_task" for a in attackers.values())
    texts = source.vocabulary_texts
    shared = Shared(tuple(word_vocabulary(texts)) if vocab else None,
                    tuple(float(e) for e in length_edges(texts, len(source.label_names))) if edges else None,
                    tuple(source.label_names) if labelled else None)
    n_k = list(source.n_k) if source.n_k is not None else [None] * cfg.clients
    return Federation(cfg, source, source.train_rows, source.val_rows, source.client_idx, n_k, list(cfg.ranks),
                      attackers, source.holdout, shared, source.val_holdout)


def open_source(cfg: RunConfig):
    """The run's data source as the in-process runner (and each worker) holds it: :class:`~.federation.DataSource`,
    or with ``[[clients]]`` every site's data (:class:`SitesSource`)."""
    return SitesSource(cfg) if cfg.sites else DataSource(cfg)
