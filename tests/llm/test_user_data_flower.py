"""A user's data file (``dataset = "PATH"``) through Flower's strategy and ClientApp: each node reads the file
itself and trains its own partition; the result equals the in-process runner's byte for byte."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("flwr")
pytest.importorskip("datasets")

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.flower.engine import FlowerSimulation  # noqa: E402
from lowrank_fed.llm.runner.simulation import run_experiment  # noqa: E402
from tests.llm.helpers import sha_tree, tiny_settings  # noqa: E402
from tests.llm.test_flower import InlineGrid, _final, _metrics, _task_identity  # noqa: E402, F401


@pytest.mark.parametrize("model, rows", [
    ("tiny-bert", [{"text": f"w{i % 7} c{i % 3} w{i % 5}", "label": ["a", "b", "c"][i % 3]} for i in range(30)]),
    ("tiny-llama", [{"prompt": f"say w{i % 7} c{i % 3}", "response": f"c{i % 3}"} for i in range(30)]),
])
def test_a_data_file_through_the_strategy_and_clientapp_equals_the_runner(tmp_path, model, rows):
    # Prepare
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RunConfig.from_dict(tiny_settings(model=model, dataset=str(data), rounds=2, methods=["fedit", "flexlora"],
                                            eval_size=10, val_size=3, partition="iid", checkpoint=True,
                                            rouge_size=2, max_new_tokens=2))
    run_experiment(cfg, tmp_path / "ref", progress=False)
    # Execute
    FlowerSimulation(cfg, tmp_path / "fl", progress=False).serve(InlineGrid(cfg.clients))
    # Assert
    assert _metrics(tmp_path / "fl") == _metrics(tmp_path / "ref")
    for method in cfg.methods:
        assert _final(tmp_path / "fl", method) == _final(tmp_path / "ref", method)
    assert sha_tree(tmp_path / "fl" / "checkpoints") == sha_tree(tmp_path / "ref" / "checkpoints")
    assert (tmp_path / "fl" / "setup.json").read_text() == (tmp_path / "ref" / "setup.json").read_text()
