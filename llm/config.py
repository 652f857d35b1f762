r"""Run configuration: defaults (the embedded demo), TOML files, and ``--set key=value`` overrides.

A config file is TOML with top-level keys of :class:`RunConfig`; method options go in a table
named after the method (``[hetlora]`` ``lam = 0.01``) and faults in ``[[faults]]``. ``--set``
values are parsed as TOML values (``rounds=3``, ``methods=["fedit","flora"]``, ``ranks="flora"``);
a bare word that is not valid TOML is taken as a string (``dataset=20newsgroups``). Dotted keys
reach method tables: ``--set hetlora.lam=0.05``.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunConfig", "load_config", "apply_overrides", "parse_value"]


@dataclass
class RunConfig:
    r"""Every setting of ``lowrank-fed run``. The defaults are the embedded demo.

    The demo compares four methods on MiniLM fine-tuned for BBC News topics (5 classes) across
    10 non-IID clients (Dirichlet 0.5) with FLoRA's heterogeneous ranks.
    """

    name: str = "default"
    model: str = "minilm"  # minilm | smollm2 | tiny-bert | tiny-llama
    dataset: str = "bbc_news"  # bbc_news | 20newsgroups | bbc_headlines | synthetic | copy
    methods: list[str] = field(default_factory=lambda: ["fedit", "hetlora", "flora", "flexlora"])
    clients: int = 10
    clients_per_round: int = 0  # 0: all clients every round
    ranks: Any = "flora"  # list of ints, an int, or flora | uniform | heavy_tail | normal | top10
    rank_set: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    rounds: int = 4
    local_steps: int = 5
    local_epochs: int = 0  # > 0: that many passes over the client's data instead of local_steps
    batch_size: int = 8
    lr: float = 5e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    partition: str = "dirichlet"  # dirichlet | iid | pathological
    alpha: float = 0.5  # Dirichlet concentration
    classes_per_client: int = 2  # pathological split
    seed: int = 0
    max_length: int = 64
    lora_alpha: float = 16.0
    use_rslora: bool = False
    target_modules: list[str] = field(default_factory=list)  # empty: the model's default
    train_size: int = 0  # 0: the whole training split
    eval_size: int = 300
    eval_every: int = 1
    rouge_size: int = 16
    max_new_tokens: int = 24
    threads: int = 1
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    dtype: str = "float32"
    checkpoint: bool = True
    faults: list[dict] = field(default_factory=list)  # [{round=1, client=0, kind="nan"|"inf"|"shape"}]
    method_options: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunConfig":
        data = dict(data)
        options = {k: dict(v) for k, v in data.pop("method_options", {}).items()}
        from .methods import METHODS

        for name in list(data):
            if name in METHODS and isinstance(data[name], dict):
                options.setdefault(name, {}).update(data.pop(name))
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"Unknown config key(s) {unknown}; valid keys: {sorted(valid - {'method_options'})} "
                             f"and method tables {sorted(METHODS)}.")
        cfg = cls(**data, method_options=options)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check types and ranges; raise ``ValueError`` naming the key."""
        from .data import DATASETS
        from .methods import METHODS
        from .models import MODELS

        if self.model not in MODELS:
            raise ValueError(f"Config 'model': unknown {self.model!r}; expected one of {sorted(MODELS)}.")
        if self.dataset not in DATASETS:
            raise ValueError(f"Config 'dataset': unknown {self.dataset!r}; expected one of {sorted(DATASETS)}.")
        if MODELS[self.model].task != DATASETS[self.dataset]:
            raise ValueError(f"Config: model {self.model!r} does {MODELS[self.model].task} but dataset "
                             f"{self.dataset!r} is {DATASETS[self.dataset]}.")
        if isinstance(self.methods, str):
            self.methods = [self.methods]
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"Config 'methods': unknown {bad}; expected a non-empty list from {sorted(METHODS)}.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"Config 'methods' lists a method twice: {self.methods}.")
        for key in ("clients", "rounds", "batch_size", "max_length", "eval_size", "threads", "eval_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Config {key!r} must be a positive int. Got {value!r}.")
        for key in ("local_steps", "local_epochs", "clients_per_round", "train_size", "rouge_size", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"Config {key!r} must be a non-negative int. Got {value!r}.")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ValueError("Config: set 'local_steps' or 'local_epochs' to a positive value.")
        if self.clients_per_round > self.clients:
            raise ValueError(f"Config 'clients_per_round' ({self.clients_per_round}) exceeds 'clients' ({self.clients}).")
        if not self.lr > 0 or not self.alpha > 0 or not self.lora_alpha > 0:
            raise ValueError(f"Config 'lr', 'alpha' and 'lora_alpha' must be positive. Got {self.lr}, {self.alpha}, "
                             f"{self.lora_alpha}.")
        if not (self.device in ("auto", "cpu", "cuda") or str(self.device).startswith("cuda:")):
            raise ValueError(f"Config 'device' must be auto, cpu, cuda or cuda:N. Got {self.device!r}.")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise ValueError(f"Config 'dtype' must be float32, bfloat16 or float64. Got {self.dtype!r}.")
        if self.partition not in ("dirichlet", "iid", "pathological"):
            raise ValueError(f"Config 'partition' must be dirichlet, iid or pathological. Got {self.partition!r}.")
        for name, opts in self.method_options.items():
            if name not in METHODS:
                raise ValueError(f"Config table [{name}]: not a method; expected one of {sorted(METHODS)}.")
            METHODS[name](**opts)  # raises on unknown options
        for fault in self.faults:
            if set(fault) - {"round", "client", "kind", "method"} or fault.get("kind", "nan") not in ("nan", "inf", "shape"):
                raise ValueError(f"Config 'faults': entries are {{round, client, kind=nan|inf|shape, method?}}. Got {fault}.")


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML value if it parses as one, else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_config(path: str | Path | None = None) -> dict:
    """The TOML file as a dict (``{}`` for no file)."""
    if path is None:
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``key=value`` strings (dotted keys for method tables) to a config dict."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value. Got {item!r}.")
        key, text = item.split("=", 1)
        key, value = key.strip(), parse_value(text.strip())
        if "." in key:
            table, sub = key.split(".", 1)
            data.setdefault(table, {})[sub] = value
        else:
            data[key] = value
    return data
