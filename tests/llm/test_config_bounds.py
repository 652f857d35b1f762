"""Upper bounds of ``lowrank-fed run``: values the model, the data or the machine cannot hold exit 2 before writing.

Each case goes through the CLI (``lowrank_fed.cli.main``) on the tiny BERT (hidden 32, so every adapted module
is 32 x 32) and checks exit status 2, one line on stderr naming the key and the value, and no output folder.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.cli import main as cli_main  # noqa: E402
from lowrank_fed.llm.config import ConfigError, RunConfig  # noqa: E402
from lowrank_fed.llm.runner import limits  # noqa: E402

TINY = ["--set", 'model="tiny-bert"', "--set", "dataset=synthetic", "--set", "clients=3",
        "--set", "ranks=[2,4,4]", "--set", "rounds=2", "--set", "local_steps=2", "--set", "eval_size=30",
        "--set", "max_length=32", "--set", "val_size=20", "--set", 'methods=["fedit"]', "--no-progress"]


def _refused(tmp_path, capsys, sets: list[str], key: str, shown: str) -> str:
    """Run with ``sets``; assert exit 2, one stderr line naming ``key`` and ``shown``, nothing written; the line."""
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    status = cli_main(["run", *TINY, *[a for s in sets for a in ("--set", s)], "--out", str(out)])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert status == 2, err
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"error: Config key '{key}': expected ") and err.endswith(f"; got {shown}."), err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return err


CASES = [
    # (--set values, key, value shown, a fragment of the expected bound)
    (["local_steps=1000000000"], "local_steps", "1000000000", "<= 10000"),
    (["local_epochs=1000000000"], "local_epochs", "1000000000", "<= 100"),
    (["batch_size=1000000000"], "batch_size", "1000000000", "at most the training examples of all the clients"),
    (["ranks=[2,4,100000]"], "ranks[2]", "100000", "a rank <= 32 = min(d_out, d_in) of module"),
    (["ranks=100"], "ranks", "100", "a rank <= 32 = min(d_out, d_in)"),
    (["ranks=flora"], "ranks", "'flora'", "'flora' assigns [64]"),
    (["ranks=uniform", "rank_set=[100,2,4,8,16,32]"], "rank_set[0]", "100", "(ranks = 'uniform' assigns it)"),
    (['methods=["lora_a2"]', "ranks=4", "lora_a2.global_rank=64"], "lora_a2.global_rank", "64", "a rank <= 32"),
    (["threads=100000"], "threads", "100000", "the CPU cores this process may use"),
    (["seed=100000000000000000000000"], "seed", "100000000000000000000000", "<= 9223372036854775807"),
    (["name=" + "a" * 300], "name", repr("a" * 300)[:97] + "...", "at most 64 characters"),
    (["max_length=100000"], "max_length", "100000", "at most max_position_embeddings = 512 of model 'tiny-bert'"),
    (['model="tiny-llama"', "dataset=copy", "max_new_tokens=500"], "max_new_tokens", "500",
     "max_position_embeddings - max_length = 512 - 32 = 480"),
]


@pytest.mark.parametrize("sets,key,shown,bound", CASES, ids=[c[1] for c in CASES])
def test_run_refuses_values_beyond_the_model_data_or_machine(tmp_path, capsys, monkeypatch, sets, key, shown, bound):
    # Prepare: the working folder is tmp_path, so a stray runs/ folder would show
    monkeypatch.chdir(tmp_path)
    # Execute / Assert
    err = _refused(tmp_path, capsys, sets, key, shown)
    assert bound in err


def test_run_refuses_endless_rounds(tmp_path, capsys, monkeypatch):
    # Prepare
    monkeypatch.chdir(tmp_path)
    # Execute / Assert: an integer past the cap, and the float of the issue (a type error)
    assert "<= 10000" in _refused(tmp_path, capsys, ["rounds=1000000000000"], "rounds", "1000000000000")
    assert "an integer" in _refused(tmp_path, capsys, ["rounds=1e12"], "rounds", "1000000000000.0")


def test_run_refuses_a_local_round_beyond_the_memory(tmp_path, capsys, monkeypatch):
    # Prepare: a machine of 10 MB; 1000 steps x 8 x 32 tokens of ids and masks are about 4 MB + activations
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(limits, "memory_bytes", lambda device: 10_000_000)
    # Execute / Assert: the key furthest above its typical value is named, with the estimate and the memory
    err = _refused(tmp_path, capsys, ["local_steps=1000"], "local_steps", "1000")
    assert "half of this machine's RAM (10.0 MB)" in err and "1000 steps x batch_size 8 x max_length 32" in err


def test_memory_estimate_counts_batches_and_one_steps_activations():
    # Prepare / Execute: 10 steps of 4 x 16 tokens; 2 layers, hidden 32, 2 heads, float32
    est = limits.memory_estimate(steps=10, batch_size=4, max_length=16, task="classification", layers=2,
                                 hidden=32, heads=2, dtype_bytes=4)
    # Assert: ids and masks 8 bytes a token, labels 8 bytes a row; s b h (34 + 5 a s / h) per layer at 2 bytes
    assert est["batches"] == 10 * 4 * 16 * 8 * 2 + 10 * 4 * 8
    assert est["activations"] == int(2 * 16 * 4 * 32 * (34 + 5 * 2 * 16 / 32) * 4 / 2)
    assert est["total"] == est["batches"] + est["activations"]


def test_check_limits_lists_every_violated_bound():
    # Prepare: a model whose smallest adapted module is 8 x 16, 64 positions, clients of 5, 9 and 3 examples
    cfg = RunConfig.from_dict({"model": "tiny-bert", "dataset": "synthetic", "clients": 3, "ranks": [2, 9, 12],
                               "max_length": 65, "batch_size": 18})
    config = type("C", (), {"max_position_embeddings": 64})()
    # Execute
    with pytest.raises(ConfigError) as caught:
        limits.check_limits(cfg, ranks=[2, 9, 12], shapes={"a": (32, 32), "b": (8, 16)}, model_config=config,
                            task="classification", n_k=[5, 9, 3], device=torch.device("cpu"))
    # Assert: one line per problem, each naming its key and value
    assert [key for key, _, _ in caught.value.errors] == ["ranks[1]", "ranks[2]", "max_length", "batch_size"]
    assert "module 'b' (8 x 16)" in str(caught.value) and "of all the clients, 17" in str(caught.value)
    assert len(str(caught.value).splitlines()) == 4


def test_check_limits_accepts_a_batch_larger_than_a_client_but_not_the_data():
    # Prepare: clients of 6 examples each (CLAIR's copy-task configs: batches of 8 on 6 examples)
    cfg = RunConfig.from_dict({"model": "tiny-bert", "dataset": "synthetic", "clients": 3, "ranks": 4,
                               "batch_size": 8})
    config = type("C", (), {"max_position_embeddings": 512})()
    shapes = {"a": (32, 32)}
    # Execute / Assert: accepted (its batches repeat examples, as documented); a batch over all 18 examples is not
    limits.check_limits(cfg, ranks=[4] * 3, shapes=shapes, model_config=config, task="classification",
                        n_k=[6, 6, 6], device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="'batch_size': expected at most the training examples of all the "
                                          "clients, 18 .*; got 19."):
        limits.check_limits(cfg.model_copy(update={"batch_size": 19}), ranks=[4] * 3, shapes=shapes,
                            model_config=config, task="classification", n_k=[6, 6, 6], device=torch.device("cpu"))


def test_check_limits_counts_a_model_copy_and_a_round_per_worker():
    # Prepare: a round of about 0.3 MB and a 1 MB model; a machine whose half holds 3 workers but not 4
    cfg = RunConfig.from_dict({"model": "tiny-bert", "dataset": "synthetic", "clients": 3, "ranks": 4,
                               "local_steps": 5, "batch_size": 8, "max_length": 32})
    config = type("C", (), {"max_position_embeddings": 512, "num_hidden_layers": 2, "hidden_size": 32,
                            "num_attention_heads": 2})()
    round_ = limits.memory_estimate(steps=5, batch_size=8, max_length=32, task="classification", layers=2,
                                    hidden=32, heads=2, dtype_bytes=4)["total"]
    model = 1_000_000
    memory = 2 * 3 * (round_ + model) + 10
    common = dict(ranks=[4] * 3, shapes={"a": (32, 32)}, model_config=config, task="classification",
                  n_k=[40, 40, 40], device=torch.device("cpu"), memory=memory, model_bytes=model)
    # Execute / Assert: the default is lowered to what fits, a number the user chose is refused, naming it
    assert limits.check_limits(cfg, workers=3, chosen=True, **common) == 3
    assert limits.check_limits(cfg, workers=8, chosen=False, **common) == 3
    with pytest.raises(ConfigError, match="'workers': expected at most 3 workers in half of this machine's RAM"):
        limits.check_limits(cfg, workers=4, chosen=True, **common)
    assert limits.check_limits(cfg, workers=8, chosen=False, **{**common, "memory": 10 ** 15}) == 8


@pytest.mark.parametrize("command", [["flower", "up"], ["run", "--engine", "flower"]], ids=["flower-up", "run-flower"])
def test_flower_commands_inherit_the_bounds(tmp_path, capsys, monkeypatch, command):
    # Prepare: the rank of the issue in a config file; Flower must be installed for these commands to exist
    pytest.importorskip("flwr")
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "bad.toml"
    config.write_text('model = "tiny-bert"\ndataset = "synthetic"\nclients = 4\nranks = [2, 4, 4, 100000]\n'
                      'rounds = 2\nlocal_steps = 2\nmax_length = 32\nval_size = 20\nmethods = ["fedit"]\n')
    out = tmp_path / "out"
    # Execute
    status = cli_main([*command, str(config), "--out", str(out)])
    # Assert: refused at set-up, before any Flower process starts or anything is written
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert err.startswith("error: Config key 'ranks[3]': expected a rank <= 32") and "\n" not in err
    assert not out.exists()
