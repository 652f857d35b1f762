r"""Config errors: one message template, ``Config key 'KEY': expected EXPECTED; got VALUE.``

Every problem a run config can have becomes one line of a :class:`ConfigError` in this form (``KEY`` a dotted
path: ``hetlora.lam``, ``faults[0].client``, ``ranks[2]``); :func:`config_line` writes it, for pydantic's errors
(through :func:`expected_text`) and for the checks made outside validation alike. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = ["ConfigError", "config_line", "show_value", "expected_text"]


def config_line(key: str, expected: str, value: Any) -> str:
    """The one template: ``Config key 'KEY': expected EXPECTED; got VALUE.`` (the value's repr, cut at 100)."""
    return f"Config key '{key}': expected {expected}; got {_show(value)}."


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
        return cls("\n".join(config_line(key, expected, value) for key, expected, value in errors), errors)


def _fail(*errors: tuple[tuple, str, Any]):
    """Raise ``(loc, expected, value)`` errors from inside a validator (pydantic prefixes the field's loc)."""
    if not errors:
        return
    raise ValidationError.from_exception_data("RunConfig", [
        InitErrorDetails(type=PydanticCustomError("config", "{expected}", {"expected": expected}), loc=loc,
                         input=value)
        for loc, expected, value in errors])



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



class _Missing:
    def __repr__(self) -> str:
        return "nothing"



#: Public spellings of the helpers above.
show_value = _show
expected_text = _expected
