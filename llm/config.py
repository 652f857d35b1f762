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
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel

from .catalog import RANK_NAMES
from .config_entries import (EXECUTION_KEYS, MAX_LOCAL_EPOCHS, MAX_LOCAL_STEPS, MAX_ROUNDS, WORKERS_ENV, Attack,
                             Fault, MethodName, RankSpec, Site, _Registered, available_cores, computed_keys,
                             same_run_keys)
from .config_errors import ConfigError, config_line
from .config_files import TUNED_KEY, apply_overrides, load_config, parse_value, tuned_paths
from .config_model import RunConfig
from .methods.registry import METHODS, REGISTRY, method_options

__all__ = ["RunConfig", "Fault", "Attack", "Site", "ConfigError", "load_config", "apply_overrides", "parse_value", "TUNED_KEY",
           "tuned_paths", "config_reference", "EXECUTION_KEYS", "same_run_keys", "computed_keys", "WORKERS_ENV", "available_cores",
           "config_line", "MAX_ROUNDS", "MAX_LOCAL_STEPS", "MAX_LOCAL_EPOCHS", "RANK_NAMES", "RankSpec", "MethodName"]


# ----------------------------------------------------------------------------- reference (docs/config.md)


def _type_text(annotation: Any, metadata=()) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        if any(isinstance(m, _Registered) for m in args[1:]):  # a method name: the names registered now
            return " or ".join(f"`{m}`" for m in REGISTRY)
        return _type_text(args[0], [*args[1:], *metadata])
    if origin is Literal:
        text = " or ".join(f"`{a}`" for a in args)
    elif origin is Union or type(annotation).__name__ == "UnionType":
        text = " or ".join(_type_text(a) for a in args if a is not type(None))
        text += " or absent" if type(None) in args else ""
    elif origin is list:
        text = f"list of {_type_text(args[0])}"
    elif origin is dict or annotation in (Fault, Attack, Site):
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
    r"""Markdown tables of every config key, every registered method, its options, the ``[[faults]]`` and
    ``[[attacks]]`` keys: generated from :class:`RunConfig` and the method registry
    (:data:`~lowrank_fed.llm.methods.registry.REGISTRY`), so a registered method is listed without editing a doc.

    ``docs/config.md`` holds this text (a test checks that it is current). Imports the method classes (their
    titles and server rules), so torch.
    """
    head = ["| key | type | default | meaning |", "|---|---|---|---|"]
    parts = ["### Top-level keys", "", *head, *_rows(RunConfig, skip={"method_options"}), "",
             "### Methods", "",
             "The names `methods` takes, in the order of the method registry (`lowrank_fed.llm.methods.registry`: a "
             "new method is one file plus one line there).", "",
             "| name | method | server rule |", "|---|---|---|",
             *[f"| `{m}` | {METHODS[m].title} | `{METHODS[m].rule}` |" for m in REGISTRY], "",
             "### Method tables", "",
             "One optional table per method, named after it; no table means the method's defaults.", ""]
    plain = [m for m in REGISTRY if not method_options(m).model_fields]
    for name in REGISTRY:
        if method_options(name).model_fields:
            parts += [f"`[{name}]` ({METHODS[name].title}):", "", *head, *_rows(method_options(name)), ""]
    if plain:
        parts += ["No options (an empty table or none): " + ", ".join(f"`[{m}]`" for m in plain) + ".", ""]
    parts += ["### `[[faults]]` entries", "", *head, *_rows(Fault), ""]
    parts += ["### `[[attacks]]` entries", "", *head, *_rows(Attack), ""]
    parts += ["### `[[clients]]` entries", "", *head, *_rows(Site), ""]
    return "\n".join(parts)
