"""`python -m proofs_check --quick` passes, and a failing claim makes the command fail."""

from __future__ import annotations

import json

import pytest

from pathlib import Path

from proofs_check import CLAIMS, Record, claim
from proofs_check._registry import REPORTS, claim_names
from proofs_check.__main__ import main


@pytest.mark.slow
def test_quick_run_passes_every_claim(tmp_path, capsys):
    status = main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "results.json").read_text())
    failed = [r for r in payload["records"] if not r["passed"]]
    assert status == 0, f"failed claims: {failed}"
    assert {r["check"] for r in payload["records"]} == set(CLAIMS)
    assert [r["claim"] for r in payload["records"]] == claim_names()
    assert "0 failed" in out
    for r in payload["records"]:
        if r["figure"]:
            assert (tmp_path / r["figure"].split("/")[-1]).stat().st_size > 1000


def test_a_failing_or_crashing_claim_fails_the_run(tmp_path, capsys):
    @claim("_always_fails")
    def _fails(ctx):
        return [Record("_always_fails", "0", 1.0, "<= 0", False)]

    @claim("_crashes")
    def _crashes(ctx):
        raise RuntimeError("boom")

    try:
        assert main(["--only", "_always_fails", "--out", str(tmp_path)]) == 1
        assert main(["--only", "_crashes", "--out", str(tmp_path)]) == 1
        assert "RuntimeError: boom" in capsys.readouterr().err
    finally:
        del CLAIMS["_always_fails"], CLAIMS["_crashes"], REPORTS["_always_fails"], REPORTS["_crashes"]


def test_unknown_claim_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--only", "no_such_claim", "--out", str(tmp_path)])
    assert info.value.code == 2


def test_only_takes_the_names_of_the_readme_table(tmp_path, capsys):
    # Prepare: the claim names in the README's verified-claims table
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = [line.split("|")[1].strip() for line in readme.splitlines()
             if line.startswith("| ") and "`proofs_check/claims/" in line]
    # Assert: the same names, in the same order, as the ones --only accepts
    assert table == claim_names()
    # Execute: a claim reported by a check with several claims selects just that row
    assert main(["--quick", "--only", "fedavg_discordance", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert [r["claim"] for r in payload["records"]] == ["fedavg_discordance"]
