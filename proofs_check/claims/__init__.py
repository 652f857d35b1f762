"""Claim modules; importing this package registers every claim."""

from . import aggregation  # noqa: F401
