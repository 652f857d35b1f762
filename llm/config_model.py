r"""The run config's model, :class:`RunConfig`: every key, its default, its bounds, the checks across keys.

Checked against name tables only (:mod:`.catalog`, :mod:`.methods.registry`), so validating a config imports no
torch, transformers or PEFT (``device = "cuda"`` alone imports torch, to ask whether CUDA is there). Every problem
is one line of :class:`~lowrank_fed.llm.config_errors.ConfigError` (``Config key 'KEY': expected ...; got ...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import (ConfigDict, Field, PositiveInt, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .catalog import DATASETS, LORA_SCALINGS, MODELS, RANK_DISTRIBUTIONS, attack_counts
from .config_entries import (MAX_LOCAL_EPOCHS, MAX_LOCAL_STEPS, MAX_ROUNDS, Attack, Fault, MethodName,
                             RankSpec, Site, available_cores, device_problem, method_tables, option_list)
from .config_errors import _expected, _fail
from .config_forms import ConfigForms
from .methods.registry import REGISTRY, method_options
from .sources import absolute, adapter_problem, data_problem, is_packaged_model, model_problem, model_task

__all__ = ["RunConfig"]


class RunConfig(ConfigForms):
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
    model: str = Field("minilm", min_length=1, description=(
        "the model: a packaged name (" + ", ".join(f"`{m}` ({s.task})" for m, s in MODELS.items()) + "), a folder "
        "holding a Hugging Face model (`config.json` and its weights), or a hub name found in the local Hugging Face "
        "cache (never downloaded); docs/models.md"))
    task: Union[Literal["classification", "generation"], None] = Field(None, description=(
        "`classification` or `generation`; absent: the packaged model's, or inferred from the model's architecture "
        "(`...ForCausalLM`: generation, an encoder or `...ForSequenceClassification`: classification)"))
    dataset: str = Field("bbc_news", description=(
        "a packaged dataset of the model's task (" + ", ".join(f"`{d}` ({t})" for d, t in DATASETS.items())
        + "), or a data file (`.jsonl`, `.json`, `.csv`, `.parquet`) or `save_to_disk` folder with the columns "
        "below; with `[[clients]]` tables: the server's evaluation data, a file or folder (absent: each site holds "
        "out `test_fraction` of its own; needed on Flower, whose server never opens a site's file)"))
    text_column: str = Field("text", min_length=1, description="classification: the column of the input text")
    label_column: str = Field("label", min_length=1, description=(
        "classification: the column of the label (strings or integers)"))
    prompt_column: str = Field("prompt", min_length=1, description="generation: the column of the prompt")
    response_column: str = Field("response", min_length=1, description=(
        "generation: the column of the response (the loss is on its tokens only)"))
    messages_column: Union[str, None] = Field(None, min_length=1, description=(
        "generation: a column of chat `messages` (lists of `{role, content}`; the last assistant turn is the "
        "response) instead of `prompt_column` / `response_column`"))
    labels: list[str] = Field([], description=(
        "classification: the label set, fixed before training (absent: the union of the labels of every data "
        "source; with `[[clients]]` and a `dataset`: the dataset's labels; a label outside it is an error)"))
    test_fraction: float = Field(0.2, gt=0, lt=1, allow_inf_nan=False, description=(
        "share of a data file without a test split (or of each `[[clients]]` source when `dataset` is absent) "
        "held out for evaluation, drawn per label from the seed"))
    sites: list[Site] = Field([], description=(
        "clients that hold their own data: write `[[clients]]` tables with `data`, `rank` and an optional "
        "`weight` (then `clients` and `ranks` follow from them; see below)"))
    init_adapter: Union[str, None] = Field(None, min_length=1, description=(
        "a PEFT adapter folder: every client's starting point and the server's first global state (its Delta W "
        "exactly where the global rank holds the adapter's rank, else the best approximation; docs/methods.md, "
        "\"Starting from an adapter\")"))
    gradient_checkpointing: bool = Field(False, description=(
        "recompute activations in the backward pass (less memory, more time)"))
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
    target_modules: list[str] = Field([], description=(
        "modules that get LoRA adapters; empty: the packaged model's, or PEFT's default for the model's `model_type`"))
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
    val_downloads: bool = Field(False, description=(
        "also score what each client downloads on its share of the validation split, for methods that are not "
        "personalised: rows get val_local_<metric> (val_benign_local_* with attacks), what `lowrank-fed tune "
        "--score-on downloads` compares; one more validation pass per rank whose download is not the global model"))
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

    @model_validator(mode="before")
    @classmethod
    def _client_tables(cls, data: Any) -> Any:
        """``[[clients]]`` tables (``clients`` a list of tables) become ``sites``; ``clients`` is their number, ``ranks``
        their ranks, and ``dataset`` is empty (no server data) unless given. ``ranks`` and ``sites`` may not be given
        with them."""
        if not isinstance(data, Mapping) or not isinstance(data.get("clients"), list):
            return data
        tables = data["clients"]
        for key in ("ranks", "sites"):
            if key in data:
                _fail(((key,), f"no {key!r} with [[clients]] tables (each table gives its client's rank and data)",
                       data[key]))
        ranks = [t.get("rank") if isinstance(t, Mapping) else None for t in tables]
        valid = all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks)
        return {**data, "clients": len(tables), "sites": tables, "ranks": ranks if valid else 1,
                "dataset": data.get("dataset", "")}

    @field_validator("model")
    @classmethod
    def _model_exists(cls, model: str) -> str:
        problem = model_problem(model)
        if problem is not None:
            _fail(((), problem, model))
        return absolute(model) if not is_packaged_model(model) and Path(model).expanduser().is_dir() else model

    @field_validator("task")
    @classmethod
    def _task_fits_model(cls, task: str | None, info: ValidationInfo) -> str | None:
        model = info.data.get("model")
        if task is not None and model in MODELS and MODELS[model].task != task:
            _fail(((), f"{MODELS[model].task!r} for the packaged model {model!r} (or no task)", task))
        if task is None and model is not None and model not in MODELS:
            try:  # the user's model: its task from config.json's architectures (the rest is checked at set-up)
                model_task(model)
            except ValueError as err:
                _fail(((), f"a task for model {model!r} ({err})", task))
        return task

    @field_validator("dataset")
    @classmethod
    def _dataset_task(cls, dataset: str, info: ValidationInfo) -> str:
        model = info.data.get("model")
        if dataset in DATASETS:
            task = info.data.get("task") or (MODELS[model].task if model in MODELS else
                                             model_task(model) if model is not None and "task" in info.data else None)
            if task is not None and DATASETS[dataset] != task:
                fitting = ", ".join(repr(d) for d, t in DATASETS.items() if t == task)
                _fail(((), f"a {task} dataset for model {model!r} ({fitting}), or a data file", dataset))
        elif dataset:
            problem = data_problem(dataset)
            if problem is not None:
                _fail(((), problem, dataset))
            return absolute(dataset)
        return dataset

    @field_validator("sites")
    @classmethod
    def _sites_exist(cls, sites: list[Site], info: ValidationInfo) -> list[Site]:
        # each site's file is checked where it is read (sites.check_site_paths: the in-process runner, lowrank-fed
        # flower up, a node), never here: a Flower server validates this config and holds no site's file
        if not sites and info.data.get("dataset") == "":
            _fail(((), "[[clients]] tables, since `dataset` is empty (a run without them needs a dataset)", sites))
        return [s.model_copy(update={"data": absolute(s.data)}) for s in sites]

    @field_validator("init_adapter")
    @classmethod
    def _adapter_exists(cls, path: str | None) -> str | None:
        problem = None if path is None else adapter_problem(path)
        if problem is not None:
            _fail(((), problem, path))
        return None if path is None else absolute(path)

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
        clients, rounds = info.data.get("clients"), info.data.get("rounds")
        errors, seen = [], {}
        for i, a in enumerate(attacks):
            if rounds is not None and a.from_round > rounds:
                errors.append(((i, "from_round"), f"an integer in [1, rounds] = [1, {rounds}]", a.from_round))
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
