"""Macro-F1 in a classification run's outputs: ``metrics.jsonl`` (global, validation, by rank, local) and the
summary (after the accuracy columns), without changing what accuracy selects."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.runner.simulation import run_experiment  # noqa: E402
from tests.llm.helpers import tiny_settings  # noqa: E402


def test_metrics_and_summary_carry_macro_f1_beside_accuracy(tmp_path):
    # Prepare
    cfg = RunConfig.from_dict(tiny_settings(methods=["fedit", "fedsa"], rounds=2, val_size=40))
    # Execute
    summary = run_experiment(cfg, tmp_path, progress=False)
    # Assert: every scored row has macro-F1 wherever it has accuracy
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by = {(r["method"], r["round"]): r for r in rows}
    for (method, _), row in by.items():
        for key in ("accuracy", "val_accuracy", "local_accuracy"):
            assert (key in row) == (key.replace("accuracy", "macro_f1") in row), (method, key)
        assert 0.0 <= row["macro_f1"] <= 1.0 and 0.0 <= row["val_macro_f1"] <= 1.0
        for scores in row.get("by_rank", {}).values():
            assert list(scores) == ["accuracy", "loss", "macro_f1", "test_correct"]  # per example: the verdicts'
            # standard error
    assert all("local_macro_f1" in by[(m, 2)] for m in ("fedit", "fedsa"))
    assert set(by[("fedit", 2)]["by_rank"]) == {"2", "4", "8"}
    # the summary: macro-F1 of the final round, none for a method without a global model
    final = {row["method"]: row for row in summary}
    assert final["fedit"]["macro_f1"] == by[("fedit", 2)]["macro_f1"]
    assert final["fedit"]["local_macro_f1"] == by[("fedit", 2)]["local_macro_f1"]
    assert final["fedsa"]["macro_f1"] is None
    assert final["fedsa"]["personal_macro_f1"] == by[("fedsa", 2)]["local_macro_f1"]
    saved = {row["method"]: row for row in json.loads((tmp_path / "summary.json").read_text())}
    assert saved["fedit"]["macro_f1"] == by[("fedit", 2)]["macro_f1"]
    header = (tmp_path / "summary.md").read_text().splitlines()[0].split(" | ")
    at = header.index("acc by rank (min-max)")
    assert header[at + 1 : at + 4] == ["global macro-F1", "local macro-F1", "personal macro-F1"]
    assert header[1:at + 1] == ["global acc", "acc @ val-best (round)", "local acc", "personal acc",
                                "acc by rank (min-max)"]
    # model selection stays on accuracy
    scored = [by[("fedit", t)] for t in (1, 2)]
    best = max(scored, key=lambda h: (h["val_accuracy"], -h["round"]))
    assert final["fedit"]["selected_round"] == best["round"]
