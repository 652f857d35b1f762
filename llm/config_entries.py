r"""The parts of a run config below :class:`~lowrank_fed.llm.config.RunConfig`: limits, rank specs, method names,
``[[faults]]`` and ``[[attacks]]`` entries, and the flat form's values. Imports no torch.

Method names are checked against :data:`~lowrank_fed.llm.methods.registry.REGISTRY` when a config is validated,
not when this module is imported, so a method registered later (:func:`~lowrank_fed.llm.methods.register_method`)
is a valid ``methods`` entry, ``[[faults]]`` ``method`` and ``[method]`` table at once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, NonNegativeInt, PlainValidator, PositiveInt, Tag,
                      model_validator)
from pydantic_core import PydanticCustomError

from lowrank_fed.aggregation import available_cores

from .catalog import ATTACK_KINDS, RANK_NAMES
from .config_errors import _expected, _Missing
from .methods.registry import REGISTRY, method_options

__all__ = ["MAX_ROUNDS", "MAX_LOCAL_STEPS", "MAX_LOCAL_EPOCHS", "WORKERS_ENV", "EXECUTION_KEYS", "same_run_keys",
           "available_cores", "RankSpec", "MethodName", "Fault", "Attack", "method_tables", "option_list",
           "convert_error", "device_problem", "Site"]

#: Documented caps on the keys that set a run's length: far above any shipped config (at most 8 rounds of
#: 10 steps), low enough that a mistyped extra digit or three is refused instead of running for weeks.
#: The bounds that need the data, the model or the machine are checked at set-up (``runner/limits.py``).
MAX_ROUNDS = 10_000
MAX_LOCAL_STEPS = 10_000
MAX_LOCAL_EPOCHS = 100


#: The environment variable that ``workers = 0`` (the default) reads first (:meth:`RunConfig.worker_count`).
WORKERS_ENV = "LOWRANK_FED_WORKERS"

#: Keys that say how a run is computed, never what: every value gives the same outputs byte for byte, so
#: checkpoints do not store them, and a resumed or reused run may change them (``workers``: clients at once;
#: ``checkpoint``: whether each round is saved, which a resumed run reaches the same bytes with or without).
EXECUTION_KEYS = ("workers", "checkpoint")


def same_run_keys(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config (``config.json``'s or a checkpoint's) without :data:`EXECUTION_KEYS`."""
    return {k: v for k, v in stored.items() if k not in EXECUTION_KEYS}


def computed_keys(definition: Mapping[str, Any]) -> dict[str, Any]:
    """A whole definition (every key present) with only the option tables of the methods it trains.

    A method reads only its own table, so two definitions that differ in the table of a method neither trains
    compute the same bytes: a tune's one-method trial, a finished reproduction run and a checkpoint are all still
    the same run once the config's other tables change (e.g. after it is linked to its tuned rates).
    """
    methods = definition.get("methods", ())
    options = definition.get("method_options", {})
    return {**definition, "method_options": {m: t for m, t in options.items() if m in methods}}


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



class _Registered:
    """Marks :data:`MethodName` for the reference tables (``docs/config.md`` lists the registered names)."""


def _registered(value: Any) -> str:
    """A registered method name; else pydantic's ``literal_error`` listing the names (a ``Literal`` of them)."""
    if isinstance(value, str) and value in REGISTRY:
        return value
    names = [repr(m) for m in REGISTRY]
    expected = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})


#: A method name, one of :data:`~lowrank_fed.llm.methods.registry.REGISTRY` at validation time.
MethodName = Annotated[str, PlainValidator(_registered), _Registered()]


class Fault(BaseModel):
    r"""One ``[[faults]]`` entry: corrupt client ``client``'s reply in round ``round`` (tests the drops)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    round: int = Field(ge=1, description="round of the fault, 1 <= round <= rounds (required)")
    client: int = Field(ge=0, description="client id, 0 <= client < clients (required)")
    kind: Literal["nan", "inf", "shape"] = Field("nan", description=(
        "`nan` or `inf`: one entry of the reply becomes NaN / Inf; `shape`: one tensor loses a column"))
    method: Union[MethodName, None] = Field(
        None, description="only this method's run (one of `methods`); absent: every method")



class Site(BaseModel):
    r"""One ``[[clients]]`` entry: a client that holds its own data source (one site of a real federation).

    With ``[[clients]]`` tables the data is not partitioned: client ``k`` trains on the training rows of its own
    ``data`` (a JSONL, CSV or Parquet file, or a ``datasets`` ``save_to_disk`` folder, with the run's column names),
    at its own ``rank``; ``clients`` is the number of tables and ``ranks`` their ranks.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    data: str = Field(min_length=1, description="the client's data: a file (.jsonl, .json, .csv, .parquet) or a "
                                                "`save_to_disk` folder (required)")
    rank: PositiveInt = Field(description="the client's LoRA rank (required)")
    weight: Union[float, None] = Field(None, gt=0, allow_inf_nan=False, description=(
        "the client's aggregation weight (absent: its number of training examples)"))


class Attack(BaseModel):
    r"""One ``[[attacks]]`` entry: contaminated clients (the same clients for every method), from round ``from_round``.

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
    from_round: PositiveInt = Field(1, description=(
        "the first round the clients are contaminated in; before it they train on their own data and send "
        "their honest update (absent: 1, the whole run)"))

    @model_validator(mode="after")
    def _one_selector(self) -> "Attack":
        if (self.fraction is None) == (self.clients is None):
            raise ValueError("exactly one of 'fraction' and 'clients'")
        return self


def method_tables() -> str:
    """``[fedit], [ffa], ...``: the method tables a config may hold."""
    return ", ".join(f"[{m}]" for m in REGISTRY)


def option_list(method: str) -> str:
    """What an unknown key of ``[method]`` should have been (its options)."""
    options = list(method_options(method).model_fields)
    if not options:
        return f"no options ([{method}] takes none)"
    return f"an option of [{method}] ({', '.join(options)})"


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


def convert_error(error: Mapping[str, Any], top_keys: list[str]) -> tuple[str, str, Any]:
    """A pydantic error of :class:`~lowrank_fed.llm.config.RunConfig` (top-level keys ``top_keys``) as
    ``(key, expected, value)``, the parts of :func:`~lowrank_fed.llm.config_errors.config_line`."""
    loc = list(error["loc"])
    if loc[:1] == ["ranks"] and len(loc) > 1 and isinstance(loc[1], str):
        del loc[1]  # the union's tag (int | list | name)
    if loc[:1] == ["method_options"] and len(loc) > 1:
        del loc[0]  # [method] tables are written at the top level
    if loc[:1] == ["sites"] and len(loc) > 1:
        loc[0] = "clients"  # written as [[clients]] tables
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    value = error.get("input")
    if error["type"] == "extra_forbidden" and len(loc) == 1:
        keys = [k for k in top_keys if k != "method_options"]
        expected = f"a config key ({', '.join(keys)}) or a method table ({method_tables()})"
    elif error["type"] == "extra_forbidden" and loc[:1] in (["faults"], ["attacks"], ["clients"]):
        entry = {"faults": Fault, "attacks": Attack, "clients": Site}[loc[0]]
        expected = f"a key of a [[{loc[0]}]] entry ({', '.join(entry.model_fields)})"
    elif error["type"] == "string_pattern_mismatch" and loc == ["name"]:
        expected = "a folder name: letters, digits, '_', '-' and '.', starting with a letter, digit or '_'"
    elif error["type"] == "missing":
        expected, value = _expected(error), _Missing()
    else:
        expected = _expected(error)
    return key or "(config)", expected, value


def device_problem(device: str) -> str | None:
    """What ``device`` should have been (the ``expected`` of its error), or None when it exists here.

    ``auto`` and ``cpu`` always exist; ``cuda`` and ``cuda:N`` import torch to ask (only then).
    """
    if device in ("auto", "cpu"):
        return None
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        return "'auto', 'cpu', 'cuda' or 'cuda:N'"
    import torch

    if not torch.cuda.is_available():
        return "'auto' or 'cpu' (torch.cuda.is_available() is False here)"
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        return f"'cuda' or 'cuda:N' with N < {count} (torch.cuda.device_count())"
    return None
