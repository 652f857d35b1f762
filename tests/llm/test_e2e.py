"""End to end on the packaged real MiniLM and BBC News: two federated rounds beat the untrained model."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.runner.simulation import run_experiment  # noqa: E402


@pytest.mark.e2e
def test_minilm_two_rounds_beat_untrained(tmp_path):
    cfg = RunConfig.from_dict(dict(
        name="e2e", model="minilm", dataset="bbc_news", methods=["flexlora"], clients=4, ranks=[4, 8, 8, 16],
        rounds=2, local_steps=5, batch_size=8, lr=5e-3, alpha=1.0, eval_size=120, max_length=48, seed=0,
    ))
    summary = run_experiment(cfg, tmp_path, progress=False)
    row = summary[0]
    assert row["final"] > row["initial"] + 0.15, row
    assert row["dropped"] == 0
    # the model each rank downloads and each client's own held-out score are reported too
    assert set(row["by_rank"]) == {"4", "8", "16"} and 0.0 <= row["local"] <= 1.0
    assert row["selected_round"] in (1, 2)


@pytest.mark.e2e
def test_minilm_seed_methods_two_rounds_beat_untrained(tmp_path):
    # PreLort (nested sampling), HAFL (freezing, client importance) and LoRA-A2 (B-round then A-round) on the real model
    cfg = RunConfig.from_dict(dict(
        name="e2e-seed", model="minilm", dataset="bbc_news", methods=["prelort", "hafl", "lora_a2"], clients=4,
        ranks=[2, 4, 4, 8], rounds=2, local_steps=5, batch_size=8, lr=5e-3, alpha=1.0, eval_size=60, val_size=30,
        max_length=48, seed=0, lora_a2={"global_rank": 8},
    ))
    summary = run_experiment(cfg, tmp_path, progress=False)
    for row in summary:
        assert row["dropped"] == 0, row
        assert row["final"] > row["initial"] + 0.1, row
    lora_a2 = summary[2]
    assert 0 < lora_a2["upload_vs_full"] < 0.05  # masked deltas of one factor: a few percent of full fine-tuning


@pytest.mark.e2e
def test_smollm2_one_round_of_fedit_and_the_seed_methods(tmp_path):
    # SmolLM2 is dequantised from the packaged GGUF once, then cached (LOWRANK_FED_CACHE or ~/.cache/lowrank-fed).
    # FedIT reports perplexity and ROUGE-L; PreLort (nested), HAFL (truncation: each client gets its own slot set)
    # and LoRA-A2 run on the causal LM. One run: the model is loaded and the untrained model scored once.
    cfg = RunConfig.from_dict(dict(
        name="e2e-smollm2", model="smollm2", dataset="bbc_headlines", methods=["fedit", "prelort", "hafl", "lora_a2"],
        clients=2, ranks=[4, 8], rounds=1, local_steps=2, batch_size=2, lr=1e-3, eval_size=8, val_size=4,
        max_length=96, rouge_size=2, max_new_tokens=8, hafl={"variant": "truncation"}, lora_a2={"global_rank": 8},
    ))
    summary = run_experiment(cfg, tmp_path, progress=False)
    assert 0.0 <= summary[0]["rouge_l"] <= 1.0 and summary[0]["rouge_l_initial"] is not None
    for row in summary:
        assert row["metric"] == "perplexity" and row["dropped"] == 0, row
        assert 1.0 < row["final"] < row["initial"], row  # one round already lowers the perplexity
    assert set(summary[2]["by_rank"]) == {"4", "8"}  # HAFL truncation: each rank downloads its own slots
