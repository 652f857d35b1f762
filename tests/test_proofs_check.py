"""`python -m proofs_check --quick` passes, and a failing claim makes the command fail."""

from __future__ import annotations

import json

import pytest

from proofs_check import CLAIMS, Record, claim
from proofs_check.__main__ import main


@pytest.mark.slow
def test_quick_run_passes_every_claim(tmp_path, capsys):
    status = main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "results.json").read_text())
    failed = [r for r in payload["records"] if not r["passed"]]
    assert status == 0, f"failed claims: {failed}"
    assert {r["check"] for r in payload["records"]} == set(CLAIMS)
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
        del CLAIMS["_always_fails"], CLAIMS["_crashes"]


def test_unknown_claim_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["--only", "no_such_claim", "--out", str(tmp_path)])
    assert info.value.code == 2
