r"""The forms of a run config (:class:`ConfigForms`, the base of :class:`~lowrank_fed.llm.config.RunConfig`): from a
dict, to a dict, to and from Flower's flat run config, the run's definition, and the workers it uses.

Kept apart from the keys and their checks (:mod:`.config_model`); imports no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from .config_entries import (WORKERS_ENV, _flat_value, _unflat_value, available_cores, computed_keys, convert_error,
                             same_run_keys)
from .config_errors import ConfigError, _show
from .methods.registry import REGISTRY

__all__ = ["ConfigForms"]


class ConfigForms(BaseModel):
    """How a :class:`~lowrank_fed.llm.config.RunConfig` is built, written and compared (its keys are its own)."""

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfigForms:
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

    def same_run(self, stored: Mapping[str, Any]) -> bool:
        """Whether a stored config (a run folder's ``config.json``) defines this run: equal :meth:`definition`, a
        key the stored one lacks (written before the key existed) taken at its default, and the option tables
        of methods neither trains left out (:func:`~.config_entries.computed_keys`)."""
        defaults = type(self)().definition()
        return computed_keys({**defaults, **same_run_keys(stored)}) == computed_keys(self.definition())

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
    def from_flat(cls, flat: Mapping[str, bool | int | float | str]) -> ConfigForms:
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
