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
#: check name -> the names of the Records it reports (the rows of the README table).
REPORTS: dict[str, tuple[str, ...]] = {}


def claim(name: str, reports: tuple[str, ...] | None = None) -> Callable[[ClaimFn], ClaimFn]:
    """Register a check under ``name``; ``reports`` names the Records it returns (default: ``(name,)``)."""

    def register(fn: ClaimFn) -> ClaimFn:
        if name in CLAIMS:
            raise ValueError(f"Claim {name!r} is registered twice.")
        CLAIMS[name] = fn
        REPORTS[name] = tuple(reports or (name,))
        return fn

    return register


def claim_names() -> list[str]:
    """Every claim a run can report, in order (the names ``--only`` takes and the README table shows)."""
    return [r for name in CLAIMS for r in REPORTS[name]]


def checks_for(names) -> list[str]:
    """The checks that report the given claim names (a check's own name also selects it)."""
    wanted = set(names)
    return [c for c in CLAIMS if c in wanted or wanted & set(REPORTS[c])]


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
        extra = sorted({r.claim for r in got} - set(REPORTS[name]) - {name})
        if extra:
            raise ValueError(f"Check {name!r} reported {extra}, which it does not declare; declared {REPORTS[name]}.")
        for r in got:
            records.append(Record(**{**asdict(r), "seconds": seconds / len(got), "check": name}))
    return records
