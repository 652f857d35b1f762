"""The per-round exactness report (``aggregation_error``): against a dense computation from what the clients trained."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed import truncate  # noqa: E402
from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.methods import METHODS, make_method  # noqa: E402
from lowrank_fed.llm.runner.simulation import run_experiment  # noqa: E402
from tests.llm.helpers import make_sim, run_rounds, tiny_settings  # noqa: E402

OPTIONS = {"hafl": {"variant": "freezing"}, "lora_a2": {"global_rank": 8}}
EXACT = {"ffa", "flora", "flexlora", "lora_a2"}  # shared frozen A, stacking, SVD of the sum, one factor frozen
NO_GLOBAL = {"fedsa", "local"}  # no global adapter: nothing to compare
N_MODULES = 4  # tiny-bert's adapted modules
ALL = sorted(set(METHODS) - {"oracle"}) + ["hafl-truncation"]


def _method(name):
    if name == "hafl-truncation":
        return make_method("hafl", variant="truncation")
    return make_method(name, **OPTIONS.get(name, {}))


def _client_adapter(method, call):
    """What the client trained, read from its workspace (not from its reply), as the round leaves it."""
    if method.name == "lora_a2" or (method.name == "hafl" and method.options.variant == "freezing"):
        return dict(call.trained)  # the whole global-rank adapter, its own slots trained
    rank = int(call.reply.config["rank"])
    return {m: truncate(p, rank) for m, p in call.trained.items()}  # HetLoRA: after its pruning


def _dense(pair):
    return pair.B.double() @ pair.A.double()


def _dense_error(method, rnd):
    """``||sum_k p_k B_k A_k - B_hat A_hat||_F / ||sum_k p_k B_k A_k||_F`` with dense float64 matrices."""
    flagged = set(rnd.after.info.get("detection", {}).get("flagged", []))
    kept = [k for k in sorted(rnd.calls) if k not in flagged]
    n = {k: float(rnd.calls[k].reply.config["num_examples"]) for k in kept}
    trained = {k: _client_adapter(method, rnd.calls[k]) for k in kept}
    per_module, num2, den2 = {}, 0.0, 0.0
    for m, pair in method.aggregation_result(rnd.after).items():
        target = sum(n[k] / sum(n.values()) * _dense(trained[k][m]) for k in kept)
        diff = torch.linalg.matrix_norm(target - _dense(pair)).item()
        den = torch.linalg.matrix_norm(target).item()
        per_module[m] = diff / den
        num2, den2 = num2 + diff ** 2, den2 + den ** 2
    return per_module, (num2 / den2) ** 0.5


@pytest.mark.parametrize("name", ALL)
def test_each_round_reports_the_error_of_a_dense_computation_from_what_clients_trained(tmp_path, monkeypatch, name):
    # Prepare
    sim = make_sim(tmp_path, tiny_settings(rounds=2))
    method = _method(name)
    # Execute
    log = run_rounds(sim, method, 2, monkeypatch)
    # Assert
    for rnd in log:
        parts = rnd.after.cache["aggregation_error"]
        if method.name in NO_GLOBAL:
            assert parts is None
            continue
        per_module, overall = _dense_error(method, rnd)
        assert sorted(parts) == sorted(per_module)
        for m, (num, den) in parts.items():
            assert num / den == pytest.approx(per_module[m], abs=2e-6), m
        pooled = (sum(n * n for n, _ in parts.values()) / sum(d * d for _, d in parts.values())) ** 0.5
        assert pooled == pytest.approx(overall, abs=2e-6)
        if method.name in EXACT:
            assert overall < 1e-6  # float32 factors: rounding only
        elif method.name in {"fedit", "hetlora", "replication", "prelort", "hafl"}:
            assert overall > 1e-3  # ranks 2, 4, 8: factor averaging is not the average of products


def test_metrics_and_summary_carry_the_aggregation_error(tmp_path):
    # Prepare
    cfg = RunConfig.from_dict(tiny_settings(methods=["fedit", "flexlora", "fedsa"], rounds=2))
    # Execute
    summary = run_experiment(cfg, tmp_path, progress=False)
    # Assert
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    by = {(r["method"], r["round"]): r for r in rows}
    assert "aggregation_error" not in by[("fedit", 0)]  # nothing aggregated yet
    for t in (1, 2):
        assert by[("fedit", t)]["aggregation_error"] > 1e-3
        assert by[("flexlora", t)]["aggregation_error"] < 1e-6
        assert "aggregation_error" not in by[("fedsa", t)]
        modules = by[("fedit", t)]["aggregation_error_modules"]
        assert len(modules) == N_MODULES and all(v >= 0 for v in modules.values())
    mean = {row["method"]: row.get("aggregation_error") for row in summary}
    assert mean["fedit"] == pytest.approx((by[("fedit", 1)]["aggregation_error"]
                                           + by[("fedit", 2)]["aggregation_error"]) / 2)
    assert mean["fedsa"] is None
    text = (tmp_path / "summary.md").read_text()
    assert "aggregation error" in text

