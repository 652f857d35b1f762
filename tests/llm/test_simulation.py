"""The embedded runner: determinism, checkpoint/resume equivalence, dropped updates, outputs."""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.runner.checkpoint import CheckpointCorruptWarning  # noqa: E402
from lowrank_fed.llm.methods import make_method  # noqa: E402
from lowrank_fed.llm.runner.simulation import Simulation, UpdateDroppedWarning, load_final, run_experiment  # noqa: E402
from tests.llm.helpers import Interrupt, kill_after_round  # noqa: E402
from tests.llm.helpers import sha_tree as _sha  # noqa: E402

BASE = dict(name="t", model="tiny-bert", dataset="synthetic", clients=4, ranks=[2, 2, 4, 8], rounds=3,
            local_steps=2, batch_size=8, lr=0.01, eval_size=40, max_length=32, eval_every=1)


def _cfg(**overrides):
    return RunConfig.from_dict({**BASE, **overrides})


def _finals(out, methods):
    return {m: load_final(out / "adapters" / f"{m}.safetensors") for m in methods}


def _last_checkpoint(out, method):
    folder = out / "checkpoints" / method
    return folder / (folder / "LATEST").read_text().strip()


def test_resume_gives_byte_identical_adapters_and_checkpoints(tmp_path):
    # Prepare: HetLoRA (prunes) and FLoRA (merged base on the clients), partial participation
    methods = ["hetlora", "flora"]
    cfg = _cfg(methods=methods, clients_per_round=3)
    full = tmp_path / "full"
    run_experiment(cfg, full, progress=False)

    # Execute: kill the second run after round 2 of the second method, then resume
    cut = tmp_path / "cut"
    kill_after_round(cfg, cut, 2, method="flora")
    assert not (cut / "adapters" / "flora.safetensors").exists()
    run_experiment(cfg, cut, resume=True, progress=False)

    # Assert: sha256 equality of every adapter file, of the last checkpoints and of metrics.jsonl
    assert _sha(full / "adapters") == _sha(cut / "adapters") and _sha(full / "adapters")
    for m in methods:
        a, b = _sha(_last_checkpoint(full, m)), _sha(_last_checkpoint(cut, m))
        assert a == b and len(a) == 3
    assert (full / "metrics.jsonl").read_bytes() == (cut / "metrics.jsonl").read_bytes()


def test_resume_from_a_corrupt_checkpoint_falls_back_to_the_previous_round(tmp_path):
    # Prepare: a finished run; flip one bit in the middle of its last checkpoint's tensors
    cfg = _cfg(methods=["fedit"], rounds=3)
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_experiment(cfg, full, progress=False)
    run_experiment(cfg, cut, progress=False)
    bad = _last_checkpoint(cut, "fedit") / "tensors.safetensors"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    # Execute: resume; it must name the bad file, redo round 3 from round 2, and reach the same bytes
    with pytest.warns(CheckpointCorruptWarning, match=str(bad)):
        run_experiment(cfg, cut, resume=True, progress=False)
    # Assert
    assert _sha(full / "adapters") == _sha(cut / "adapters")
    assert _sha(_last_checkpoint(full, "fedit")) == _sha(_last_checkpoint(cut, "fedit"))


def test_resume_restarts_a_method_whose_every_checkpoint_is_corrupt_from_round_0(tmp_path):
    # Prepare: a full run, and one killed after round 2 of its second method, every checkpoint of which is damaged
    methods = ["fedit", "flexlora"]
    cfg = _cfg(methods=methods)
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_experiment(cfg, full, progress=False)
    kill_after_round(cfg, cut, 2, method="flexlora")
    bad = sorted((cut / "checkpoints" / "flexlora").glob("round-*/tensors.safetensors"))
    for path in bad:
        path.write_bytes(b"not a checkpoint")

    # Execute
    with pytest.warns(CheckpointCorruptWarning) as record:
        run_experiment(cfg, cut, resume=True, progress=False)

    # Assert: one warning naming the damaged files; the same adapters and metrics; no stale timing rows
    assert len(bad) == 2 and len(record) == 1
    message = str(record[0].message)
    assert all(str(path) in message for path in bad) and "restarting FlexLoRA from round 0" in message
    assert _sha(full / "adapters") == _sha(cut / "adapters") and _sha(full / "adapters")
    assert _sha(_last_checkpoint(full, "flexlora")) == _sha(_last_checkpoint(cut, "flexlora"))
    assert (full / "metrics.jsonl").read_bytes() == (cut / "metrics.jsonl").read_bytes()
    timings = [json.loads(x) for x in (cut / "timings.jsonl").read_text().splitlines()]
    assert [(t["method"], t["round"]) for t in timings] == [(m, r) for m in methods for r in range(4)]


def test_resume_repairs_a_garbage_latest_so_the_next_resume_does_not_warn(tmp_path):
    # Prepare: a finished run whose LATEST is garbage
    cfg = _cfg(methods=["fedit"], rounds=1)
    run_experiment(cfg, tmp_path, progress=False)
    latest = tmp_path / "checkpoints" / "fedit" / "LATEST"
    latest.write_text("garbage\n")

    # Execute: resume twice
    with pytest.warns(CheckpointCorruptWarning, match=str(latest)):
        run_experiment(cfg, tmp_path, resume=True, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointCorruptWarning)
        run_experiment(cfg, tmp_path, resume=True, progress=False)

    # Assert
    assert latest.read_text() == "round-1\n"


def test_runs_are_byte_identical_given_a_seed(tmp_path):
    # Every output but the timings (timings.jsonl, and the time columns of summary.*) is identical
    cfg = _cfg(methods=["flexlora", "fedsa"], rounds=2)
    run_experiment(cfg, tmp_path / "a", progress=False)
    run_experiment(cfg, tmp_path / "b", progress=False)
    timed = ("timings.jsonl", "summary.json", "summary.md")
    a, b = _sha(tmp_path / "a", exclude=timed), _sha(tmp_path / "b", exclude=timed)
    assert a == b and "adapters/flexlora-peft/adapter_config.json" in a and "accuracy.png" in a
    c = tmp_path / "c"
    run_experiment(_cfg(methods=["flexlora"], rounds=2, seed=1), c, progress=False)
    assert _sha(c / "adapters")["flexlora.safetensors"] != a["adapters/flexlora.safetensors"]


def test_a_method_run_alone_gives_the_rows_it_gives_beside_others(tmp_path):
    # A rerun of one method (`--set methods=[...]`, e.g. at another rate) is paired with the other methods' runs
    # of the same seed only if what a method sees (split, partition, batches, initial adapters) does not depend on
    # which methods share the run or their order
    cfg = _cfg(methods=["hetlora", "fedit", "prelort"], rounds=2)
    run_experiment(cfg, tmp_path / "all", progress=False)
    run_experiment(_cfg(methods=["prelort", "fedit"], rounds=2), tmp_path / "two", progress=False)

    def rows(out, method):
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in lines if r["method"] == method]

    for method in ("fedit", "prelort"):
        assert rows(tmp_path / "all", method) == rows(tmp_path / "two", method) and rows(tmp_path / "two", method)
    assert _sha(tmp_path / "all" / "adapters")["prelort.safetensors"] == \
        _sha(tmp_path / "two" / "adapters")["prelort.safetensors"]


@pytest.mark.parametrize("kind", ["nan", "shape"])
def test_bad_client_update_is_dropped_and_counted(tmp_path, kind):
    # Prepare: client 1's round-1 update is corrupted
    cfg = _cfg(methods=["fedit"], rounds=1, faults=[{"round": 1, "client": 1, "kind": kind}])
    sim = Simulation(cfg, tmp_path, progress=False)
    sim.setup()
    method = make_method("fedit")
    server = method.init_server(sim.init, sim.init_extras, dict(enumerate(sim.ranks)), init_seed=sim.init_seed)
    seen = []
    original = method.aggregate
    method.aggregate = lambda s, replies: (seen.append(replies), original(s, replies))[1]
    # Execute
    with pytest.warns(UpdateDroppedWarning, match="client 1: update dropped"):
        new, _, rows, _ = sim.run_round(method, server, {}, 1)
    # Assert: never aggregated, counted, global finite
    assert [r["dropped"] for r in rows] == [False, True, False, False]
    assert sorted(seen[0]) == [0, 2, 3]
    assert [r.config["num_examples"] for r in seen[0].values()] == [sim.n_k[0], sim.n_k[2], sim.n_k[3]]
    assert all(bool(torch.isfinite(p.B).all()) for p in new.pairs.values())


def test_dropped_updates_reach_the_metrics(tmp_path):
    cfg = _cfg(methods=["flexlora"], rounds=2, faults=[{"round": 2, "client": 0, "kind": "inf"}])
    with pytest.warns(UpdateDroppedWarning):
        summary = run_experiment(cfg, tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rows] == [0, 0, 1]
    assert "non-finite" in rows[2]["clients"][0]["reason"]
    assert summary[0]["dropped"] == 1


def test_a_fault_for_every_method_leaves_local_training_alone(tmp_path):
    # Prepare: `local` uploads nothing, so the fault has nothing to corrupt there
    cfg = _cfg(methods=["local", "fedit"], rounds=1, faults=[{"round": 1, "client": 0, "kind": "nan"}])
    # Execute
    with pytest.warns(UpdateDroppedWarning, match="FedIT"):
        summary = run_experiment(cfg, tmp_path, progress=False)
    # Assert
    assert {row["method"]: row["dropped"] for row in summary} == {"local": 0, "fedit": 1}


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
    # FedSA is scored only by its clients' own models, in its own column; FedIT by global, val-best, local, rank
    fedit, fedsa = summary
    assert fedsa["final"] is None and "selected" not in fedsa and 0 <= fedsa["personal"] <= 1
    assert fedit["final"] is not None and fedit["selected_round"] in (1, 2) and "personal" not in fedit
    assert set(fedit["by_rank"]) == {"2", "4", "8"} and 0 <= fedit["local"] <= 1
    assert "| FedIT (zero-pad) |" in (tmp_path / "summary.md").read_text()


def test_generation_task_on_tiny_llama(tmp_path):
    cfg = RunConfig.from_dict(dict(name="g", model="tiny-llama", dataset="copy", methods=["fedit", "flora"], clients=3,
                                   ranks=[2, 4, 4], rounds=2, local_steps=3, batch_size=8, lr=0.01, eval_size=24,
                                   max_length=48, rouge_size=4, max_new_tokens=6, eval_every=1))
    summary = run_experiment(cfg, tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perplexity"] > 1 for r in rows)
    assert summary[0]["metric"] == "perplexity" and 0.0 <= summary[0]["rouge_l"] <= 1.0
    assert (tmp_path / "perplexity.png").exists()


def test_resume_after_a_kill_in_the_middle_of_a_round(tmp_path, monkeypatch):
    import lowrank_fed.llm.client as simulation

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


def test_a_client_that_raises_is_a_dropped_update_and_the_run_goes_on(tmp_path, monkeypatch):
    # Prepare: client 2's local training raises in round 1
    import lowrank_fed.llm.client as client_module

    cfg = _cfg(methods=["fedit"], rounds=2)
    original = client_module.train_local
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory")
        return original(*args, **kwargs)

    monkeypatch.setattr(client_module, "train_local", flaky)
    # Execute
    with pytest.warns(UpdateDroppedWarning, match="client 2: update dropped .client failed: RuntimeError: out of memory"):
        summary = run_experiment(cfg, tmp_path, progress=False)
    # Assert: counted, the rest aggregated, both rounds ran
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["dropped"] for r in rows] == [0, 1, 0] and summary[0]["dropped"] == 1
    assert rows[1]["clients"][2]["bytes_up"] == 0 and rows[1]["clients"][2]["train_loss"] is None


def test_flora_writes_its_merged_updates_as_a_peft_adapter(tmp_path):
    # FLoRA's global is its merged base; the PEFT folder holds the same sum as a factor pair, compressed by
    # the factored SVD to its numerical rank (at most the stacked rank: 2 rounds x (2 + 2 + 4 + 8) = 32).
    from lowrank_fed.llm import load_peft_adapter

    run_experiment(_cfg(methods=["flora"], rounds=2), tmp_path, progress=False)
    final = load_final(tmp_path / "adapters" / "flora.safetensors")
    adapter = load_peft_adapter(tmp_path / "adapters" / "flora-peft")
    assert adapter.config.base_model_name_or_path == "lowrank-fed:tiny-bert"
    for m, pair in adapter.pairs.items():
        base = final[f"server/arrays/base/{m}"]
        assert 1 <= pair.rank <= 2 * 16
        torch.testing.assert_close(pair.B @ pair.A, base, rtol=1e-4, atol=1e-5 * float(base.abs().max()))


def test_score_uploads_scores_each_clients_own_model_before_aggregation(tmp_path):
    # Prepare: one client, so FedIT's global after round 1 is exactly its upload (FedAvg of one model)
    cfg = RunConfig.from_dict({**BASE, "clients": 1, "ranks": [4], "rounds": 1, "methods": ["fedit", "ffa"],
                               "score_uploads": True, "checkpoint": False})
    # Execute
    run_experiment(cfg, tmp_path, progress=False)
    # Assert: the upload's scores equal the global model's and the client's download's; FFA's partial upload has none
    rows = {json.loads(x)["method"]: json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["round"] == 1}
    client = rows["fedit"]["clients"][0]
    assert client["upload_accuracy"] == rows["fedit"]["accuracy"]
    assert client["upload_local_accuracy"] == rows["fedit"]["per_client"][0]
    assert "upload_accuracy" not in rows["ffa"]["clients"][0]
