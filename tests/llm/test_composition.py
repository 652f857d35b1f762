"""Composition: a prefix client policy served by another core rule; pairs that cannot work are refused."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed import aggregate  # noqa: E402
from lowrank_fed.llm.config import ConfigError, RunConfig  # noqa: E402
from lowrank_fed.llm.methods import METHODS, PAIR_RULES, make_method  # noqa: E402
from lowrank_fed.llm.protocol import Message, encode_pairs  # noqa: E402
from lowrank_fed.llm.runner.simulation import run_experiment  # noqa: E402
from tests.llm.helpers import SHAPES  # noqa: E402
from tests.llm.helpers import pairs as _pairs  # noqa: E402


def _replies(ups, ns):
    return {k: Message(encode_pairs(p), {"num_examples": n, "rank": next(iter(p.values())).rank, "client": k,
                                         "round": 1}) for k, (p, n) in enumerate(zip(ups, ns, strict=True))}


@pytest.mark.parametrize("name", ["fedit", "hetlora", "replication", "prelort"])
@pytest.mark.parametrize("rule", PAIR_RULES)
def test_a_prefix_policy_served_by_any_pair_rule_gets_that_rule(name, rule):
    # Prepare: three clients of ranks 2, 3, 4 against a rank-4 global
    method = make_method(name, server=rule)
    server = method.init_server(_pairs(4, 9), {}, {0: 2, 1: 3, 2: 4}, init_seed=0)
    ups, ns = [_pairs(r, 10 + r) for r in (2, 3, 4)], [5, 1, 2]
    # Execute
    new = method.aggregate(server, _replies(ups, ns))
    # Assert: the product is the core rule's (data weights; segment with previous; svd exact)
    own = name == "hetlora" and rule == "zero_pad"  # HetLoRA's own rule keeps its norm weights
    for m in SHAPES:
        options = {"previous": server.pairs[m]} if rule == "segment" else {}
        if own:
            expected = aggregate(rule, [u[m] for u in ups], None, weighting="frobenius")
        else:
            expected = aggregate(rule, [u[m] for u in ups], ns, **options)
        torch.testing.assert_close(new.pairs[m].B @ new.pairs[m].A, expected.B @ expected.A)
    assert method.rule == rule
    assert method.title == (METHODS[name].title if rule == METHODS[name].rule else f"{METHODS[name].title} + {rule}")


def test_svd_server_gives_the_exact_weighted_sum_even_with_fewer_slots_than_before():
    # a rank-8 previous global; the clients' exact sum has rank 3 + 2 = 5: nothing of the old global survives
    method = make_method("prelort", server="svd")
    server = method.init_server(_pairs(8, 1), {}, {0: 3, 1: 2}, init_seed=0)
    ups = [_pairs(3, 2), _pairs(2, 3)]
    new = method.aggregate(server, _replies(ups, [1, 3]))
    for m in SHAPES:
        exact = 0.25 * ups[0][m].B @ ups[0][m].A + 0.75 * ups[1][m].B @ ups[1][m].A
        torch.testing.assert_close(new.pairs[m].B @ new.pairs[m].A, exact)


@pytest.mark.parametrize("name", ["ffa", "fedsa", "flora", "flexlora", "hafl", "lora_a2"])
def test_policies_that_need_their_own_rule_refuse_another(name):
    with pytest.raises(ValueError, match="no other server rule: this method's client policy needs its own"):
        make_method(name, server="svd")
    with pytest.raises(ConfigError, match=rf"Config key '{name}.server': expected no other server rule"):
        RunConfig.from_dict({"methods": [name], name: {"server": "segment"}})


def test_a_pair_rule_that_cannot_serve_a_prefix_policy_is_refused():
    with pytest.raises(ConfigError, match=r"Config key 'prelort.server': expected one of \['zero_pad', 'replication', "
                                          r"'segment', 'svd'\]; got 'stack'"):
        RunConfig.from_dict({"methods": ["prelort"], "prelort": {"server": "stack"}})


def test_prefix_nested_training_with_the_svd_server_runs_end_to_end(tmp_path):
    cfg = RunConfig.from_dict(dict(name="c", model="tiny-bert", dataset="synthetic", methods=["prelort"], clients=3,
                                   ranks=[2, 4, 8], rounds=2, local_steps=2, batch_size=8, lr=0.01, eval_size=40,
                                   val_size=20, max_length=32, prelort={"server": "svd", "nested": "sample"}))
    summary = run_experiment(cfg, tmp_path, progress=False)
    assert summary[0]["title"] == "PreLort + svd" and summary[0]["dropped"] == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and set(rows[-1]["by_rank"]) == {"2", "4", "8"}
