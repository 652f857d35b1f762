"""The run's verdict (:func:`add_verdict`, :func:`verdict_lines`): who did best on the headline metric, by how
much, and whether that is more than the noise of one seed on N test examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lowrank_fed.llm.runner.report import add_verdict, summary_markdown, verdict_lines


def _row(method, final, *, correct=None, metric="accuracy", personalised=False):
    row = {"method": method, "title": method.upper(), "metric": metric, "personalised": personalised,
           "final": final, "by_rank": {}, "mb_up": 0.0, "mb_down": 0.0, "dropped": 0, "seconds": 0.0,
           "train_seconds": 1.0, "server_seconds": 0.0, "initial": None}
    if correct is not None:
        row["test_correct"] = np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()
    return row


def _correct(n, right):
    c = np.zeros(n, dtype=bool)
    c[list(right)] = True
    return c


def test_a_clear_lead_is_a_win_with_the_paired_standard_error():
    # Prepare: 200 examples; A right on 0..179, B right on 0..149 (B's right answers are a subset of A's)
    n = 200
    a, b = _correct(n, range(180)), _correct(n, range(150))
    summary = [_row("b", 0.75, correct=b), _row("a", 0.90, correct=a)]

    # Execute
    facts = add_verdict(summary, n)
    lines = verdict_lines(summary)

    # Assert: d_i = a_i - b_i is 1 on 30 examples, 0 elsewhere
    d = a.astype(float) - b.astype(float)
    assert facts["best"] == "a" and facts["runner_up"] == "b" and facts["paired"] is True
    assert facts["margin"] == pytest.approx(0.15)
    assert facts["se_difference"] == pytest.approx(d.std(ddof=1) / math.sqrt(n))
    assert facts["tie"] is False and facts["n_test"] == n and facts["seeds"] == 1
    assert summary[1]["verdict"] == facts and "verdict" not in summary[0]
    assert all("test_correct" not in r for r in summary)  # per-example bits are not kept in summary.json
    assert summary[1]["standard_error"] == pytest.approx(math.sqrt(0.9 * 0.1 / n))
    assert lines[0].startswith("Verdict: A has the best global accuracy, 0.9000, 0.1500 above the runner-up B")
    assert "more than 2 standard errors" in lines[0] and "paired" in lines[0]
    assert "one seed on 200 test examples" in lines[1] and "0.021" in lines[1]


def test_a_margin_inside_two_standard_errors_is_a_tie_not_a_win():
    # Prepare: p near 0.5 on 200 examples, the two models disagree on 40 examples, A wins 22 of them
    n = 200
    shared = list(range(80))
    a = _correct(n, shared + list(range(100, 122)))
    b = _correct(n, shared + list(range(122, 140)))
    summary = [_row("a", a.mean(), correct=a), _row("b", b.mean(), correct=b)]

    # Execute
    facts = add_verdict(summary, n)
    lines = verdict_lines(summary)

    # Assert
    assert facts["margin"] == pytest.approx(0.02) and facts["tie"] is True
    assert lines[0].startswith("Verdict: a tie within noise: A has the best global accuracy")
    assert "not a win" in lines[0]
    assert "standard error of about 0.035" in lines[1]  # sqrt(0.51 * 0.49 / 200)


def test_without_per_example_results_the_unpaired_bound_is_used_and_said():
    # Prepare: an old run (resumed from checkpoints without per-example results)
    n = 200
    summary = [_row("a", 0.52), _row("b", 0.50)]

    # Execute
    facts = add_verdict(summary, n)
    lines = verdict_lines(summary)

    # Assert
    want = math.sqrt(0.52 * 0.48 / n + 0.5 * 0.5 / n)
    assert facts["paired"] is False and facts["se_difference"] == pytest.approx(want) and facts["tie"] is True
    assert "unpaired bound" in lines[0]


def test_perplexity_lower_is_better_and_no_uncertainty_is_claimed():
    # Prepare
    summary = [_row("a", 12.5, metric="perplexity"), _row("b", 11.0, metric="perplexity")]

    # Execute
    facts = add_verdict(summary, 50)
    lines = verdict_lines(summary)

    # Assert
    assert facts["best"] == "b" and facts["higher_is_better"] is False and facts["se_difference"] is None
    assert facts["tie"] is None and all(r["standard_error"] is None for r in summary)
    assert lines[0].startswith("Verdict: B has the lowest global perplexity, 11.0000, 1.5000 below the runner-up A")
    assert "no standard error is computed for perplexity" in lines[0]
    assert "one seed on 50 test examples" in lines[1]


def test_personalised_methods_are_not_ranked_and_the_markdown_carries_the_verdict():
    # Prepare: FedSA-like personalised method without a global score
    summary = [_row("fedsa", None, personalised=True), _row("a", 0.8), _row("b", 0.7)]

    # Execute
    facts = add_verdict(summary, 100)
    text = summary_markdown(summary)

    # Assert
    assert facts["not_ranked"] == ["fedsa"] and facts["best"] == "a"
    assert "Not ranked (no global model to score): FEDSA." in text
    assert "Verdict: a tie within noise: A has the best global accuracy, 0.8000, 0.1000 above" in text


def test_equal_scores_are_a_tie_and_one_method_has_nothing_to_compare():
    # Prepare
    n = 30
    same = _correct(n, range(11))
    tied = [_row("a", 11 / 30, correct=same), _row("b", 11 / 30, correct=same)]
    alone = [_row("a", 0.6)]

    # Execute
    add_verdict(tied, n)
    add_verdict(alone, n)

    # Assert
    assert tied[0]["verdict"]["tie"] is True
    assert verdict_lines(tied)[0] == "Verdict: a tie: A and B have the same global accuracy, 0.3667."
    assert verdict_lines(alone)[0].startswith("Verdict: only A has a global accuracy (0.6000)")
