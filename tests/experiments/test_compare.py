"""The aggregation comparison behind `lowrank-fed compare` and the notebooks."""

from __future__ import annotations

import math

import pytest

from lowrank_fed.cli import main
from lowrank_fed.experiments.compare import compare_rules, heterogeneous_clients


def test_compare_rules_measures_exactness_and_dilution():
    pairs, weights = heterogeneous_clients((8, 4, 2, 2), 40, 30, seed=1)
    rows = {row.rule: row for row in compare_rules(pairs, weights, repeats=1)}
    assert rows["stack"].rel_error < 1e-12 and rows["svd"].rel_error < 1e-12
    assert rows["stack"].rank == 16
    assert rows["segment"].rel_error == pytest.approx(rows["replication"].rel_error, rel=1e-10)
    assert rows["segment"].mean_dilution == pytest.approx(1.0)
    assert rows["zero_pad"].mean_dilution < 0.9  # slots 2..7 are shrunk by the clients without them
    assert math.isnan(rows["fedavg"].rel_error) and rows["fedavg"].note == "needs equal ranks"


def test_compare_command_prints_both_scenarios(capsys):
    assert main(["compare", "--ranks", "4", "2", "--d-out", "24", "--d-in", "16"]) == 0
    out = capsys.readouterr().out
    assert "heterogeneous ranks [4, 2]" in out and "equal ranks [16] x 2" in out
    for rule in ("fedavg", "zero_pad", "replication", "segment", "slotwise", "stack", "svd"):
        assert rule in out


def test_unknown_subcommand_exits_with_usage(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err
