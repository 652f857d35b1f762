"""Config parsing and the ``run`` command (add_arguments / main)."""

from __future__ import annotations

import argparse
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm import run  # noqa: E402
from lowrank_fed.llm.config import RunConfig, apply_overrides, load_config, parse_value  # noqa: E402

TINY = ["--set", 'model="tiny-bert"', "--set", "dataset=synthetic", "--set", "clients=3", "--set", "ranks=[2,4,4]",
        "--set", "rounds=2", "--set", "local_steps=2", "--set", "eval_size=30", "--set", "max_length=32",
        "--set", 'methods=["fedit","flexlora"]', "--no-progress"]


def _parse(argv):
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return parser.parse_args(argv)


def test_parse_values_and_overrides():
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value('["a", "b"]') == ["a", "b"] and parse_value("20newsgroups") == "20newsgroups"
    data = apply_overrides({"rounds": 1}, ["rounds=5", "hetlora.lam=0.1", "ranks=flora"])
    assert data == {"rounds": 5, "hetlora": {"lam": 0.1}, "ranks": "flora"}
    cfg = RunConfig.from_dict(data)
    assert cfg.method_options == {"hetlora": {"lam": 0.1}} and cfg.rounds == 5
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["rounds"])


def test_default_config_is_the_demo():
    cfg = RunConfig.from_dict({})
    assert cfg.model == "minilm" and cfg.dataset in ("bbc_news", "20newsgroups")
    assert {"fedit", "hetlora", "flora", "flexlora"} <= set(cfg.methods)
    assert cfg.partition == "dirichlet" and cfg.ranks == "flora"


@pytest.mark.parametrize("data,match", [
    ({"rounds": 0}, "'rounds' must be a positive int"),
    ({"colour": 1}, r"Unknown config key\(s\) \['colour'\]"),
    ({"methods": ["fedit", "nope"]}, r"unknown \['nope'\]"),
    ({"model": "tiny-llama"}, "does generation but dataset 'bbc_news' is classification"),
    ({"hetlora": {"beta": 1}}, "Unknown option"),
    ({"faults": [{"round": 1, "kind": "fire"}]}, "kind=nan|inf|shape"),
    ({"clients": 2, "clients_per_round": 3}, "exceeds 'clients'"),
])
def test_config_errors(data, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_dict(data)


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))
    assert configs
    for path in configs:
        RunConfig.from_dict(load_config(path))


def test_main_runs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert run.main(_parse([*TINY, "--out", str(out)])) == 0
    text = capsys.readouterr().out
    assert "FlexLoRA" in text and "MB up" in text
    assert (out / "summary.md").exists() and (out / "accuracy.png").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    # resuming a finished run recomputes nothing and gives the same table
    before = json.loads((out / "summary.json").read_text())
    assert run.main(_parse(["--resume", str(out), "--no-progress"])) == 0
    after = json.loads((out / "summary.json").read_text())
    assert [r["final"] for r in before] == [r["final"] for r in after]
    assert (out / "metrics.jsonl").read_text().splitlines() == lines


def test_main_reports_errors(tmp_path, capsys):
    assert run.main(_parse(["--set", "rounds=-1", "--out", str(tmp_path)])) == 2
    assert "'rounds' must be a positive int" in capsys.readouterr().out
    assert run.main(_parse(["--resume", str(tmp_path / "missing")])) == 2
    assert run.main(_parse(["--resume", str(tmp_path), "--set", "rounds=1"])) == 2


def test_config_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\nmodel = "tiny-bert"\ndataset = "synthetic"\nrounds = 1\nclients = 2\n'
                    'ranks = [2, 4]\nlocal_steps = 1\neval_size = 20\nmax_length = 16\nmethods = ["hetlora"]\n'
                    '[hetlora]\nlam = 0.5\n')
    assert run.main(_parse([str(path), "--out", str(tmp_path / "o"), "--no-progress"])) == 0
    stored = json.loads((tmp_path / "o" / "config.json").read_text())
    assert stored["method_options"] == {"hetlora": {"lam": 0.5}}
