"""Claim registry and the record each claim returns."""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Record:
    """One checked claim: what theory predicts, what was measured, and whether they agree."""

    claim: str
    prediction: str
    measured: float
    tolerance: str
    passed: bool
    seconds: float = 0.0
    details: dict = field(default_factory=dict)
    figure: str | None = None
    check: str = ""  # the registered claim function that produced this record (set by run_claims)

    def to_json(self) -> dict:
        out = asdict(self)
        if isinstance(self.measured, float) and not math.isfinite(self.measured):
            out["measured"] = str(self.measured)
        return out


@dataclass(frozen=True)
class Context:
    """What a claim gets: the size preset, an output folder for figures, a seed."""

    quick: bool
    out: Path
    seed: int = 0


ClaimFn = Callable[[Context], list[Record]]
CLAIMS: dict[str, ClaimFn] = {}


def claim(name: str) -> Callable[[ClaimFn], ClaimFn]:
    """Register a claim function under ``name`` (it returns one or more Records)."""

    def register(fn: ClaimFn) -> ClaimFn:
        if name in CLAIMS:
            raise ValueError(f"Claim {name!r} is registered twice.")
        CLAIMS[name] = fn
        return fn

    return register


def run_claims(names, ctx: Context) -> list[Record]:
    """Run the named claims; a claim that raises is recorded as failed with its error."""
    records = []
    for name in names:
        start = time.perf_counter()
        try:
            got = CLAIMS[name](ctx)
        except Exception as exc:  # a crash is a failed check, reported, not a crashed run
            got = [
                Record(name, "runs without error", float("nan"), "-", False,
                       details={"error": repr(exc), "traceback": traceback.format_exc()})
            ]
        seconds = time.perf_counter() - start
        for r in got:
            records.append(Record(**{**asdict(r), "seconds": seconds / len(got), "check": name}))
    return records
