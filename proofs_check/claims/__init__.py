"""Claim modules; importing this package registers every claim."""

from . import aggregation, clair  # noqa: F401
