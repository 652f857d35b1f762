"""``init_adapter``: every method starts from a PEFT adapter folder (its Delta W where the rank allows, the best
approximation where not), the scale conversion, a PEFT-made folder, and the bad inputs (exit 2, nothing written)."""

from __future__ import annotations

import json
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from lowrank_fed import FactorPair  # noqa: E402
from lowrank_fed.llm.adapters import Adapter, save_peft_adapter  # noqa: E402
from lowrank_fed.llm.methods import ClientState, METHODS, make_method  # noqa: E402
from lowrank_fed.llm.peft_bridge import get_factor_pairs, lora_layers  # noqa: E402
from lowrank_fed.llm.runner.start import BaseModelWarning  # noqa: E402
from tests.llm.helpers import make_sim, tiny_settings  # noqa: E402

ALL = list(METHODS)


def _adapter_pairs(sim, rank, seed, every=2):
    """A random rank-``rank`` folded adapter on every ``every``-th module of ``sim``'s model."""
    gen = torch.Generator().manual_seed(seed)
    return {m: FactorPair(torch.randn(d_out, rank, generator=gen) * 0.1, torch.randn(rank, d_in, generator=gen) * 0.1)
            for i, (m, (d_out, d_in)) in enumerate(sim.ws.shapes.items()) if i % every == 0}


def _head(sim, seed):
    gen = torch.Generator().manual_seed(seed)
    return {e: torch.randn(v.shape, generator=gen) for e, v in sim.init_extras.items()}


def _write(folder, pairs, head=None, **options):
    save_peft_adapter(folder, Adapter(pairs, head or {}), **options)
    return str(folder)


def _start_model(method, server, sim, k):
    """Client ``k``'s first model as its plan holds it: Delta W per module (base + B A) and the head."""
    plan, _ = method.client_plan(method.configure(server, k), ClientState(), sim.contexts[k], torch.Generator())
    delta = {m: p.B @ p.A for m, p in plan.pairs.items()}
    for m, d in (plan.base or {}).items():
        delta[m] = delta[m] + d
    return delta, plan.extras


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A rank-4 adapter with a head on half the modules of tiny-bert, and a run of every method set up from it."""
    tmp = tmp_path_factory.mktemp("adapter")
    ref = make_sim(tmp / "ref", tiny_settings())
    pairs, head = _adapter_pairs(ref, 4, 1), _head(ref, 2)
    folder = _write(tmp / "peft", pairs, head, lora_alpha=8.0)
    sim = make_sim(tmp / "run", tiny_settings(methods=ALL, init_adapter=folder, lora_alpha=32.0, lora_scaling="rslora"))
    return sim, pairs, head


@pytest.mark.parametrize("name", ALL)
def test_every_method_starts_from_the_adapter(made, name):
    # Prepare: ranks 2, 4, 8 (r_max = 8 >= r_a = 4); client 2 holds rank 8, client 1 rank 4
    sim, pairs, head = made
    method = make_method(name)
    # Execute: round 0 and the first model of the rank-8 and rank-4 clients
    server, _ = sim._start(method)
    starts = [_start_model(method, server, sim, k) for k in (1, 2)]
    # Assert: Delta W of each adapted module is the adapter's, the others start at zero; the head is the adapter's
    for delta, extras in starts:
        for m in sim.ws.shapes:
            want = pairs[m].B @ pairs[m].A if m in pairs else torch.zeros(sim.ws.shapes[m])
            assert torch.allclose(delta[m], want, atol=1e-6), (name, m)
        for e, value in head.items():
            assert torch.equal(extras[e], value), (name, e)
    assert all(v == 0.0 for v in sim.start_errors[name].values())
    if method.scores_global:
        model = method.global_model(server)
        got = {m: p.B @ p.A for m, p in (model.pairs or {}).items()}
        for m, d in (model.base or {}).items():
            got[m] = got.get(m, 0) + d
        for m, pair in pairs.items():
            assert torch.allclose(got[m], pair.B @ pair.A, atol=1e-6), (name, m)


def test_a_rank_below_the_adapters_is_its_best_approximation(tmp_path):
    # Prepare: a rank-6 adapter into a federation of rank 2 and 3 (r_max = 3 < 6)
    ref = make_sim(tmp_path / "ref", tiny_settings(clients=2, ranks=[2, 3]))
    pairs = _adapter_pairs(ref, 6, 3, every=1)
    folder = _write(tmp_path / "peft", pairs)
    # Execute
    sim = make_sim(tmp_path / "run", tiny_settings(clients=2, ranks=[2, 3], methods=["fedit", "flexlora", "flora"],
                                                     init_adapter=folder))
    server, _ = sim._start(make_method("fedit"))
    # Assert: the Eckart-Young truncation at rank 3, its error sqrt(sum_{i>3} S_i^2 / sum S_i^2) reported
    for m, pair in pairs.items():
        U, S, Vh = torch.linalg.svd((pair.B @ pair.A).double(), full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        assert torch.allclose((server.pairs[m].B @ server.pairs[m].A).double(), best, atol=1e-6), m
        eps = math.sqrt(float((S[3:] ** 2).sum() / (S ** 2).sum()))
        assert sim.start_errors["fedit"][m] == pytest.approx(eps, rel=1e-6)
        assert sim.start_errors["flora"][m] == 0.0  # FLoRA merges the adapter into the base: exact
    described = sim.describe()["init_adapter"]
    assert described["relative_error"]["fedit"] == pytest.approx(max(sim.start_errors["fedit"].values()))
    assert described["approximated"]["flexlora"] == sorted(pairs)


def test_scale_conversion_keeps_delta_w(tmp_path):
    # Prepare: an alpha_over_r adapter (alpha 8, rank 4: s_a = 2), a run under rsLoRA with alpha 32 at rank 4 (s = 16)
    ref = make_sim(tmp_path / "ref", tiny_settings())
    folder = _write(tmp_path / "peft", _adapter_pairs(ref, 4, 5), lora_alpha=8.0, scaling="alpha_over_r")
    raw, config = load_file(f"{folder}/adapter_model.safetensors"), json.loads(open(f"{folder}/adapter_config.json").read())
    sim = make_sim(tmp_path / "run", tiny_settings(init_adapter=folder, lora_scaling="rslora", lora_alpha=32.0))
    method = make_method("fedit")
    server, _ = sim._start(method)
    # Execute: the rank-4 client's download written into the live PEFT adapter
    plan, _ = method.client_plan(method.configure(server, 1), ClientState(), sim.contexts[1], torch.Generator())
    name = sim.ws.load(plan.pairs, plan.extras)
    layers = lora_layers(sim.ws.peft)
    # Assert: the run's s lora_B lora_A equals the file's (alpha / r) lora_B lora_A, by hand
    s_a = config["lora_alpha"] / config["r"]
    checked = 0
    for key in raw:
        if key.endswith("lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            want = s_a * raw[key.replace("lora_A", "lora_B")] @ raw[key]
            layer = layers[module]
            assert layer.scaling[name] == pytest.approx(32.0 / 2.0)
            got = layer.scaling[name] * layer.lora_B[name].weight @ layer.lora_A[name].weight
            assert torch.allclose(got, want, atol=1e-6), module
            checked += 1
    assert checked == len(raw) // 2 > 0


def test_a_folder_made_by_peft_is_the_first_download(tmp_path):
    # Prepare: PEFT's own save_pretrained on the run's base model (rank 4, alpha 8, a classifier head)
    from peft import LoraConfig, get_peft_model

    from lowrank_fed.llm.models import load_model

    ref = make_sim(tmp_path / "ref", tiny_settings())
    base, _, _ = load_model("tiny-bert", num_labels=len(ref.federation.source.label_names), seed=7,
                            vocabulary=ref.federation.shared.vocabulary)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                 task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    peft_model.save_pretrained(tmp_path / "peft")
    made, made_head = get_factor_pairs(peft_model)
    # Execute: round 0 of FedIT and the rank-4 client's download
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BaseModelWarning)
        sim = make_sim(tmp_path / "run", tiny_settings(init_adapter=str(tmp_path / "peft")))
    method = make_method("fedit")
    server, _ = sim._start(method)
    plan, _ = method.client_plan(method.configure(server, 1), ClientState(), sim.contexts[1], torch.Generator())
    # Assert: the download is PEFT's folded factors themselves, and PEFT's head
    assert sorted(plan.pairs) == sorted(made)
    for m, pair in made.items():
        assert torch.equal(plan.pairs[m].B, pair.B) and torch.equal(plan.pairs[m].A, pair.A), m
    assert made_head and all(torch.equal(plan.extras[e], v) for e, v in made_head.items())


@pytest.mark.parametrize("names", [["ffa", "fedsa", "flora", "local"], ["lora_a2", "hafl"]])
def test_two_rounds_run_from_an_adapter(tmp_path, names):
    # Prepare
    ref = make_sim(tmp_path / "ref", tiny_settings())
    folder = _write(tmp_path / "peft", _adapter_pairs(ref, 4, 6), _head(ref, 7))
    # Execute
    from lowrank_fed.llm.runner.simulation import run_experiment
    from lowrank_fed.llm.config import RunConfig

    run_experiment(RunConfig.from_dict(tiny_settings(methods=names, rounds=2, init_adapter=folder)),
                   tmp_path / "out", progress=False)
    # Assert: every round aggregated, no update dropped, the adapter described in setup.json
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] * len(names)
    assert all(r["dropped"] == 0 for r in rows)
    setup = json.loads((tmp_path / "out" / "setup.json").read_text())
    assert setup["init_adapter"]["path"] == folder and setup["init_adapter"]["ranks"] == [4]


def _cli(tmp_path, capsys, folder):
    """``lowrank-fed run`` of the tiny run with ``init_adapter = folder``: (exit status, stderr lines, out folder)."""
    from lowrank_fed.cli import main as cli_main

    out = tmp_path / "out"
    sets = [f"init_adapter={json.dumps(folder)}", 'model="tiny-bert"', "dataset=synthetic", "clients=3",
            "ranks=[2,4,8]", "rounds=1", "local_steps=2", "eval_size=30", "max_length=32", 'methods=["fedit"]']
    status = cli_main(["run", *[a for s in sets for a in ("--set", s)], "--no-progress", "--out", str(out)])
    return status, [x for x in capsys.readouterr().err.splitlines() if x.strip()], out


@pytest.mark.parametrize("case", ["module", "shape", "head", "not_a_folder"])
def test_bad_adapters_exit_2_and_write_nothing(tmp_path, capsys, case):
    # Prepare: an adapter on a module the run does not adapt (key), of another shape, a head of another
    # shape, or a file in place of the folder
    ref = make_sim(tmp_path / "ref", tiny_settings())
    m, (d_out, d_in) = next(iter(ref.ws.shapes.items()))
    pairs = {m: FactorPair(torch.ones(d_out, 2), torch.ones(2, d_in))}
    if case == "module":
        pairs = {m.replace("query", "key"): pairs[m]}
    elif case == "shape":
        pairs = {m: FactorPair(torch.ones(d_out, 2), torch.ones(2, d_in + 1))}
    head = {e: torch.ones(v.shape[0] + 1, *v.shape[1:]) for e, v in ref.init_extras.items()} if case == "head" else {}
    folder = tmp_path / "peft"
    if case == "not_a_folder":
        folder.write_text("not an adapter")
    else:
        _write(folder, pairs, head)
    # Execute
    status, lines, out = _cli(tmp_path, capsys, str(folder))
    # Assert: exit 2, one line on stderr naming init_adapter and what is wrong, nothing written
    assert status == 2, lines
    assert len(lines) == 1 and "init_adapter" in lines[0], lines
    want = {"module": m.replace("query", "key"), "shape": f"{(d_out, d_in + 1)}", "head": "shape",
            "not_a_folder": "folder"}[case]
    assert want in lines[0]
    if case == "shape":
        assert f"{(d_out, d_in)}" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("names", [["ffa", "fedsa"], ["flora", "local", "fedit"]])
def test_flower_from_an_adapter_equals_the_runner(tmp_path, monkeypatch, names):
    # Prepare: the adapter (with a head) on the server only; the nodes get what the downloads carry
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from lowrank_fed.llm.config import RunConfig
    from lowrank_fed.llm.flower.engine import FlowerSimulation
    from lowrank_fed.llm.runner.simulation import run_experiment
    from tests.llm.helpers import sha_tree
    from tests.llm.test_flower import InlineGrid

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    ref = make_sim(tmp_path / "r0", tiny_settings())
    folder = _write(tmp_path / "peft", _adapter_pairs(ref, 4, 8), _head(ref, 9))
    cfg = RunConfig.from_dict(tiny_settings(methods=names, rounds=2, checkpoint=True, init_adapter=folder))
    run_experiment(cfg, tmp_path / "ref", progress=False)
    # Execute: each client's round through Flower messages to its node's ClientApp
    sim = FlowerSimulation(cfg, tmp_path / "fl", progress=False)
    sim.serve(InlineGrid(cfg.clients))
    # Assert: byte-identical final adapters, metrics and checkpoints
    for name in names:
        got = (tmp_path / "fl" / "adapters" / f"{name}.safetensors").read_bytes()
        assert got == (tmp_path / "ref" / "adapters" / f"{name}.safetensors").read_bytes(), name
    assert (tmp_path / "fl" / "metrics.jsonl").read_text() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    assert sha_tree(tmp_path / "fl" / "checkpoints") == sha_tree(tmp_path / "ref" / "checkpoints")


def test_a_client_joining_later_still_starts_from_the_adapter(tmp_path):
    # Prepare: one client per round, so client 2 (rank 8) has not joined after round 1
    ref = make_sim(tmp_path / "ref", tiny_settings())
    pairs = _adapter_pairs(ref, 4, 10)
    folder = _write(tmp_path / "peft", pairs)
    sim = make_sim(tmp_path / "run", tiny_settings(methods=["fedsa", "flora", "ffa"], clients_per_round=1,
                                                     init_adapter=folder))
    late = [k for k in range(3) if k not in sim.sampled(1)][-1]
    for name in ("fedsa", "flora", "ffa"):
        method = make_method(name)
        server, clients = sim._start(method)
        # Execute: round 1, then the late client's first model
        server, clients, _, _ = sim.run_round(method, server, clients, 1)
        plan, _ = method.client_plan(method.configure(server, late), ClientState(), sim.contexts[late],
                                     torch.Generator())
        # Assert: FedSA's B and FLoRA's merge 0 reach it (FLoRA: plus round 1's merge; FFA: the adapter's A)
        for m, pair in pairs.items():
            if name == "fedsa":
                assert torch.equal(plan.pairs[m].B[:, :4], pair.B), m
            elif name == "flora":
                merge1 = method._merge(server, 1)[m]
                assert torch.allclose(plan.base[m], pair.B @ pair.A + merge1.B @ merge1.A, atol=1e-6), m
            else:
                assert torch.equal(plan.pairs[m].A[:4], pair.A), m


def test_a_run_from_an_adapter_resumes_to_the_same_bytes(tmp_path):
    # Prepare
    from lowrank_fed.llm.config import RunConfig
    from lowrank_fed.llm.runner.simulation import run_experiment
    from tests.llm.helpers import kill_and_resume, sha_tree

    ref = make_sim(tmp_path / "r0", tiny_settings())
    folder = _write(tmp_path / "peft", _adapter_pairs(ref, 4, 11), _head(ref, 12))
    cfg = RunConfig.from_dict(tiny_settings(methods=["flora", "fedsa"], rounds=3, clients_per_round=2,
                                            checkpoint=True, init_adapter=folder))
    run_experiment(cfg, tmp_path / "whole", progress=False)
    # Execute: killed after round 1, resumed
    kill_and_resume(cfg, tmp_path / "resumed", 1)
    # Assert
    skip = ("timings.jsonl", "summary.json", "summary.md")
    assert sha_tree(tmp_path / "resumed", exclude=skip) == sha_tree(tmp_path / "whole", exclude=skip)


def test_another_base_model_name_with_matching_shapes_is_a_warning(tmp_path):
    # Prepare: the same adapter named for another model, and for the run's own (as a run exports it)
    ref = make_sim(tmp_path / "ref", tiny_settings())
    pairs = _adapter_pairs(ref, 2, 13)
    other = _write(tmp_path / "other", pairs, base_model_name_or_path="someone/other-model")
    own = _write(tmp_path / "own", pairs, base_model_name_or_path="lowrank-fed:tiny-bert")
    # Execute / Assert: a warning naming both models, and none for the run's own name
    with pytest.warns(BaseModelWarning, match="'someone/other-model'.*'tiny-bert'"):
        make_sim(tmp_path / "a", tiny_settings(init_adapter=other))
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelWarning)
        make_sim(tmp_path / "b", tiny_settings(init_adapter=own))


def test_a_causal_lm_run_starts_from_its_adapter(tmp_path):
    # Prepare: tiny-llama (no head), an adapter on every q_proj / v_proj at rank 4
    settings = dict(model="tiny-llama", dataset="copy", val_size=10)
    ref = make_sim(tmp_path / "ref", tiny_settings(**settings))
    pairs = _adapter_pairs(ref, 4, 14, every=1)
    folder = _write(tmp_path / "peft", pairs, task_type="CAUSAL_LM")
    sim = make_sim(tmp_path / "run", tiny_settings(init_adapter=folder, methods=["fedit", "flexlora"], **settings))
    for name in ("fedit", "flexlora"):
        method = make_method(name)
        # Execute
        server, _ = sim._start(method)
        delta, _ = _start_model(method, server, sim, 2)
        # Assert
        for m, pair in pairs.items():
            assert torch.allclose(delta[m], pair.B @ pair.A, atol=1e-6), (name, m)
