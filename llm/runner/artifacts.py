r"""What a run writes besides its rows: the final adapters, and the check that a resumed run's config is unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError, RunConfig, computed_keys, same_run_keys
from ..methods import Method, ServerState
from ..models import base_model_name
from ..peft_bridge import pairs_to_state_dict
from .checkpoint import atomic_write_text, peek_state, save_tensors
from .state import state_to_flat

__all__ = ["save_final", "check_resume"]


def _shown(value) -> str:
    """A config value as it reads in TOML / JSON (``(absent)`` for a missing key), at most 100 characters."""
    text = "(absent)" if not isinstance(value, (dict, list, str, int, float, bool, type(None))) else json.dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."


def save_final(out: Path, method: Method, server: ServerState, ws, model: str) -> None:
    r"""``adapters/<method>.safetensors`` (the final server state, :func:`~.state.state_to_flat`) and, where the method
    exports one, the global adapter in PEFT format (``adapters/<method>-peft/``; ``base_model_name_or_path``: a
    packaged model's hub name, a model folder's absolute path, or the hub name, :func:`~..models.base_model_name`)."""
    folder = out / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    tensors, meta = state_to_flat(server, {})
    save_tensors(folder / f"{method.name}.safetensors", tensors,
                 {"method": method.name, "round": server.round, "convention": "folded: B @ A = Delta W",
                  "state": meta["server"]})
    pairs = method.export_pairs(server)
    if pairs:  # the global adapter in PEFT format (FLoRA: its merges, compressed to their numerical rank)
        peft_dir = folder / f"{method.name}-peft"
        peft_dir.mkdir(exist_ok=True)
        config = ws.config_for({m: p.rank for m, p in pairs.items()})
        config.base_model_name_or_path = base_model_name(model)
        config_dict = config.to_dict()
        config_dict["target_modules"] = sorted(config_dict["target_modules"])
        atomic_write_text(peft_dir / "adapter_config.json", json.dumps(config_dict, indent=2, sort_keys=True))
        save_tensors(peft_dir / "adapter_model.safetensors", pairs_to_state_dict(pairs, config, server.extras))


def check_resume(out: Path, now: dict) -> None:
    r"""Refuse to resume the run in ``out`` if its config ``now`` (:meth:`RunConfig.definition`) differs from the one
    its checkpoints were written with.

    Every checkpoint stores the whole run config (``state.json``, key ``"config"``). Each method's
    newest verified ``state.json`` (:func:`~.checkpoint.peek_state`) is compared with this run's config,
    key by key. No key may differ: every one of them (ranks, rounds, seeds, data sizes, even ``threads``,
    ``device`` and ``dtype``, which can change the floating-point results) is part of what the checkpoints
    hold, and a resumed run must reach the bytes an uninterrupted run of one config reaches. Progress
    bars are a command-line flag, not a config key; ``workers`` and ``checkpoint``
    (:data:`~lowrank_fed.llm.config.EXECUTION_KEYS`) are neither stored in checkpoints nor compared: any number of
    workers gives the same bytes, and a run may be resumed with checkpointing turned off or on, nor are the
    option tables of methods the run does not train (:func:`~lowrank_fed.llm.config.computed_keys`). Checkpoints
    written before the config was stored in them, and methods with no verified ``state.json``, are not
    checked. A key a checkpoint does not hold (added to the config since it was written, such as
    ``lora_scaling``) counts as its default, the behaviour from before the key existed. Reads only; writes
    nothing.

    Raises
    ------
    ConfigError
        One line naming the checkpoint, each key that differs, its checkpointed and its present value.
    """
    folder = out / "checkpoints"
    if not folder.is_dir():
        return
    defaults, now = RunConfig().definition(), computed_keys(now)
    for path in sorted(p for p in folder.iterdir() if p.is_dir()):
        found = peek_state(path)
        if found is None or not isinstance(found[1], dict) or not isinstance(found[1].get("config"), dict):
            continue
        where, stored = found[0], same_run_keys(found[1]["config"])
        stored = computed_keys({**{k: v for k, v in defaults.items() if k not in stored}, **stored})
        if stored == now:
            continue
        missing = object()
        diffs = [f"{key} checkpointed {_shown(stored.get(key, missing))}, now {_shown(now.get(key, missing))}"
                 for key in sorted(set(stored) | set(now)) if stored.get(key, missing) != now.get(key, missing)]
        raise ConfigError(f"Cannot resume the run in '{out}': its config ('{out / 'config.json'}') "
                          f"differs from the one its checkpoints were written with ('{where / 'state.json'}'): "
                          f"{'; '.join(diffs)}. Put the checkpointed values back, or start a new run in "
                          f"another folder; nothing was changed.")

