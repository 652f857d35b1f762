"""``lowrank-fed recover``: flags, the printed table, the plot, bad flags."""

from __future__ import annotations

import argparse

import pytest

from lowrank_fed.experiments import recover


def parse(argv):
    parser = argparse.ArgumentParser(prog="lowrank-fed recover")
    recover.add_arguments(parser)
    return parser.parse_args(argv)


SMALL = ["--p", "12", "--q", "3", "--K", "12", "--r", "2", "--n", "40", "--seed", "1"]


def test_noisy_experiment_prints_every_quantity(capsys):
    status = recover.main(parse(SMALL + ["--gamma", "0.2", "--attack", "random", "--noise", "1.0"]))
    out = capsys.readouterr().out
    assert status == 0
    for label in ("subspace error sin_theta", "detection precision", "detection recall", "benign error CLAIR",
                  "benign error local OLS", "benign error FedAvg", "benign error oracle", "solver time",
                  "relative duality gap", "noisy program"):
        assert label in out


def test_noiseless_experiment_recovers_exactly():
    report, result, fed = recover.run_recovery(
        p=12, q=3, n_clients=12, rank=2, gamma=0.2, attack="base_shift", noise=0.0, n_samples=20, seed=2,
        clair_rank=2,
    )
    assert report.program == "noiseless" and report.converged
    assert report.sin_theta < 1e-6 and report.precision == 1.0 and report.recall == 1.0
    assert report.err_clair < 1e-10


def test_plot_is_written(tmp_path, capsys):
    target = tmp_path / "norms.png"
    status = recover.main(parse(SMALL + ["--noise", "0", "--lam", "0.8", "--plot", str(target)]))
    assert status == 0 and target.stat().st_size > 1000
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written to" in capsys.readouterr().out


def test_auto_rank_and_cvxpy_solver(capsys):
    status = recover.main(parse(SMALL + ["--noise", "0", "--auto-rank", "--solver", "cvxpy", "--lam", "0.8"]))
    assert status == 0 and "solver cvxpy" in capsys.readouterr().out


def test_bad_values_return_status_2(capsys):
    assert recover.main(parse(SMALL + ["--gamma", "0.6"])) == 2
    assert "benign majority" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--lam", "-1"], ["--lam", "auto"], ["--attack", "nope"]])
def test_bad_flags_are_rejected_by_the_parser(argv):
    with pytest.raises(SystemExit):
        parse(argv)
