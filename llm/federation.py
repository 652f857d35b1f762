r"""The federation as data: what the server knows, and what each client builds from its own examples alone.

A run of ``lowrank-fed run`` splits one data source among ``clients`` clients. Three things are computed from
the config, each by one function:

- :func:`plan_rows` (anyone): which training rows are validation rows and which client holds each other row,
  from the seed and the rows' **labels** only (:attr:`DataSource.labels`, the catalogue). No text, target or
  token of any example is needed, so a node computes its own rows itself: the partition is a deterministic
  function of ``(seed, labels)``, the very one the server computes.
- :func:`build_federation` (the server): the rows of every client, their sizes (the data weights), the
  ranks, the clients sampled each round (:func:`sample_clients`), the held-out test rows that score each client,
  the truth about contaminated clients (for reporting), and :class:`Shared`: what the server sends every node
  because it is a statistic of every client's texts (the tiny models' vocabulary, ``other_task``'s length
  classes).
- :func:`build_client` (a node): client ``k``'s :class:`~lowrank_fed.llm.client.ClientContext` from its
  partition id, the run config, the server's :class:`Shared` and its own data source. It reads exactly its
  own rows (:meth:`DataSource.examples`), applies its own data attack, tokenises them and builds the model.

Why the node computes its rows instead of receiving them: the partition depends on the labels and the seed
only, every node already holds the catalogue of a packaged data set, and computing it needs no message
before the first round (a node restarted mid-run rebuilds the same context); the server's copy
(:attr:`Federation.client_idx`) and the node's are one function's output, so they cannot disagree. What a node
cannot compute without reading other clients' examples (:class:`Shared`) comes from the server with each
download. The in-process runner (:class:`~lowrank_fed.llm.runner.simulation.Simulation`) and the Flower
``ClientApp`` both build their clients with :func:`build_client`, so both train on the same bytes.

All randomness comes from the run's seed through the named streams of :mod:`.streams`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

from .attacks import DATA_ATTACKS, check_data_attack, choose_attackers, length_edges, poison_examples
from .client import ClientContext, TrainSettings
from .config import RunConfig
from .data import (TextDataset, assign_ranks, encode_classification, encode_generation, holdout_sets, partition, split_validation)
from .data.instructions import encode_instructions
from .data_source import DataSource, config_key, is_user_data, truncation_counts
from .models import count_parameters, enable_gradient_checkpointing, load_model, needs_vocabulary, word_vocabulary
from .peft_bridge import AdapterWorkspace
from .streams import HOLDOUT, PARTITION, RANKS, SAMPLING, VAL_HOLDOUT, VALIDATION

__all__ = ["DataSource", "Shared", "Federation", "ModelSetup", "build_federation", "build_client", "build_model",
           "client_ranks", "plan_rows", "source_plan", "sample_clients", "train_settings", "run_device",
           "encode_examples", "DTYPES", "is_user_data", "truncation_counts"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Shared:
    r"""What the server sends every node because no node can compute it from its own examples.

    Attributes
    ----------
    vocabulary : tuple of str or None
        The tiny models' words (:func:`~lowrank_fed.llm.models.word_vocabulary` of the training texts, most
        frequent first); None for models with their own tokenizer.
    length_edges : tuple of float or None
        ``other_task``'s length-class quantiles of the training texts' word counts
        (:func:`~lowrank_fed.llm.attacks.length_edges`); None unless an ``other_task`` attack runs on a
        classification task.
    labels : tuple of str or None
        ``[[clients]]`` classification runs: the run's label set, fixed by the server before training
        (:func:`~lowrank_fed.llm.sites.site_labels`); None otherwise (the catalogue's).

    The first two are statistics of the clients' texts (a word list and ``C - 1`` numbers), never an example.
    """

    vocabulary: tuple[str, ...] | None = None
    length_edges: tuple[float, ...] | None = None
    labels: tuple[str, ...] | None = None

    def to_json(self) -> str:
        """The JSON a Flower download carries (floats round-trip exactly; ``labels`` only when set)."""
        data = {"vocabulary": None if self.vocabulary is None else list(self.vocabulary),
                "length_edges": None if self.length_edges is None else list(self.length_edges)}
        return json.dumps({**data, **({} if self.labels is None else {"labels": list(self.labels)})}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Shared":
        """Inverse of :meth:`to_json`.

        Raises
        ------
        ValueError
            Not a JSON object with (only) the keys ``vocabulary`` and ``length_edges``.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or not set(data) <= {"vocabulary", "length_edges", "labels"}:
            raise ValueError(f"Shared set-up must be a JSON object with keys 'vocabulary', 'length_edges' (and "
                             f"'labels'). Got {text[:100]!r}.")
        vocab, edges, labels = data.get("vocabulary"), data.get("length_edges"), data.get("labels")
        return cls(None if vocab is None else tuple(str(w) for w in vocab),
                   None if edges is None else tuple(float(e) for e in edges),
                   None if labels is None else tuple(str(c) for c in labels))


def plan_rows(cfg: RunConfig, labels, task: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    r"""``(train_rows, val_rows, client_idx)`` from the catalogue's ``labels`` and the seed alone.

    ``val_rows`` are the ``val_size`` validation rows (:func:`~lowrank_fed.llm.data.split_validation`, stream
    ``VALIDATION``; stratified by label for classification), ``train_rows`` the others (sorted), and
    ``client_idx[k]`` client ``k``'s positions in ``train_rows`` (:func:`~lowrank_fed.llm.data.partition`, stream
    ``PARTITION``), so client ``k``'s rows of the source are ``train_rows[client_idx[k]]``.

    Raises
    ------
    ConfigError
        ``val_size`` or ``clients`` that the data cannot satisfy (named).
    """
    labels = np.asarray(labels)
    labelled = task == "classification"
    with config_key("val_size", cfg.val_size):
        train_rows, val_rows = split_validation(labels if labelled else len(labels), cfg.val_size,
                                                VALIDATION.rng(cfg.seed))
    with config_key("clients", cfg.clients):
        client_idx = partition(cfg.partition, labels[train_rows], cfg.clients, PARTITION.rng(cfg.seed),
                               alpha=cfg.alpha, classes_per_client=cfg.classes_per_client)
    return train_rows, val_rows, client_idx


def source_plan(cfg: RunConfig, source) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(train_rows, val_rows, client_idx)`` of ``source``: :func:`plan_rows`, or a ``[[clients]]`` source's own
    (:mod:`.sites`: each client's rows are its site's, no partition)."""
    return source.plan(cfg) if cfg.sites else plan_rows(cfg, source.labels, source.task)


def sample_clients(cfg: RunConfig, round_: int) -> list[int]:
    """The clients of round ``round_``: all, or ``clients_per_round`` of them from the stream ``SAMPLING``."""
    if not cfg.clients_per_round:
        return list(range(cfg.clients))
    rng = SAMPLING.rng(cfg.seed, round_)
    return np.sort(rng.choice(cfg.clients, cfg.clients_per_round, replace=False)).tolist()


def train_settings(cfg: RunConfig) -> TrainSettings:
    """Every client's local training settings."""
    return TrainSettings(lr=cfg.lr, batch_size=cfg.batch_size, local_steps=cfg.local_steps,
                         local_epochs=cfg.local_epochs, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay)


def run_device(cfg: RunConfig) -> torch.device:
    """``cfg.device``, with ``"auto"`` the GPU when torch has one."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)


def encode_examples(tokenizer, examples: TextDataset, max_length: int) -> dict[str, torch.Tensor]:
    """``examples`` as model inputs: labels (classification) or targets (generation). Rows encode independently."""
    if examples.task == "classification":
        return encode_classification(tokenizer, examples.texts, examples.labels, max_length)
    if is_user_data(examples):  # a user's instructions: chat template or "prompt\n", the loss on the response
        return encode_instructions(tokenizer, examples, max_length)
    return encode_generation(tokenizer, examples.texts, examples.targets, max_length)


@dataclass
class ModelSetup:
    """The model with its PEFT adapters (``workspace``), its tokenizer, spec and ``transformers`` config, the device;
    ``model_params``: every parameter of the base model and head (:func:`~lowrank_fed.llm.models.count_parameters`,
    counted before the LoRA layers are added)."""

    workspace: AdapterWorkspace
    tokenizer: object
    spec: object
    model_config: object
    device: torch.device
    model_params: int


def build_model(cfg: RunConfig, shared: Shared, num_labels: int, reference_rank: int) -> ModelSetup:
    r"""The run's model on its device, wrapped for LoRA: the same weights on the server and on every node.

    ``reference_rank`` is the largest client rank of the run (:func:`client_ranks`): the ``r_ref`` of
    ``lora_scaling = "constant"`` (``s = lora_alpha / r_ref`` at every rank), the same on the server and every node.

    The model is a packaged one or the user's (a folder or a cached hub name: its task and default LoRA targets
    from its ``config.json``, :func:`~lowrank_fed.llm.models.model_spec`); ``gradient_checkpointing = true``
    recomputes activations in the backward pass (:func:`~lowrank_fed.llm.models.enable_gradient_checkpointing`:
    the same loss, less memory).

    Raises
    ------
    ValueError
        A tiny model without ``shared.vocabulary``, or ``target_modules`` the model lacks.
    ConfigError
        The user's model does not load or does not fit ``task`` / ``target_modules`` (named).
    """
    if needs_vocabulary(cfg.model) and shared.vocabulary is None:
        raise ValueError(f"Model {cfg.model!r} builds its tokenizer from the vocabulary of the whole training set, "
                         "which the server computes and sends (Shared.vocabulary); none was given.")
    model, tokenizer, spec = load_model(cfg.model, num_labels=num_labels, seed=cfg.seed, dtype=DTYPES[cfg.dtype],
                                        vocabulary=shared.vocabulary if needs_vocabulary(cfg.model) else None,
                                        task=cfg.task, target_modules=cfg.target_modules)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    device = run_device(cfg)
    params = count_parameters(model)  # before AdapterWorkspace adds the LoRA layers to the model
    workspace = AdapterWorkspace(
        model.to(device), target_modules=sorted(cfg.target_modules or spec.target_modules),
        lora_alpha=cfg.lora_alpha, task_type="SEQ_CLS" if spec.task == "classification" else "CAUSAL_LM",
        scaling=cfg.lora_scaling, reference_rank=reference_rank,
    )
    return ModelSetup(workspace, tokenizer, spec, model.config, device, params)


@dataclass
class Federation:
    r"""What the server knows about a run's federation (:func:`build_federation`).

    Attributes
    ----------
    cfg : RunConfig
    source : DataSource
        The server's handle on the data (its validation and test rows; the catalogue).
    train_rows, val_rows : int arrays
        Rows of ``source`` for training and for validation (:func:`plan_rows`).
    client_idx : list of int arrays
        Client ``k``'s positions in ``train_rows``.
    n_k : list of int (or None)
        Each client's number of training examples (the data weights); None: a site the server never opens.
    ranks : list of int
        Each client's LoRA rank.
    attackers : dict client id -> attack entry
        The truth about contaminated clients (for reports and the ``needs_truth`` oracle).
    holdout : list of int arrays
        Each client's held-out rows of the test set (its local score).
    shared : Shared
        What every node gets from the server.
    val_holdout : list of int arrays, optional
        Each client's share of the validation rows (positions in ``val_rows``), cut as ``holdout`` is from the
        test set: the validation score of a personalised method (``val_local_<metric>``); None: unknown.
    """

    cfg: RunConfig
    source: DataSource
    train_rows: np.ndarray
    val_rows: np.ndarray
    client_idx: list[np.ndarray]
    n_k: list[int]
    ranks: list[int]
    attackers: dict
    holdout: list[np.ndarray]
    shared: Shared = field(default_factory=Shared)
    val_holdout: list[np.ndarray] | None = None

    @property
    def task(self) -> str:
        return self.source.task

    def client_rows(self, k: int) -> np.ndarray:
        """Client ``k``'s rows of the data source (what :func:`build_client` reads for it)."""
        return self.train_rows[self.client_idx[k]]

    def sampled(self, round_: int) -> list[int]:
        """The clients of round ``round_`` (:func:`sample_clients`)."""
        return sample_clients(self.cfg, round_)


def build_federation(cfg: RunConfig, source: DataSource | None = None) -> Federation:
    r"""The server's view of the run: rows, sizes, ranks, attackers, held-out sets and :class:`Shared`
    (``[[clients]]`` tables: :func:`~lowrank_fed.llm.sites.site_federation`).

    Reads the training examples only where :class:`Shared` needs them (a tiny model's vocabulary, ``other_task``'s
    length classes); never loads a model.

    Raises
    ------
    ConfigError
        A value the data cannot satisfy, named: ``val_size``, ``clients`` (the partition), ``attacks`` (an attack
        the task cannot have), ``ranks``.
    """
    if cfg.sites:
        raise ValueError("A [[clients]] run's federation is sites.site_federation's (one data source per client).")
    source = DataSource(cfg) if source is None else source
    labelled = source.task == "classification"
    train_rows, val_rows, client_idx = plan_rows(cfg, source.labels, source.task)
    n_k = [int(len(idx)) for idx in client_idx]
    attackers = choose_attackers(cfg.attacks, cfg.clients, cfg.seed)
    with config_key("attacks", [a.kind for a in cfg.attacks]):
        for a in attackers.values():
            if a.kind in DATA_ATTACKS:
                check_data_attack(a.kind, source.task, source.has_other_targets)
    ranks = client_ranks(cfg, n_k)
    train_labels = source.labels[train_rows]
    holdout = holdout_sets(train_labels if labelled else None, client_idx,
                           source.test.labels if labelled else None, HOLDOUT.rng(cfg.seed), n_test=len(source.test))
    val_holdout = holdout_sets(train_labels if labelled else None, client_idx,
                               source.labels[val_rows] if labelled else None, VAL_HOLDOUT.rng(cfg.seed),
                               n_test=len(val_rows))
    vocab = needs_vocabulary(cfg.model)
    edges = labelled and any(a.kind == "other_task" for a in attackers.values())
    shared = Shared()
    if vocab or edges:
        train = source.examples(train_rows)  # the server's statistics of the training texts
        words = train.texts if not (is_user_data(train) and train.targets) else list(train.texts) + train.targets
        shared = Shared(tuple(word_vocabulary(words)) if vocab else None,
                        tuple(float(e) for e in length_edges(train.texts, len(train.label_names))) if edges else None)
    return Federation(cfg, source, train_rows, val_rows, client_idx, n_k, ranks, attackers, holdout, shared,
                      val_holdout)


def client_ranks(cfg: RunConfig, n_k: list[int]) -> list[int]:
    r"""Every client's LoRA rank (``cfg.ranks`` through :func:`~lowrank_fed.llm.data.assign_ranks`; ``n_k``, the
    clients' example counts, ranks them for ``"top10"``). A node computes it from the catalogue's labels alone.

    Raises
    ------
    ConfigError
        ``ranks`` that do not fit the clients.
    """
    with config_key("ranks", cfg.ranks):
        return assign_ranks(list(cfg.ranks) if isinstance(cfg.ranks, list) else cfg.ranks, cfg.clients,
                            rng=RANKS.rng(cfg.seed), rank_set=cfg.rank_set, scores=n_k)


def build_client(cfg: RunConfig, partition_id: int, *, shared: Shared | None = None, source: DataSource | None = None,
                 model: ModelSetup | None = None) -> ClientContext:
    r"""Client ``partition_id``'s context, from its own examples only.

    1. its rows: :func:`plan_rows` on the catalogue's labels (no example read);
    2. its examples: ``source.examples(rows)``, the only read;
    3. its data attack, if the seed makes it a contaminated client (:func:`~lowrank_fed.llm.attacks.choose_attackers`
       on the ids; :func:`~lowrank_fed.llm.attacks.poison_examples` on its own rows; its rows as they are kept too
       when the attack starts after round 1, ``from_round``);
    4. the model (``model``, or :func:`build_model` with ``shared``) and its own rows encoded.

    The context's ``data`` holds exactly the client's rows (``indices`` = ``0 .. n_k - 1``), so batches, and every
    result, equal those of a context over the whole training set.

    Parameters
    ----------
    cfg : RunConfig
    partition_id : int
        The client, ``0 <= partition_id < cfg.clients``.
    shared : Shared, optional
        From the server; needed by tiny models (their vocabulary) and by an ``other_task`` attacker on
        classification. Default: ``Shared()`` (nothing).
    source : DataSource, optional
        The node's data source (default: opened from ``cfg``).
    model : ModelSetup, optional
        A model already built (the in-process runner's one workspace, which its clients share one at a time).

    Raises
    ------
    ValueError
        ``partition_id`` out of range, or ``shared`` lacks what the model or the client's attack needs.
    """
    if isinstance(partition_id, bool) or not isinstance(partition_id, (int, np.integer)) \
            or not 0 <= partition_id < cfg.clients:
        raise ValueError(f"Client id {partition_id!r} is outside the run's clients [0, {cfg.clients}).")
    k = int(partition_id)
    shared = Shared() if shared is None else shared
    if source is None and cfg.sites:
        raise ValueError("A [[clients]] client needs its source (sites.SitesSource or sites.NodeSource).")
    source = DataSource(cfg) if source is None else source
    train_rows, _, client_idx = source_plan(cfg, source)
    rows = train_rows[client_idx[k]]
    honest = examples = source.examples(rows)
    attack = choose_attackers(cfg.attacks, cfg.clients, cfg.seed).get(k)
    if attack is not None:
        examples = poison_examples(examples, attack, client=k, seed=cfg.seed, edges=shared.length_edges)
    if model is None:
        reference_rank = max(client_ranks(cfg, [len(i) for i in client_idx]))
        model = build_model(cfg, shared, len(source.label_names), reference_rank)
    data = encode_examples(model.tokenizer, examples, cfg.max_length)
    late = attack is not None and attack.kind in DATA_ATTACKS and attack.from_round > 1  # honest until then
    return ClientContext(k, cfg.seed, model.workspace, data, np.arange(len(rows), dtype=np.int64),
                         train_settings(cfg), model.device,
                         honest_data=encode_examples(model.tokenizer, honest, cfg.max_length) if late else None,
                         attack_from=attack.from_round if late else 1)
