r"""Start a run from a PEFT adapter (``init_adapter``): the adapter folder read against the run's model (its modules,
shapes and head checked), with the scale folded in (``B = s_a B_a``, so ``B A = \Delta W_0``). The round-0 global pairs
a method builds from it, exact where its global rank allows and the best rank-``R`` approximation where it does not,
are :mod:`lowrank_fed.llm.methods.start`'s (the equations are there; re-exported here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lowrank_fed import FactorPair

from ..methods.start import start_pair, start_pairs
from .folders import load_peft_adapter

__all__ = ["Start", "read_start", "start_pair", "start_pairs"]


@dataclass(frozen=True)
class Start:
    r"""An adapter checked against a run's model: the starting point of every method.

    Attributes
    ----------
    path : str
        The adapter folder (``init_adapter``).
    pairs : dict module -> FactorPair
        Folded, ``B @ A = Delta W_0`` (float32, on the run's device); a subset of the run's adapted modules.
    extras : dict name -> tensor
        The adapter's head (``modules_to_save``), names and shapes as the run's head; empty: the run's fresh head.
    base_model : str or None
        The adapter config's ``base_model_name_or_path``.
    """

    path: str
    pairs: dict[str, FactorPair]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    base_model: str | None = None

    @property
    def ranks(self) -> dict[str, int]:
        return {m: p.rank for m, p in self.pairs.items()}


def read_start(path, shapes: Mapping[str, tuple[int, int]], extras: Mapping[str, torch.Tensor], *,
               device=None) -> Start:
    r"""Read the PEFT adapter folder ``path`` (:func:`~.folders.load_peft_adapter`) for a run whose adapted modules
    have ``shapes`` (module -> ``(d_out, d_in)``) and whose fresh head is ``extras``; the pairs in float32 on
    ``device``, the head in the dtype and on the device of ``extras``.

    Raises
    ------
    ValueError
        The folder is not a readable PEFT LoRA adapter (not a folder, no config or weights, a refused feature); an
        adapter module the run does not adapt (naming it and the run's modules); a module whose ``(d_out, d_in)``
        differs from the run's (naming the module and both shapes); a head weight the run's head lacks or of
        another shape. Every message names the folder.
    """
    where = str(path)
    try:
        adapter = load_peft_adapter(Path(path))
    except FileNotFoundError as err:
        raise ValueError(str(err)) from None
    unknown = sorted(set(adapter.pairs) - set(shapes))
    if unknown:
        raise ValueError(f"{where}: adapter module {unknown[0]!r} is not adapted by this run"
                         f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; expected modules among "
                         f"the run's {len(shapes)} adapted modules ({_listed(shapes)}); set target_modules to "
                         "include it.")
    for m, pair in adapter.pairs.items():
        if tuple(pair.shape) != tuple(shapes[m]):
            raise ValueError(f"{where}: module {m!r} has shape (d_out, d_in) = {tuple(pair.shape)} in the adapter, "
                             f"{tuple(shapes[m])} in the run's model; expected the same shape (an adapter of another "
                             "base model?).")
    head = {}
    for name, value in adapter.extras.items():
        if name not in extras:
            raise ValueError(f"{where}: head weight {name!r} (modules_to_save) is not in the run's head "
                             f"({_listed(extras)}); expected an adapter of this model and task.")
        if tuple(value.shape) != tuple(extras[name].shape):
            raise ValueError(f"{where}: head weight {name!r} has shape {tuple(value.shape)} in the adapter, "
                             f"{tuple(extras[name].shape)} in the run's model (the number of labels?); expected the "
                             "same shape.")
        head[name] = value.to(dtype=extras[name].dtype, device=extras[name].device)
    base = adapter.config.base_model_name_or_path if adapter.config is not None else None
    pairs = {m: FactorPair(p.B.to(dtype=torch.float32, device=device), p.A.to(dtype=torch.float32, device=device))
             for m, p in adapter.pairs.items()}
    return Start(where, pairs, head, base)


def _listed(names) -> str:
    names = sorted(names)
    return ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "") if names else "none"
