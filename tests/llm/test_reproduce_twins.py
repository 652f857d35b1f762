"""The twins' agreement rule: a claim measured under both scale conventions (a config and its ``_constant`` twin)
is published with the verdict both agree on, "depends on the scale convention" where they disagree, and the one
convention's verdict (saying which) where only one has runs; through the analysis ``--analyse-only`` uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm.reproduce import run as reproduce_run  # noqa: E402
from lowrank_fed.llm.reproduce.claims import (EXPERIMENTS, Experiment, _against, _decide, _no_runs,  # noqa: E402
                                              _not_run, _per_seed, _take, _vs)

DEPENDS = "depends on the scale convention"
CLAIM = ("A above B", "A wins")


def _toy(results):
    """One claim on config ``main``: method a's final score above b's, paired per seed."""
    taken = _take(results, ("main",))
    if taken is None:
        return [_not_run(*CLAIM, _no_runs(results, ("main",)), configs=("main",))]
    runs = taken["main"]
    score = {m: _per_seed(runs, lambda r, m=m: r.summary[m]["final"]) for m in ("a", "b")}
    comps = _against(score, "a", ("b",), {"b": "B"})
    return [_decide(*CLAIM, f"a minus {_vs(comps)}", comps, "", score, configs=("main",))]


def _fake_runs(out: Path, stem: str, differences: list[float]) -> None:
    """Finished run folders ``out/<stem>/seed<s>/`` where a beats b by ``differences[s]``."""
    for seed, d in enumerate(differences):
        folder = out / stem / f"seed{seed}"
        folder.mkdir(parents=True)
        rows = [{"method": m, "title": m.upper(), "metric": "accuracy", "final": 0.5 + x, "seconds": 1.0}
                for m, x in (("a", d), ("b", 0.0))]
        (folder / "summary.json").write_text(json.dumps(rows))
        (folder / "metrics.jsonl").write_text("".join(json.dumps({"method": m, "round": 1}) + "\n" for m in "ab"))
        (folder / "setup.json").write_text("{}")
        scaling = "constant" if stem.endswith("_constant") else "alpha_over_r"
        (folder / "config.json").write_text(json.dumps({"model": "minilm", "seed": seed, "lora_scaling": scaling}))


@pytest.fixture
def toy(monkeypatch, tmp_path):
    # Prepare: a toy experiment with a config and its constant twin, registered where --analyse-only looks
    monkeypatch.setitem(EXPERIMENTS, "toy", Experiment("toy", "Toy", "a toy paper", ("main", "main_constant"),
                                                       "none", _toy))
    monkeypatch.setattr(reproduce_run, "CONFIG_ROOT", tmp_path / "configs")
    return tmp_path / "toy"


def _analyse(out: Path) -> dict:
    reproduce_run.analyse("toy", out=out, log=lambda m: None)
    return json.loads((out / "report.json").read_text())["claims"][0]


def test_twins_that_agree_publish_their_common_verdict_with_both_numbers(toy):
    _fake_runs(toy, "main", [0.10, 0.12, 0.11])
    _fake_runs(toy, "main_constant", [0.08, 0.10, 0.09])
    # Execute
    claim = _analyse(toy)
    # Assert
    assert claim["verdict"] == "holds"
    assert claim["twin"]["verdict"] == "holds" and claim["twin"]["configs"] == ["main_constant"]
    assert "both scale conventions agree" in claim["note"]
    assert [c["against"] for c in claim["comparisons"]] == ["B", "[constant] B"]
    assert claim["comparisons"][1]["differences"] == pytest.approx([0.08, 0.10, 0.09])
    assert "alpha_over_r: a minus vs B +0.110" in claim["ours"] and "constant (main_constant): a minus" in claim["ours"]


def test_twins_that_disagree_publish_neither_verdict(toy):
    _fake_runs(toy, "main", [0.10, 0.12, 0.11])
    _fake_runs(toy, "main_constant", [-0.10, -0.12, -0.11])
    # Execute
    claim = _analyse(toy)
    text = (toy / "report.md").read_text()
    # Assert
    assert claim["verdict"] == DEPENDS
    assert claim["why"] == "alpha_over_r: holds, constant: does not hold"
    assert claim["twin"]["verdict"] == "does not hold"
    assert claim["values"]["a"] and claim["values"]["[constant] a"]
    assert f"**{DEPENDS}** (alpha_over_r: holds, constant: does not hold)" in text
    assert "| A above B | [constant] B | -0.100, -0.120, -0.110 |" in text


def test_one_twin_alone_gives_its_verdict_and_says_which(toy):
    # Prepare: only the original has runs
    _fake_runs(toy, "main", [0.10, 0.12, 0.11])
    # Execute
    claim = _analyse(toy)
    # Assert
    assert claim["verdict"] == "holds" and claim["twin"]["verdict"] == "not run yet"
    assert claim["why"] == "alpha_over_r only" and "**holds** (alpha_over_r only)" in (toy / "report.md").read_text()
    assert 'measured under lora_scaling = "alpha_over_r" only: the constant twin (main_constant) has no runs' \
        in claim["note"]
    # Prepare: only the twin has runs
    for path in sorted((toy / "main").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    _fake_runs(toy, "main_constant", [-0.10, -0.12, -0.11])
    # Execute
    claim = _analyse(toy)
    # Assert
    assert claim["verdict"] == "does not hold" and claim["configs"] == ["main_constant"]
    assert claim["why"] == "constant only"
    assert 'measured under lora_scaling = "constant" only (main_constant)' in claim["note"]


def test_hafl_and_prelort_pair_each_config_with_its_constant_twin():
    from lowrank_fed.llm.reproduce.twins import twins

    # Execute / Assert: the twins are found by name, and the configs without one (homogeneous) are left alone
    assert twins(EXPERIMENTS["hafl"].configs) == {"freezing": "freezing_constant",
                                                  "truncation": "truncation_constant"}
    assert twins(EXPERIMENTS["prelort"].configs) == {"minilm_bbc": "minilm_bbc_constant",
                                                     "smollm2_headlines": "smollm2_headlines_constant"}
    assert all(not twins(EXPERIMENTS[n].configs) for n in ("lora-a2", "byun-lee", "clair"))


def test_a_claim_at_the_ceiling_counts_as_the_tie_it_is_between_the_conventions():
    from lowrank_fed.llm.reproduce.claims import Claim
    from lowrank_fed.llm.reproduce.twins import publish

    pairs = {"main": "main_constant"}

    def claim(verdict, why="", stem="main", ours="ours"):
        return Claim(*CLAIM, ours, verdict, "", configs=(stem,), why=why)

    ceiling = claim("not testable here", "at the ceiling")
    # Execute / Assert: against a decided verdict the conventions disagree (a tie against a loss), never "not testable"
    out = publish(ceiling, claim("does not hold", stem="main_constant"), pairs)
    assert out.verdict == DEPENDS
    assert out.why == "alpha_over_r: not testable here (at the ceiling), constant: does not hold"
    # against a tie with room to win, the tie is published
    out = publish(ceiling, claim("tie", stem="main_constant"), pairs)
    assert out.verdict == "tie" and out.why == ""
    assert "both scale conventions tie (alpha_over_r: not testable" in out.note
    # against a convention that cannot give a verdict, that one's reason is published, not the ceiling's
    out = publish(ceiling, claim("not testable here", "learning rate not tuned", "main_constant"), pairs)
    assert out.verdict == "not testable here" and out.why == "learning rate not tuned"
    # both at the ceiling: not testable, saying why
    out = publish(ceiling, claim("not testable here", "at the ceiling", "main_constant"), pairs)
    assert out.verdict == "not testable here" and out.why == "at the ceiling"
    # one convention alone keeps the reason its analysis gave; with none, the cell names the convention
    lone = claim("not run yet", stem="main_constant", ours="not run yet: no runs")
    assert publish(claim("not testable here", "learning rate not tuned"), lone, pairs).why == "learning rate not tuned"
    assert publish(claim("tie"), lone, pairs).why == "alpha_over_r only"
