r"""The run config's model, :class:`RunConfig`: every key, its default, its bounds, the checks across keys.

Checked against name tables only (:mod:`.catalog`, :mod:`.methods.registry`), so validating a config imports no
torch, transformers or PEFT (``device = "cuda"`` alone imports torch, to ask whether CUDA is there). Every problem
is one line of :class:`~lowrank_fed.llm.config_errors.ConfigError` (``Config key 'KEY': expected ...; got ...``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, PositiveInt, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .catalog import DATASETS, LORA_SCALINGS, MODELS, RANK_DISTRIBUTIONS, attack_counts
from .config_entries import (MAX_LOCAL_EPOCHS, MAX_LOCAL_STEPS, MAX_ROUNDS, WORKERS_ENV, Attack, Fault, MethodName,
                             RankSpec, _flat_value, _unflat_value, available_cores, convert_error,
                             device_problem, method_tables, option_list, same_run_keys)
from .config_errors import ConfigError, _expected, _fail, _show
from .methods.registry import REGISTRY, method_options

__all__ = ["RunConfig"]


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
    methods: list[MethodName] = Field(
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

    def workers_chosen(self) -> bool:
        """Whether the user chose the number of workers (``workers`` or ``LOWRANK_FED_WORKERS``), not the default."""
        return bool(self.workers or os.environ.get(WORKERS_ENV))

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
        expected = device_problem(device)
        if expected is not None:
            _fail(((), expected, device))
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
            if name not in REGISTRY:
                errors.append(((name,), f"a method table, one of {method_tables()}", table))
            elif not isinstance(table, Mapping):
                errors.append(((name,), f"a table of {name} options", table))
            else:
                Options = method_options(name)
                try:
                    opts = Options.model_validate(dict(table))
                except ValidationError as err:
                    for e in err.errors():
                        expected = (option_list(name) if e["type"] == "extra_forbidden" else _expected(e))
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
            for name in [k for k in data if k in REGISTRY]:
                table = data.pop(name)
                merge = isinstance(options.get(name), dict) and isinstance(table, Mapping)
                options[name] = {**options[name], **table} if merge else table
        try:
            return cls.model_validate({**data, "method_options": options})
        except ValidationError as err:
            raise ConfigError.from_errors([convert_error(e, list(cls.model_fields)) for e in err.errors()]) from None

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

