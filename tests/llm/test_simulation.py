"""The embedded runner: determinism, checkpoint/resume equivalence, dropped updates, outputs."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.simulation import Simulation, UpdateDroppedWarning, load_final, run_experiment  # noqa: E402

BASE = dict(name="t", model="tiny-bert", dataset="synthetic", clients=4, ranks=[2, 2, 4, 8], rounds=3,
            local_steps=2, batch_size=8, lr=0.01, eval_size=40, max_length=32)


def _cfg(**overrides):
    return RunConfig.from_dict({**BASE, **overrides})


def _finals(out, methods):
    return {m: load_final(out / "adapters" / f"{m}.safetensors") for m in methods}


class Interrupt(Exception):
    pass


def test_resume_reaches_the_same_final_adapters(tmp_path):
    # Prepare: HetLoRA (prunes) and FLoRA (merged base, fresh adapters), partial participation
    methods = ["hetlora", "flora"]
    cfg = _cfg(methods=methods, clients_per_round=3)
    full = tmp_path / "full"
    run_experiment(cfg, full, progress=False)

    # Execute: kill the second run after round 2 of the second method, then resume
    def stop(method, round_):
        if method == "flora" and round_ == 2:
            raise Interrupt

    cut = tmp_path / "cut"
    with pytest.raises(Interrupt):
        run_experiment(cfg, cut, progress=False, on_round_end=stop)
    assert not (cut / "adapters" / "flora.safetensors").exists()
    assert json.loads((cut / "checkpoints" / "flora" / "round-2" / "state.json").read_text())["round"] == 2
    run_experiment(cfg, cut, resume=True, progress=False)

    # Assert: bit-identical final adapters and identical per-round metrics
    a, b = _finals(full, methods), _finals(cut, methods)
    for m in methods:
        assert set(a[m]) == set(b[m]) and a[m]
        for key in a[m]:
            assert torch.equal(a[m][key], b[m][key]), (m, key)
    rows_a = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    key = lambda r: (r["method"], r["round"])  # noqa: E731
    assert sorted(map(key, rows_a)) == sorted(map(key, rows_b))
    acc_a = {key(r): r["accuracy"] for r in rows_a}
    acc_b = {key(r): r["accuracy"] for r in rows_b}
    assert acc_a == acc_b


def test_runs_are_deterministic_given_a_seed(tmp_path):
    cfg = _cfg(methods=["flexlora"], rounds=2)
    run_experiment(cfg, tmp_path / "a", progress=False)
    run_experiment(cfg, tmp_path / "b", progress=False)
    a, b = _finals(tmp_path / "a", ["flexlora"]), _finals(tmp_path / "b", ["flexlora"])
    assert all(torch.equal(a["flexlora"][k], b["flexlora"][k]) for k in a["flexlora"])
    c = tmp_path / "c"
    run_experiment(_cfg(methods=["flexlora"], rounds=2, seed=1), c, progress=False)
    other = _finals(c, ["flexlora"])["flexlora"]
    assert any(not torch.equal(a["flexlora"][k], other[k]) for k in other if k in a["flexlora"])


@pytest.mark.parametrize("kind", ["nan", "shape"])
def test_bad_client_update_is_dropped_and_counted(tmp_path, kind):
    # Prepare: client 1's round-1 update is corrupted
    cfg = _cfg(methods=["fedit"], rounds=1, faults=[{"round": 1, "client": 1, "kind": kind}])
    sim = Simulation(cfg, tmp_path, progress=False)
    sim.setup()
    from lowrank_fed.llm.methods import make_method

    method = make_method("fedit")
    server = method.init_server(sim.init, sim.init_extras)
    clients = [method.init_client(r, sim.init_extras, sim.ws.shapes) for r in sim.ranks]
    seen = []
    original = method.aggregate
    method.aggregate = lambda s, ups, w: (seen.append((ups, w)), original(s, ups, w))[1]
    # Execute
    with pytest.warns(UpdateDroppedWarning, match="client 1: update dropped"):
        new, _, rows, _ = sim.run_round(method, server, clients, 1)
    # Assert: never aggregated, counted, global finite
    assert [r["dropped"] for r in rows] == [False, True, False, False]
    assert len(seen[0][0]) == 3 and seen[0][1] == [sim.n_k[0], sim.n_k[2], sim.n_k[3]]
    assert all(bool(torch.isfinite(p.B).all()) for p in new.pairs.values())


def test_dropped_updates_reach_the_metrics(tmp_path):
    cfg = _cfg(methods=["flexlora"], rounds=2, faults=[{"round": 2, "client": 0, "kind": "inf"}])
    with pytest.warns(UpdateDroppedWarning):
        summary = run_experiment(cfg, tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rows] == [0, 0, 1]
    assert "non-finite" in rows[2]["clients"][0]["reason"]
    assert summary[0]["dropped"] == 1


def test_outputs_and_metrics_content(tmp_path):
    cfg = _cfg(methods=["fedit", "fedsa"], rounds=2)
    summary = run_experiment(cfg, tmp_path, progress=False)
    for name in ("metrics.jsonl", "summary.md", "summary.json", "config.json", "accuracy.png", "train_loss.png",
                 "communication.png", "adapters/fedit.safetensors", "adapters/fedit-peft/adapter_config.json",
                 "adapters/fedit-peft/adapter_model.safetensors", "checkpoints/fedit/LATEST"):
        assert (tmp_path / name).exists(), name
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["method"], r["round"]) for r in rows] == [("fedit", 0), ("fedit", 1), ("fedit", 2),
                                                         ("fedsa", 0), ("fedsa", 1), ("fedsa", 2)]
    r1 = rows[1]
    assert len(r1["clients"]) == 4 and {"bytes_up", "bytes_down", "train_loss", "rank", "n"} <= set(r1["clients"][0])
    assert r1["bytes_up"] == sum(c["bytes_up"] for c in r1["clients"]) > 0
    # FedSA uploads only A, so fewer bytes than FedIT; it reports per-client (personalised) accuracy
    assert rows[4]["bytes_up"] < rows[1]["bytes_up"]
    assert len(rows[4]["per_client"]) == 4
    assert [s["method"] for s in summary] == ["fedit", "fedsa"]
    assert "| FedIT (zero-pad) |" in (tmp_path / "summary.md").read_text()


def test_generation_task_on_tiny_llama(tmp_path):
    cfg = RunConfig.from_dict(dict(name="g", model="tiny-llama", dataset="copy", methods=["fedit", "flora"], clients=3,
                                   ranks=[2, 4, 4], rounds=2, local_steps=3, batch_size=8, lr=0.01, eval_size=24,
                                   max_length=48, rouge_size=4, max_new_tokens=6))
    summary = run_experiment(cfg, tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perplexity"] > 1 for r in rows)
    assert summary[0]["metric"] == "perplexity" and 0.0 <= summary[0]["rouge_l"] <= 1.0
    assert (tmp_path / "perplexity.png").exists()


def test_resume_after_a_kill_in_the_middle_of_a_round(tmp_path, monkeypatch):
    import lowrank_fed.llm.simulation as simulation

    cfg = _cfg(methods=["fedsa", "flexlora"], rounds=2)
    run_experiment(cfg, tmp_path / "full", progress=False)
    calls = {"n": 0}
    original = simulation.train_local

    def dying(*args, **kwargs):  # the 7th local training (round 2, client 2, of FedSA) never returns
        calls["n"] += 1
        if calls["n"] == 7:
            raise Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(simulation, "train_local", dying)
    with pytest.raises(Interrupt):
        run_experiment(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(simulation, "train_local", original)
    run_experiment(cfg, tmp_path / "cut", resume=True, progress=False)
    a, b = _finals(tmp_path / "full", cfg.methods), _finals(tmp_path / "cut", cfg.methods)
    for m in cfg.methods:
        assert all(torch.equal(a[m][k], b[m][k]) for k in a[m])
    # FedSA's client-held B and heads are restored too: the personalised accuracies agree
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r.get("per_client") for r in rows(tmp_path / "full")] == [r.get("per_client") for r in rows(tmp_path / "cut")]
