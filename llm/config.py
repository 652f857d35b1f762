r"""Run configuration: defaults (the embedded demo), TOML files, ``--set`` overrides, Flower's flat form.

A config file is TOML with top-level keys of :class:`RunConfig`; method options go in a table
named after the method (``[hetlora]`` ``lam = 0.01``), faults in ``[[faults]]`` and contaminated
clients in ``[[attacks]]`` (see ``docs/config.md`` for every key). ``--set`` values are parsed as TOML values (``rounds=3``,
``methods=["fedit","flora"]``); a bare word that is not valid TOML is taken as a string
(``dataset=20newsgroups``). Dotted keys reach method tables: ``--set hetlora.lam=0.05``.

The whole config is validated at once, by pydantic, before anything is written; every problem
becomes one line of a :class:`ConfigError`, ``Config key 'KEY': expected ...; got VALUE.``, with
``KEY`` a dotted path (``hetlora.lam``, ``faults[0].client``, ``ranks[2]``).

Examples
--------
>>> cfg = RunConfig.from_dict({"rounds": 2, "hetlora": {"lam": 0.1}})
>>> cfg.rounds, cfg.method_options
(2, {'hetlora': {'lam': 0.1}})
>>> RunConfig.from_flat(cfg.to_flat()) == cfg
True
>>> try:
...     RunConfig.from_dict({"clients": 3, "ranks": [2, 4, 2.5], "hetlora": {"lam": "abc"}})
... except ConfigError as err:
...     print(err)
Config key 'ranks[2]': expected an integer; got 2.5.
Config key 'hetlora.lam': expected a number; got 'abc'.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, NonNegativeInt, PositiveInt, Tag,
                      ValidationError, ValidationInfo, field_validator, model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .attacks import DATA_ATTACKS, UPDATE_ATTACKS, attack_counts
from .data import DATASETS, RANK_DISTRIBUTIONS
from .methods import METHODS
from .models import MODELS
from .peft_bridge import LORA_SCALINGS

__all__ = ["RunConfig", "Fault", "Attack", "ConfigError", "load_config", "apply_overrides", "parse_value", "TUNED_KEY",
           "tuned_paths", "config_reference", "EXECUTION_KEYS", "same_run_keys", "WORKERS_ENV"]

RANK_NAMES = ("flora", "top10", *RANK_DISTRIBUTIONS)

#: Documented caps on the keys that set a run's length: far above any shipped config (at most 8 rounds of
#: 10 steps), low enough that a mistyped extra digit or three is refused instead of running for weeks.
#: The bounds that need the data, the model or the machine are checked at set-up (``runner/limits.py``).
MAX_ROUNDS = 10_000
MAX_LOCAL_STEPS = 10_000
MAX_LOCAL_EPOCHS = 100


#: The environment variable that ``workers = 0`` (the default) reads first (:meth:`RunConfig.worker_count`).
WORKERS_ENV = "LOWRANK_FED_WORKERS"

#: Keys that say how a run is computed, never what: every value gives the same outputs byte for byte, so
#: checkpoints do not store them, and a resumed or reused run may change them (``workers``: clients at once).
EXECUTION_KEYS = ("workers",)


def same_run_keys(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config (``config.json``'s or a checkpoint's) without :data:`EXECUTION_KEYS`."""
    return {k: v for k, v in stored.items() if k not in EXECUTION_KEYS}


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ConfigError(ValueError):
    r"""An invalid run config: one line per problem, ``Config key 'KEY': expected ...; got VALUE.``

    Attributes
    ----------
    errors : list of (key, expected, value)
        The problems found (empty for errors not tied to a key, e.g. a TOML syntax error).
    """

    def __init__(self, message: str, errors: list[tuple[str, str, Any]] | None = None):
        super().__init__(message)
        self.errors = list(errors or [])

    @classmethod
    def from_errors(cls, errors: list[tuple[str, str, Any]]) -> ConfigError:
        lines = [f"Config key '{key}': expected {expected}; got {_show(value)}." for key, expected, value
                 in errors]
        return cls("\n".join(lines), errors)


# ----------------------------------------------------------------------------- cross-field checks


def _fail(*errors: tuple[tuple, str, Any]):
    """Raise ``(loc, expected, value)`` errors from inside a validator (pydantic prefixes the field's loc)."""
    if not errors:
        return
    raise ValidationError.from_exception_data("RunConfig", [
        InitErrorDetails(type=PydanticCustomError("config", "{expected}", {"expected": expected}), loc=loc,
                         input=value)
        for loc, expected, value in errors])


def _rank_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return "int"  # a float then fails as "expected an integer": 2.5 and 2.0 are both rejected
    if isinstance(value, (list, tuple)):
        return "list"
    return "name" if isinstance(value, str) else None


RankSpec = Annotated[
    Union[Annotated[PositiveInt, Tag("int")], Annotated[list[PositiveInt], Tag("list")],
          Annotated[Literal[RANK_NAMES], Tag("name")]],
    Discriminator(_rank_kind, custom_error_type="config", custom_error_message=(
        "a positive integer, a list of positive integers (one per client) or one of "
        + ", ".join(map(repr, RANK_NAMES)))),
]


class Fault(BaseModel):
    r"""One ``[[faults]]`` entry: corrupt client ``client``'s reply in round ``round`` (tests the drops)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    round: int = Field(ge=1, description="round of the fault, 1 <= round <= rounds (required)")
    client: int = Field(ge=0, description="client id, 0 <= client < clients (required)")
    kind: Literal["nan", "inf", "shape"] = Field("nan", description=(
        "`nan` or `inf`: one entry of the reply becomes NaN / Inf; `shape`: one tensor loses a column"))
    method: Union[Literal[tuple(METHODS)], None] = Field(
        None, description="only this method's run (one of `methods`); absent: every method")


ATTACK_KINDS = (*DATA_ATTACKS, *UPDATE_ATTACKS)


class Attack(BaseModel):
    r"""One ``[[attacks]]`` entry: contaminated clients for the whole run (the same clients for every method).

    Give ``fraction`` (``round(fraction * clients)`` clients, drawn from the seed) or ``clients`` (ids).
    Kinds are defined in :mod:`lowrank_fed.llm.attacks`: data attacks (``label_flip``, ``shuffle_targets``,
    ``other_task``) change what the client trains on; update attacks (``random``, ``scaled``,
    ``sign_flip``, ``coordinated``) change its reply.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    kind: Literal[ATTACK_KINDS] = Field(description="what the contaminated clients do (required)")
    fraction: Union[float, None] = Field(None, gt=0, lt=1, allow_inf_nan=False, description=(
        "share of the clients, rounded to the nearest count (at least one); or give `clients`"))
    clients: Union[list[NonNegativeInt], None] = Field(None, min_length=1, description=(
        "the contaminated clients' ids; or give `fraction`"))
    scale: Union[float, None] = Field(None, gt=0, allow_inf_nan=False, description=(
        "`scaled`: the factor on the update (absent: 5); `random`, `coordinated`: the update's norm relative "
        "to the honest one (absent: 1)"))

    @model_validator(mode="after")
    def _one_selector(self) -> "Attack":
        if (self.fraction is None) == (self.clients is None):
            raise ValueError("exactly one of 'fraction' and 'clients'")
        return self


class RunConfig(BaseModel):
    r"""Every setting of ``lowrank-fed run``. The defaults are the embedded demo.

    The demo compares the three seed methods (PreLort, HAFL, LoRA-A2) with three baselines (FedIT,
    FLoRA, FlexLoRA) on MiniLM fine-tuned for BBC News topics (5 classes) across 10 non-IID
    clients (Dirichlet 0.5) with ranks 16, 8 and 4 (FLoRA's mix capped at LoRA-A2's global rank 16),
    evaluated every second round. Values are checked
    strictly: ``lr = "abc"``, ``rounds = 2.0`` and ``ranks = [2, 2.5]`` are errors, not conversions
    (an integer is accepted where a float is expected).
    """

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)

    name: str = Field("default", pattern=r"^\w[\w.-]*$", max_length=64, description=(
        "run name, at most 64 characters (a folder name); the output folder is `runs/<name>` unless `--out` "
        "is given"))
    model: Literal[tuple(MODELS)] = Field("minilm", description="packaged model: " + ", ".join(
        f"`{m}` ({s.task})" for m, s in MODELS.items()))
    dataset: Literal[tuple(DATASETS)] = Field("bbc_news", description="packaged dataset of the model's task: "
                                              + ", ".join(f"`{d}` ({t})" for d, t in DATASETS.items()))
    methods: list[Literal[tuple(METHODS)]] = Field(
        ["fedit", "flora", "flexlora", "prelort", "hafl", "lora_a2"], min_length=1,
        description="methods run side by side, each once (a single name is accepted as a list of one)")
    clients: int = Field(10, ge=1, description="number of clients")
    clients_per_round: int = Field(0, ge=0, description="clients sampled per round, <= clients; 0: all")
    ranks: RankSpec = Field([16, 16, 16, 16, 8, 8, 4, 4, 4, 4], description=(
        "LoRA rank per client, each at most min(d_out, d_in) of the model's smallest adapted module: "
        "a list of `clients` ranks, one rank for all, or an assignment: `flora` "
        "(64, 32, 16, 16, 8, 8, 4, 4, 4, 4, cycled), `uniform`, `heavy_tail`, `normal` (LoRA-A2's mixes over "
        "`rank_set`), `top10` (Byun & Lee: rank 20 for the largest 10% of clients, 5 for the others)"))
    rank_set: list[PositiveInt] = Field([1, 2, 4, 8, 16, 32], min_length=1,
                                        description="the ranks of `uniform`, `heavy_tail`, `normal` (6)")
    rounds: int = Field(4, ge=1, le=MAX_ROUNDS, description="federated rounds")
    local_steps: int = Field(5, ge=0, le=MAX_LOCAL_STEPS, description=(
        "local optimiser steps per round (when local_epochs = 0); a local round must fit in memory (see Upper bounds)"))
    local_epochs: int = Field(0, ge=0, le=MAX_LOCAL_EPOCHS, description=(
        "> 0: passes over the client's data, not local_steps"))
    batch_size: int = Field(8, ge=1, description=(
        "local batch size, at most the training examples of all the clients (a client with fewer examples "
        "repeats them within a batch); a local round must fit in memory (see Upper bounds)"))
    lr: float = Field(5e-3, gt=0, allow_inf_nan=False, description="local learning rate")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="local optimiser")
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False, description="optimiser weight decay")
    partition: Literal["dirichlet", "iid", "pathological"] = Field(
        "dirichlet", description="how the training data is split among clients")
    alpha: float = Field(0.5, gt=0, allow_inf_nan=False, description="Dirichlet concentration (`dirichlet`)")
    classes_per_client: int = Field(2, ge=1, description="classes per client (`pathological` split)")
    seed: int = Field(0, ge=0, le=2**63 - 1, description=(
        "seed of every random choice (split, ranks, init, batches); at most 2^63 - 1, TOML's and Flower's "
        "largest integer"))
    max_length: int = Field(64, ge=1, description=(
        "tokens per example (truncation / padding), at most the model's max_position_embeddings"))
    lora_alpha: float = Field(16.0, gt=0, allow_inf_nan=False, description=(
        "LoRA alpha: the scale s is alpha / r, alpha / sqrt(r) or alpha / r_ref, see `lora_scaling`"))
    use_rslora: bool = Field(False, description=(
        "rank-stabilised scale alpha / sqrt(r): the older spelling of `lora_scaling = \"rslora\"` (either one "
        "sets the other; `true` with `lora_scaling = \"constant\"` is an error)"))
    lora_scaling: Literal[LORA_SCALINGS] = Field("alpha_over_r", description=(
        "the LoRA scale s of an adapter of rank r, the same rule for every client, method, download and export: "
        "`alpha_over_r` (s = lora_alpha / r, PEFT's default), `rslora` (s = lora_alpha / sqrt(r)), `constant` "
        "(s = lora_alpha / r_ref at every rank, r_ref = the run's largest client rank, after `ranks` is "
        "assigned; docs/methods.md, Scale convention)"))
    target_modules: list[str] = Field([], description="modules that get LoRA adapters; empty: the model's")
    train_size: int = Field(0, ge=0, description="training examples drawn from the training split; 0: all")
    val_size: int = Field(50, ge=0, description=(
        "examples held out from the TRAINING data (after train_size) as a validation set for model "
        "selection; the test set is never used for selection; 0: no validation set"))
    eval_size: int = Field(200, ge=1, description="test examples evaluated (at most the test split)")
    eval_every: int = Field(2, ge=1, description="evaluate every this many rounds (and after the last)")
    rouge_size: int = Field(16, ge=0, description="generation: test examples scored with ROUGE-L at the end")
    score_uploads: bool = Field(False, description=(
        "also score each client's own trained model (its upload, before aggregation) in evaluated rounds: "
        "client rows get upload_<metric> (test set) and upload_local_<metric> (its held-out set)"))
    max_new_tokens: int = Field(24, ge=1, description=(
        "generation: tokens generated per example for ROUGE-L; max_length + max_new_tokens at most the "
        "model's max_position_embeddings"))
    threads: int = Field(1, ge=1, description="torch threads, at most the CPU cores this process may use")
    workers: int = Field(0, ge=0, description=(
        "clients trained (and models scored) at once in-process, each worker a process with its own model and "
        "`threads` torch threads; workers x threads at most the CPU cores; 0: `LOWRANK_FED_WORKERS` if set, else "
        "the cores // threads (1 on a GPU); "
        "1: one client after another; any value gives the same bytes; not used by `--engine flower`"))
    device: str = Field("auto", description="`auto` (CUDA if available), `cpu`, `cuda`, `cuda:N` (existing)")
    dtype: Literal["float32", "bfloat16", "float64"] = Field("float32", description="model weights' dtype")
    checkpoint: bool = Field(True, description="checkpoint every round (needed for `--resume`)")
    faults: list[Fault] = Field([], description="injected faults, `[[faults]]` entries (see below)")
    attacks: list[Attack] = Field([], description="contaminated clients, `[[attacks]]` entries (see below)")
    method_options: dict[str, Any] = Field({}, description=(
        "method options by method; in TOML write a `[method]` table instead (see below)"))

    # ------------------------------------------------------------------ checks across keys
    @field_validator("methods", mode="before")
    @classmethod
    def _one_method(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("methods")
    @classmethod
    def _methods_once(cls, methods: list[str]) -> list[str]:
        _fail(*[((i,), f"each method once ({m!r} is also methods[{methods.index(m)}])", m)
                for i, m in enumerate(methods) if methods.index(m) < i])
        return methods

    @field_validator("dataset")
    @classmethod
    def _dataset_task(cls, dataset: str, info: ValidationInfo) -> str:
        model = info.data.get("model")
        if model is not None and DATASETS[dataset] != MODELS[model].task:
            task = MODELS[model].task
            fitting = ", ".join(repr(d) for d, t in DATASETS.items() if t == task)
            _fail(((), f"a {task} dataset for model {model!r} ({fitting})", dataset))
        return dataset

    @field_validator("clients_per_round")
    @classmethod
    def _per_round(cls, value: int, info: ValidationInfo) -> int:
        clients = info.data.get("clients")
        if clients is not None and value > clients:
            _fail(((), f"an integer in [0, clients] = [0, {clients}] (0: all clients)", value))
        return value

    @field_validator("ranks")
    @classmethod
    def _one_rank_per_client(cls, ranks: Any, info: ValidationInfo) -> Any:
        clients = info.data.get("clients")
        if isinstance(ranks, list) and clients is not None and len(ranks) != clients:
            _fail(((), f"a list of {clients} ranks, one per client (clients = {clients})", ranks))
        return ranks

    @field_validator("rank_set")
    @classmethod
    def _rank_set_fits(cls, rank_set: list[int], info: ValidationInfo) -> list[int]:
        spec = info.data.get("ranks")
        counts = RANK_DISTRIBUTIONS.get(spec) if isinstance(spec, str) else None
        if counts is not None and len(rank_set) != len(counts):
            n = len(counts)
            _fail(((), f"{n} ranks for ranks = {spec!r} (its client counts are over {n} ranks)", rank_set))
        return rank_set

    @model_validator(mode="before")
    @classmethod
    def _scaling_from_rslora(cls, data: Any) -> Any:
        """``use_rslora = true`` is the older spelling of ``lora_scaling = "rslora"``: either one, the other absent or
        at its default (Flower's run config always holds both), selects rsLoRA, and both are set to say so, so
        ``to_dict`` round-trips. ``use_rslora = true`` with ``lora_scaling = "constant"`` is left for
        :meth:`_one_scaling` to refuse."""
        if isinstance(data, Mapping):
            rslora, scaling = data.get("use_rslora"), data.get("lora_scaling")
            if rslora is True and scaling in (None, "alpha_over_r"):
                data = {**data, "lora_scaling": "rslora"}
            elif scaling == "rslora" and (rslora is None or rslora is False):
                data = {**data, "use_rslora": True}
        return data

    @field_validator("lora_scaling")
    @classmethod
    def _one_scaling(cls, scaling: str, info: ValidationInfo) -> str:
        if info.data.get("use_rslora") is True and scaling != "rslora":
            _fail(((), "'rslora' when use_rslora = true (its older spelling: remove use_rslora, or set lora_scaling "
                       "= 'rslora')", scaling))
        return scaling

    @field_validator("local_epochs")
    @classmethod
    def _some_training(cls, epochs: int, info: ValidationInfo) -> int:
        if epochs == 0 and info.data.get("local_steps") == 0:
            _fail(((), "a positive value when local_steps = 0 (one of them must be positive)", epochs))
        return epochs

    @field_validator("val_size")
    @classmethod
    def _val_below_train(cls, size: int, info: ValidationInfo) -> int:
        train = info.data.get("train_size")
        if train and size >= train:
            _fail(((), f"fewer than train_size = {train} examples (the validation set is drawn from them)",
                   size))
        return size

    @field_validator("threads")
    @classmethod
    def _threads_exist(cls, threads: int) -> int:
        cores = available_cores()
        if threads > cores:
            _fail(((), f"an integer in [1, {cores}] (the CPU cores this process may use here)", threads))
        return threads

    @field_validator("workers")
    @classmethod
    def _workers_fit(cls, workers: int, info: ValidationInfo) -> int:
        threads, cores = info.data.get("threads"), available_cores()
        if threads is not None and workers * threads > cores:
            _fail(((), f"an integer in [0, {cores // threads}]: workers x threads = {workers} x {threads} at most "
                       f"the {cores} CPU cores this process may use here (0: as many as fit)", workers))
        return workers

    def worker_count(self, device: str = "cpu") -> int:
        r"""The worker processes a run uses: ``workers``; where it is 0, the environment's ``LOWRANK_FED_WORKERS``
        if set, else :math:`\lfloor \text{cores} / \text{threads} \rfloor` on a CPU and 1 on a CUDA device
        (one GPU: its clients would queue on it).

        Raises
        ------
        ConfigError
            ``LOWRANK_FED_WORKERS`` is not a whole number from 1 to the cores // threads.
        """
        if self.workers:
            return self.workers
        cores = available_cores()
        text = os.environ.get(WORKERS_ENV)
        if text is not None:
            fits = cores // self.threads
            if not text.strip().isdigit() or not 1 <= int(text) <= fits:
                raise ConfigError(f"Environment variable {WORKERS_ENV} (the default of config key 'workers'): "
                                  f"expected a whole number from 1 to {fits} (workers x threads = {self.threads} "
                                  f"at most the {cores} CPU cores); got {text!r}.")
            return int(text)
        return 1 if device.startswith("cuda") else max(1, cores // self.threads)

    @field_validator("device")
    @classmethod
    def _device_exists(cls, device: str) -> str:
        if device in ("auto", "cpu"):
            return device
        kind, _, index = device.partition(":")
        if kind != "cuda" or (index and not index.isdigit()):
            _fail(((), "'auto', 'cpu', 'cuda' or 'cuda:N'", device))
        import torch

        if not torch.cuda.is_available():
            _fail(((), "'auto' or 'cpu' (torch.cuda.is_available() is False here)", device))
        count = torch.cuda.device_count()
        if index and int(index) >= count:
            _fail(((), f"'cuda' or 'cuda:N' with N < {count} (torch.cuda.device_count())", device))
        return device

    @field_validator("faults")
    @classmethod
    def _faults_in_range(cls, faults: list[Fault], info: ValidationInfo) -> list[Fault]:
        rounds, clients, methods = (info.data.get(k) for k in ("rounds", "clients", "methods"))
        errors = []
        for i, f in enumerate(faults):
            if rounds is not None and f.round > rounds:
                errors.append(((i, "round"), f"an integer in [1, rounds] = [1, {rounds}]", f.round))
            if clients is not None and f.client >= clients:
                errors.append(((i, "client"), f"a client id in [0, clients) = [0, {clients})", f.client))
            if methods is not None and f.method is not None and f.method not in methods:
                errors.append(((i, "method"), f"one of methods {methods} (or none: every method)", f.method))
        _fail(*errors)
        return faults

    @field_validator("attacks")
    @classmethod
    def _attackers_exist(cls, attacks: list[Attack], info: ValidationInfo) -> list[Attack]:
        clients = info.data.get("clients")
        errors, seen = [], {}
        for i, a in enumerate(attacks):
            for j, k in enumerate(a.clients or []):
                if clients is not None and k >= clients:
                    errors.append(((i, "clients", j), f"a client id in [0, clients) = [0, {clients})", k))
                elif k in seen:
                    errors.append(((i, "clients", j), f"a client not already contaminated (attacks[{seen[k]}])", k))
                seen.setdefault(k, i)
        if clients is not None and not errors:
            total = sum(attack_counts(attacks, clients))
            if total >= clients:
                errors.append(((), f"fewer contaminated clients than clients = {clients}", total))
        _fail(*errors)
        return attacks

    @field_validator("method_options")
    @classmethod
    def _method_tables(cls, tables: dict[str, Any]) -> dict[str, dict]:
        """Each table through its method's ``Options`` model; kept as plain dicts of the values set."""
        errors, out = [], {}
        for name, table in tables.items():
            if name not in METHODS:
                errors.append(((name,), f"a method table, one of {_method_tables()}", table))
            elif not isinstance(table, Mapping):
                errors.append(((name,), f"a table of {name} options", table))
            else:
                Options = METHODS[name].Options
                try:
                    opts = Options.model_validate(dict(table))
                except ValidationError as err:
                    for e in err.errors():
                        expected = (_option_list(name) if e["type"] == "extra_forbidden" else _expected(e))
                        errors.append(((name, *e["loc"]), expected, e.get("input")))
                    continue
                if table:  # an empty table means the defaults: stored as no table
                    out[name] = opts.model_dump(mode="json", exclude_unset=True)
        _fail(*errors)
        return out

    # ------------------------------------------------------------------ construction and forms
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        r"""Validate a config dict: top-level keys, ``[method]`` tables (moved into ``method_options``).

        Raises
        ------
        ConfigError
            Listing every invalid key, the expected and the actual value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"A config must be a table of keys. Got {_show(data)}.")
        data = dict(data)
        options = data.pop("method_options", {})
        if isinstance(options, Mapping):  # else pydantic names the type error
            options = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in options.items()}
            for name in [k for k in data if k in METHODS]:
                table = data.pop(name)
                merge = isinstance(options.get(name), dict) and isinstance(table, Mapping)
                options[name] = {**options[name], **table} if merge else table
        try:
            return cls.model_validate({**data, "method_options": options})
        except ValidationError as err:
            raise ConfigError.from_errors([_convert(e) for e in err.errors()]) from None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``RunConfig.from_dict(cfg.to_dict()) == cfg``."""
        return self.model_dump(mode="json")

    def definition(self) -> dict[str, Any]:
        """:meth:`to_dict` without :data:`EXECUTION_KEYS`: what the run computes (checkpoints store it; a run
        folder's ``config.json`` is the same run when its definition is)."""
        return same_run_keys(json.loads(json.dumps(self.to_dict())))

    def validate(self) -> None:  # type: ignore[override]
        """Check the config again (after attribute assignments); raise :class:`ConfigError`."""
        type(self).from_dict(self.to_dict())

    def to_flat(self) -> dict[str, bool | int | float | str]:
        r"""The config as Flower's run config: ``{key: bool | int | float | str}``.

        Method options become ``"method.option"`` keys. Scalars stay as they are; every other value
        (lists: ``methods``, ``ranks``, ``rank_set``, ``target_modules``, ``faults``, ``attacks``; tables; null) is a
        JSON string, as is a string that starts with ``[``, ``{`` or ``"``, or equals ``null``, so
        :meth:`from_flat` decodes exactly those strings as JSON.
        """
        flat = {key: _flat_value(v) for key, v in self.to_dict().items() if key != "method_options"}
        for name, table in self.method_options.items():
            flat.update({f"{name}.{opt}": _flat_value(v) for opt, v in table.items()})
        return flat

    @classmethod
    def from_flat(cls, flat: Mapping[str, bool | int | float | str]) -> RunConfig:
        """The config from :meth:`to_flat`'s form (keys not given take their defaults)."""
        data: dict[str, Any] = {}
        for key, value in flat.items():
            value = _unflat_value(value)
            if "." in key:
                table, option = key.split(".", 1)
                if not isinstance(data.setdefault(table, {}), dict):
                    raise ConfigError(f"Config key {key!r}: {table!r} is also given as a plain value.")
                data[table][option] = value
            else:
                data[key] = value
        return cls.from_dict(data)


# ----------------------------------------------------------------------------- messages


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


_EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "list_type": "a list", "tuple_type": "a list", "dict_type": "a table", "model_type": "a table",
    "model_attributes_type": "a table", "missing": "a value (the key is required)",
    "greater_than": "a value > {gt}", "greater_than_equal": "a value >= {ge}", "less_than": "a value < {lt}",
    "less_than_equal": "a value <= {le}", "literal_error": "one of {expected}",
    "too_short": "at least {min_length} item(s)", "too_long": "at most {max_length} item(s)",
    "string_pattern_mismatch": "a string matching {pattern}",
    "string_too_long": "a string of at most {max_length} characters",
}


def _expected(error: Mapping[str, Any]) -> str:
    """The 'expected ...' text of one pydantic error."""
    template = _EXPECTED.get(error["type"])
    if template is not None:
        try:
            return template.format(**error.get("ctx", {}))
        except (KeyError, IndexError):
            pass
    msg = str(error["msg"])
    for prefix in ("Input should be ", "Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def _method_tables() -> str:
    return ", ".join(f"[{m}]" for m in METHODS)


def _option_list(method: str) -> str:
    options = list(METHODS[method].Options.model_fields)
    if not options:
        return f"no options ([{method}] takes none)"
    return f"an option of [{method}] ({', '.join(options)})"


def _convert(error: Mapping[str, Any]) -> tuple[str, str, Any]:
    """A pydantic error of :class:`RunConfig` as ``(key, expected, value)``."""
    loc = list(error["loc"])
    if loc[:1] == ["ranks"] and len(loc) > 1 and isinstance(loc[1], str):
        del loc[1]  # the union's tag (int | list | name)
    if loc[:1] == ["method_options"] and len(loc) > 1:
        del loc[0]  # [method] tables are written at the top level
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    value = error.get("input")
    if error["type"] == "extra_forbidden" and len(loc) == 1:
        keys = [k for k in RunConfig.model_fields if k != "method_options"]
        expected = f"a config key ({', '.join(keys)}) or a method table ({_method_tables()})"
    elif error["type"] == "extra_forbidden" and loc[:1] in (["faults"], ["attacks"]):
        entry = Fault if loc[0] == "faults" else Attack
        expected = f"a key of a [[{loc[0]}]] entry ({', '.join(entry.model_fields)})"
    elif error["type"] == "string_pattern_mismatch" and loc == ["name"]:
        expected = "a folder name: letters, digits, '_', '-' and '.', starting with a letter, digit or '_'"
    elif error["type"] == "missing":
        expected, value = _expected(error), _Missing()
    else:
        expected = _expected(error)
    return key or "(config)", expected, value


class _Missing:
    def __repr__(self) -> str:
        return "nothing"


# ----------------------------------------------------------------------------- flat form


def _flat_value(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str) and not (value.startswith(("[", "{", '"')) or value == "null"):
        return value
    return json.dumps(value, separators=(",", ":"))


def _unflat_value(value: Any) -> Any:
    if isinstance(value, str) and (value.startswith(("[", "{", '"')) or value == "null"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value  # left for validation to name
    return value


# ----------------------------------------------------------------------------- files and --set


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value if it parses as one, else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _read_toml(path: Path) -> dict:
    """One TOML file as a dict; ConfigError naming the file (missing, unreadable) or the line (not TOML)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file '{path}' not found.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"Config file '{path}' cannot be read: {err}.") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:  # "... (at line L, column C)" or "... (at end of document)"
        found = re.search(r"at line (\d+)", str(err))
        line = int(found.group(1)) if found else max(1, len(text.splitlines()))
        raise ConfigError(f"Config file '{path}', line {line}: not valid TOML: {err}.") from None


#: The config key naming files of chosen hyper-parameters (``lowrank-fed tune``'s ``tuned.toml``) to merge in.
TUNED_KEY = "tuned"


def _tuned_entries(path: Path, data: dict) -> list[Path]:
    """The files ``data``'s ``tuned`` key names, resolved against the config file's folder."""
    raw = data[TUNED_KEY]
    files = [raw] if isinstance(raw, str) else raw
    if not isinstance(files, list) or not files or not all(isinstance(f, str) and f.strip() for f in files):
        raise ConfigError(f"Config key '{TUNED_KEY}' in '{path}': expected a path to a tuned.toml (relative to the "
                          f"config's folder) or a list of such paths; got {_show(raw)}.")
    return [Path(f) if Path(f).is_absolute() else path.parent / f for f in files]


def tuned_paths(path: str | Path | None) -> list[Path]:
    """The tuned files a config file's ``tuned`` key names (``[]`` for none); what :func:`load_config` merges."""
    if path is None:
        return []
    data = _read_toml(Path(path))
    return _tuned_entries(Path(path), data) if TUNED_KEY in data else []


def load_config(path: str | Path | None = None) -> dict:
    r"""The TOML file as a dict (``{}`` for no file), with the files its ``tuned`` key names merged in.

    ``tuned = "path/to/tuned.toml"`` (or a list of such paths), relative to the config file's folder, names
    files of chosen values (``lowrank-fed tune`` writes them): their ``[method]`` tables (and any top-level key)
    are merged into the config, and the ``tuned`` key itself is dropped, so a run stores the values it used. A
    value given in two places (the config and a tuned file, or two tuned files) is an error naming both.

    Raises
    ------
    ConfigError
        The file is missing or unreadable (naming the path), or not valid TOML (naming the file and
        the line); a ``tuned`` entry that is not a path, a tuned file that is missing, not TOML, names
        ``tuned`` itself or a key that is no config key or method table, or a value given twice.
    """
    if path is None:
        return {}
    path = Path(path)
    data = _read_toml(path)
    if TUNED_KEY not in data:
        return data
    files = _tuned_entries(path, data)
    for tuned in files:  # every named file exists before any is read: a config is never half-tuned
        if not tuned.is_file():
            raise ConfigError(f"Tuned file '{tuned}' not found (named by '{TUNED_KEY}' in '{path}'): write it first "
                              "with lowrank-fed tune (for configs/reproduce/: configs/reproduce/tune_all.sh, then "
                              "tune_all.sh --link), or remove the key.")
    del data[TUNED_KEY]
    where: dict[tuple[str, ...], Path] = {}  # each key set, and the file that set it

    def note(keys: tuple[str, ...], source: Path) -> None:
        if keys in where:
            shown = ".".join(keys)
            raise ConfigError(f"Config key '{shown}' is given both in '{where[keys]}' and in '{source}' (merged "
                              f"through '{TUNED_KEY}' of '{path}'); keep one of them.")
        where[keys] = source

    for key, value in data.items():
        if isinstance(value, Mapping) and key in METHODS:
            for option in value:
                note((key, option), path)
        else:
            note((key,), path)
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for tuned in files:
        chosen = _read_toml(tuned)
        for key, value in chosen.items():
            if key == TUNED_KEY:
                raise ConfigError(f"Tuned file '{tuned}' (named by '{TUNED_KEY}' in '{path}') names '{TUNED_KEY}' "
                                  "itself; a tuned file holds chosen values only.")
            if key in METHODS and isinstance(value, Mapping):
                for option, v in value.items():
                    note((key, option), tuned)
                    merged.setdefault(key, {})[option] = v
            elif key in RunConfig.model_fields and key != "method_options":
                note((key,), tuned)
                merged[key] = value
            else:
                raise ConfigError(f"Tuned file '{tuned}' (named by '{TUNED_KEY}' in '{path}'): key '{key}' is "
                                  f"neither a config key nor a method table ({_method_tables()}).")
    return merged


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``key=value`` strings (dotted keys for method tables) to a config dict.

    Raises
    ------
    ConfigError
        An item without ``=``, or a dotted key whose table is a plain value.
    """
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value. Got {item!r}.")
        value = parse_value(text.strip())
        if "." in key:
            table, sub = key.split(".", 1)
            if not isinstance(data.setdefault(table, {}), dict):
                raise ConfigError(f"Config key {key!r}: expected {table!r} to be a method table; "
                                  f"got {_show(data[table])}.")
            data[table][sub] = value
        else:
            data[key] = value
    return data


# ----------------------------------------------------------------------------- reference (docs/config.md)


def _type_text(annotation: Any, metadata=()) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_text(args[0], [*args[1:], *metadata])
    if origin is Literal:
        text = " or ".join(f"`{a}`" for a in args)
    elif origin is Union or type(annotation).__name__ == "UnionType":
        text = " or ".join(_type_text(a) for a in args if a is not type(None))
        text += " or absent" if type(None) in args else ""
    elif origin is list:
        text = f"list of {_type_text(args[0])}"
    elif origin is dict or annotation in (Fault, Attack):
        text = "table"
    else:
        text = getattr(annotation, "__name__", str(annotation))
    bounds = [f"{op} {getattr(m, attr)}" for m in metadata
              for attr, op in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
              if isinstance(m, getattr(annotated_types, attr.capitalize()))]
    return " ".join([text, " and ".join(bounds)]) if bounds else text


def _rows(model: type[BaseModel], skip=()) -> list[str]:
    rows = []
    for key, field in model.model_fields.items():
        if key in skip:
            continue
        value = None if field.is_required() else field.get_default(call_default_factory=True)
        default = "absent" if value is None else f"`{json.dumps(value)}`"
        default = "required" if field.is_required() else default
        kind = _type_text(field.annotation, field.metadata)
        rows.append(f"| `{key}` | {kind} | {default} | {field.description} |")
    return rows


def config_reference() -> str:
    r"""Markdown tables of every config key, every method's options and the ``[[faults]]`` keys.

    ``docs/config.md`` holds this text (a test checks that it is current).
    """
    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    parts = ["### Top-level keys", "", *head, *_rows(RunConfig, skip={"method_options"}), "",
             "### Method tables", "",
             "One optional table per method, named after it; no table means the method's defaults.", ""]
    plain = [m for m, cls in METHODS.items() if not cls.Options.model_fields]
    for name, cls in METHODS.items():
        if cls.Options.model_fields:
            parts += [f"`[{name}]` ({cls.title}):", "", *head, *_rows(cls.Options), ""]
    if plain:
        parts += ["No options (an empty table or none): " + ", ".join(f"`[{m}]`" for m in plain) + ".", ""]
    parts += ["### `[[faults]]` entries", "", *head, *_rows(Fault), ""]
    parts += ["### `[[attacks]]` entries", "", *head, *_rows(Attack), ""]
    return "\n".join(parts)
