r"""The one registry of methods: name -> where its class is, and its options model; importing no torch.

Adding a method is one new file (a :class:`~lowrank_fed.llm.methods.base.Method` subclass) plus one line in
:data:`REGISTRY` (or one :func:`register_method` call, for a method that lives outside the package). Everything
that lists methods reads this table: the config's ``methods`` and ``[method]`` tables
(:mod:`lowrank_fed.llm.config`), :data:`METHODS` and :func:`make_method`, ``lowrank-fed tune``, and the method
tables of ``docs/config.md`` (:func:`~lowrank_fed.llm.config.config_reference`, generated; a test checks the
file is current).

A line is ``name: ("module:Class", "module:Options")``, modules relative to this package. The options model is
read without importing the class, so checking a config imports no torch as long as the model lives in a
torch-free module (:mod:`.options` for the packaged methods). The class is imported when first asked for, and
it must be consistent with its line: ``cls.name == name`` and ``cls.Options`` is the named model
(:class:`TypeError` otherwise).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["REGISTRY", "METHODS", "register_method", "method_options", "method_class", "make_method",
           "method_names"]

#: name -> ("module:Class", "module:OptionsModel"); a leading "." is relative to :mod:`lowrank_fed.llm.methods`.
#: The order is the order of docs/config.md and of every listing.
REGISTRY: dict[str, tuple[str | type, str | type]] = {
    "fedit": (".fedit:FedIT", ".options:PairOptions"),
    "ffa": (".ffa:FFALoRA", ".options:Options"),
    "fedsa": (".fedsa:FedSALoRA", ".options:Options"),
    "hetlora": (".hetlora:HetLoRA", ".options:HetLoRAOptions"),
    "replication": (".replication:Replication", ".options:PairOptions"),
    "flora": (".flora:FLoRA", ".options:Options"),
    "flexlora": (".flexlora:FlexLoRA", ".options:Options"),
    "prelort": (".prelort:PreLort", ".options:PreLortOptions"),
    "hafl": (".hafl:HAFL", ".options:HAFLOptions"),
    "lora_a2": (".lora_a2:LoRAA2", ".options:LoRAA2Options"),
    "clair": (".clair:CLAIR", ".options:CLAIROptions"),
    "oracle": (".clair:Oracle", ".options:Options"),
    "clair_nodetect": (".clair:ClairNoDetect", ".options:ClairNoDetectOptions"),
    "local": (".local:Local", ".options:Options"),
}


def _resolve(where: str | type) -> Any:
    """``"module:Name"`` -> the object (a class given as such is returned as is)."""
    if not isinstance(where, str):
        return where
    module, _, name = where.partition(":")
    package = __name__.rpartition(".")[0] if module.startswith(".") else None
    return getattr(importlib.import_module(module, package), name)


def _entry(name: str) -> tuple[str | type, str | type]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; expected one of {sorted(REGISTRY)}.") from None


def method_names() -> tuple[str, ...]:
    """The registered names, in registry order."""
    return tuple(REGISTRY)


def method_options(name: str) -> type:
    """The ``Options`` model of method ``name`` (a pydantic model of its ``[name]`` table), without its class.

    Raises
    ------
    ValueError
        An unknown name (the message lists the valid ones).
    """
    return _resolve(_entry(name)[1])


def method_class(name: str) -> type:
    """The :class:`~lowrank_fed.llm.methods.base.Method` subclass of ``name`` (imported on first use).

    Raises
    ------
    ValueError
        An unknown name.
    TypeError
        The class disagrees with its registry line (another ``name``, another ``Options`` model).
    """
    cls = _resolve(_entry(name)[0])
    if getattr(cls, "name", None) != name or cls.Options is not method_options(name):
        raise TypeError(f"Method registry line {name!r}: expected a Method class with name = {name!r} and Options = "
                        f"{method_options(name).__name__}; got {cls!r} (name = {getattr(cls, 'name', None)!r}, "
                        f"Options = {getattr(getattr(cls, 'Options', None), '__name__', None)}).")
    return cls


def register_method(name: str, method: str | type, options: str | type | None = None) -> None:
    r"""Add a method to :data:`REGISTRY`: the one line a method defined outside this package needs.

    Parameters
    ----------
    name : str
        The method's config name (a ``methods`` entry and its ``[name]`` table).
    method : "module:Class" or the class
    options : "module:Options", the model, or None
        None: the class's own ``Options`` (then ``method`` must be the class, or checking a config naming it
        imports the class's module).

    Raises
    ------
    ValueError
        ``name`` is already registered, or is not a word (letters, digits, ``_``).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"Method name: expected a word of letters, digits and '_'; got {name!r}.")
    if name in REGISTRY:
        raise ValueError(f"Method name {name!r}: expected a new name; it is registered already ({REGISTRY[name][0]}).")
    if options is None:
        options = _resolve(method).Options
    REGISTRY[name] = (method, options)


class _MethodTable(Mapping):
    """:data:`METHODS`: name -> Method class, read from :data:`REGISTRY` on each access (names need no import)."""

    def __getitem__(self, name: str) -> type:
        if name not in REGISTRY:
            raise KeyError(name)
        return method_class(name)

    def __contains__(self, name: object) -> bool:
        return name in REGISTRY

    def __iter__(self) -> Iterator[str]:
        return iter(list(REGISTRY))

    def __len__(self) -> int:
        return len(REGISTRY)

    def __repr__(self) -> str:
        return f"METHODS({list(REGISTRY)})"


#: name -> Method class, in registry order (a live view of :data:`REGISTRY`; a class is imported when asked for).
METHODS: Mapping[str, type] = _MethodTable()


def make_method(name: str, **options):
    """A method by name (a key of :data:`METHODS`) with its options.

    Raises
    ------
    ValueError
        An unknown name (the message lists the valid ones), or options its ``Options`` model rejects.
    """
    if name not in REGISTRY:
        raise ValueError(f"Unknown method {name!r}; expected one of {sorted(REGISTRY)}.")
    return METHODS[name](**options)
