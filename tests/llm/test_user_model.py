"""The user's own model (issue 21, item 1): ``model = "PATH"`` (a Hugging Face folder) or a hub name in the local cache.

The folders are the tiny models saved with ``save_pretrained`` (model and word tokenizer), so runs stay tiny; the
data are the packaged ``synthetic`` (classification) and ``copy`` (generation) sets.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402

from lowrank_fed.llm import run  # noqa: E402
from lowrank_fed.llm.config import ConfigError, RunConfig  # noqa: E402
from lowrank_fed.llm.federation import build_federation, build_model  # noqa: E402
from lowrank_fed.llm.methods import make_method  # noqa: E402
from lowrank_fed.llm.models import tiny_bert, tiny_llama, word_tokenizer  # noqa: E402
from lowrank_fed.llm.runner.simulation import run_experiment  # noqa: E402
from tests.llm.helpers import make_sim, start, tiny_settings  # noqa: E402

GENERATION = dict(dataset="copy", methods=["fedit"], clients=3, ranks=[2, 4, 4], rounds=1, local_steps=2,
                  batch_size=8, lr=0.01, eval_size=24, max_length=48, rouge_size=2, max_new_tokens=4, eval_every=1,
                  checkpoint=False, val_size=10)


def _save(folder: Path, model, tokenizer) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """tiny-bert of the tiny run (``tiny_settings``), its word tokenizer and classifier head, saved: the very model
    that ``model = "tiny-bert"`` builds for that run."""
    fed = build_federation(RunConfig.from_dict(tiny_settings()))
    tokenizer = word_tokenizer(words=fed.shared.vocabulary)
    model = tiny_bert(len(fed.source.label_names), vocab_size=len(tokenizer), seed=0)
    return _save(tmp_path_factory.mktemp("models") / "bert", model, tokenizer)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    """tiny-llama with the causal word tokenizer of the ``copy`` run, saved."""
    fed = build_federation(RunConfig.from_dict(tiny_settings(model="tiny-llama", **GENERATION)))
    tokenizer = word_tokenizer(words=fed.shared.vocabulary, causal=True)
    model = tiny_llama(vocab_size=len(tokenizer), seed=0)
    return _save(tmp_path_factory.mktemp("models") / "llama", model, tokenizer)


def _parse(argv):
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return parser.parse_args(argv)


def _sets(settings: dict) -> list[str]:
    return [a for key, value in settings.items() for a in ("--set", f"{key}={json.dumps(value)}")]


def _fake_config(folder: Path, **config) -> Path:
    """A model folder holding ``config.json`` and a placeholder weights file (for checks made before loading)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\x00")
    return folder


# ----------------------------------------------------------------------------- runs


def test_main_runs_a_classifier_folder_and_exports_its_path(bert_folder, tmp_path, monkeypatch, capsys):
    # Prepare
    monkeypatch.chdir(tmp_path)
    settings = tiny_settings(model=str(bert_folder), methods=["fedit", "flexlora", "prelort"], rounds=2,
                             checkpoint=True, workers=1)
    # Execute
    status = run.main(_parse([*_sets(settings), "--out", "out", "--no-progress"]))
    # Assert
    assert status == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["method"], r["round"]) for r in rows} >= {(m, 2) for m in ("fedit", "flexlora", "prelort")}
    for method in ("fedit", "flexlora"):
        config = json.loads((tmp_path / "out" / "adapters" / f"{method}-peft" / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(bert_folder.resolve())
        assert config["target_modules"] == ["query", "value"]  # PEFT's default for model_type "bert"


def test_main_runs_a_causal_lm_folder(llama_folder, tmp_path, monkeypatch, capsys):
    # Prepare
    monkeypatch.chdir(tmp_path)
    settings = dict(GENERATION, name="g", model=str(llama_folder), methods=["fedit", "flexlora", "hafl"], rounds=2,
                    workers=1)
    # Execute
    status = run.main(_parse([*_sets(settings), "--out", "out", "--no-progress"]))
    # Assert
    assert status == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["perplexity"] > 1 for r in rows)
    config = json.loads((tmp_path / "out" / "adapters" / "fedit-peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(llama_folder.resolve())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["task_type"] == "CAUSAL_LM"


def test_the_packaged_name_and_a_folder_of_its_weights_give_the_same_bytes(bert_folder, tmp_path):
    # Prepare
    settings = tiny_settings(methods=["fedit", "flexlora"], rounds=2, workers=1)
    # Execute
    run_experiment(RunConfig.from_dict(settings), tmp_path / "packaged", progress=False)
    run_experiment(RunConfig.from_dict({**settings, "model": str(bert_folder)}), tmp_path / "folder", progress=False)
    # Assert
    for name in ("metrics.jsonl", "adapters/fedit.safetensors", "adapters/flexlora.safetensors",
                 "adapters/fedit-peft/adapter_model.safetensors"):
        assert (tmp_path / "packaged" / name).read_bytes() == (tmp_path / "folder" / name).read_bytes(), name


def test_the_peft_export_loads_onto_the_folders_model_with_the_runs_logits(bert_folder, tmp_path):
    # Prepare: one FedIT round on the folder's model
    from transformers import AutoModelForSequenceClassification

    sim = make_sim(tmp_path, tiny_settings(model=str(bert_folder)))
    method = make_method("fedit")
    server, _, _, _ = sim.run_round(method, start(sim, method), {}, 1)
    batch = {k: v[:6] for k, v in sim.enc["test"].items() if k in ("input_ids", "attention_mask")}
    sim._load(method.global_model(server))
    with torch.no_grad():
        want = sim.ws.peft.eval()(**batch).logits
    # Execute: the exported adapter, loaded by PEFT itself onto the folder's model
    sim._save_final(method, server)
    peft_dir = tmp_path / "adapters" / "fedit-peft"
    base = AutoModelForSequenceClassification.from_pretrained(bert_folder, local_files_only=True)
    loaded = PeftModel.from_pretrained(base.eval(), peft_dir).eval()
    # Assert
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, want, rtol=1e-5, atol=1e-6)
    assert json.loads((peft_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(bert_folder.resolve())


def test_a_hub_name_is_found_in_the_local_cache(bert_folder, tmp_path, monkeypatch):
    # Prepare: a Hugging Face cache holding models--org--tiny-bert/snapshots/<hash>/ and refs/main
    from huggingface_hub import constants

    from lowrank_fed.llm.models import base_model_name

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-bert"
    shutil.copytree(bert_folder, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    # Execute
    sim = make_sim(tmp_path / "run", tiny_settings(model="org/tiny-bert"))
    # Assert
    assert sim.model.spec.task == "classification" and sim.model.spec.target_modules == ("query", "value")
    assert base_model_name("org/tiny-bert") == "org/tiny-bert"
    assert not (tmp_path / "run").exists()  # set-up writes nothing


def test_a_bfloat16_run_on_the_cpu_finishes(llama_folder, tmp_path):
    # Prepare
    cfg = RunConfig.from_dict(dict(GENERATION, name="b", model=str(llama_folder), dtype="bfloat16", device="cpu",
                                   workers=1))
    # Execute
    summary = run_experiment(cfg, tmp_path, progress=False)
    # Assert
    assert summary[0]["final"] > 1 and (tmp_path / "adapters" / "fedit-peft" / "adapter_model.safetensors").exists()


def test_gradient_checkpointing_recomputes_and_keeps_the_loss(bert_folder, tmp_path):
    # Prepare: float64, with and without gradient checkpointing; count the first layer's forward passes
    losses, calls = {}, {}
    for on in (False, True):
        sim = make_sim(tmp_path / str(on), tiny_settings(model=str(bert_folder), dtype="float64",
                                                         gradient_checkpointing=on, local_steps=3,
                                                         workers=1))
        layer = sim.ws.peft.base_model.model.bert.encoder.layer[0]
        count = {"n": 0}
        layer.attention.register_forward_hook(lambda *_: count.__setitem__("n", count["n"] + 1))
        method = make_method("fedit")
        # Execute
        _, _, rows, _ = sim.run_round(method, start(sim, method), {}, 1)
        losses[on] = [row["train_loss"] for row in rows]
        calls[on] = count["n"]
        assert layer.gradient_checkpointing is on
    # Assert: the same losses; each training step ran the layer once more (recomputed in the backward pass)
    assert calls[True] == calls[False] + 3 * 3
    _close(losses[True], losses[False])


def _close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-5)


# ----------------------------------------------------------------------------- bad input: exit 2, nothing written


def _bad_models(root: Path, bert: Path) -> dict:
    no_weights = root / "no_weights"
    no_weights.mkdir()
    shutil.copy(bert / "config.json", no_weights / "config.json")
    no_tokenizer = root / "no_tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(bert / name, no_tokenizer / name)
    return {
        "no_weights": ({"model": str(no_weights)}, "model", "no weights"),
        "unknown_model_type": ({"model": str(_fake_config(root / "odd", model_type="no-such-model",
                                                           architectures=["OddForSequenceClassification"]))},
                               "model", "model_type 'no-such-model'"),
        "architecture_of_neither_task": ({"model": str(_fake_config(root / "t5", model_type="t5",
                                                                     architectures=["T5ForConditionalGeneration"]))},
                                         "task", "cannot tell its task"),
        "hub_name_not_cached": ({"model": "org/not-cached"}, "model", "'org/not-cached' is not there"),
        "generation_on_an_encoder": ({"model": str(bert), **GENERATION, "task": "generation"}, "task",
                                     "not a decoder"),
        "classification_without_a_class": (
            {"model": str(_fake_config(root / "codegen", model_type="codegen", architectures=["CodeGenForCausalLM"])),
             "task": "classification"}, "task", "has none for model_type 'codegen'"),
        "no_peft_default": ({"model": str(_fake_config(root / "albert", model_type="albert",
                                                        architectures=["AlbertForSequenceClassification"]))},
                            "target_modules", "PEFT has no default for model_type 'albert'"),
        "max_length_above_positions": ({"model": str(bert), "max_length": 600}, "max_length",
                                       "max_position_embeddings = 512"),
        "no_tokenizer": ({"model": str(no_tokenizer)}, "model", "holding its tokenizer"),
        "dataset_of_another_task": ({"model": str(bert), "dataset": "copy"}, "dataset",
                                    "a classification dataset for model"),
    }


BAD = ["no_weights", "unknown_model_type", "architecture_of_neither_task", "hub_name_not_cached",
       "generation_on_an_encoder", "classification_without_a_class", "no_peft_default", "max_length_above_positions",
       "no_tokenizer", "dataset_of_another_task"]


@pytest.mark.parametrize("case", BAD)
def test_a_bad_model_exits_2_naming_it_and_writes_nothing(case, bert_folder, tmp_path, monkeypatch, capsys):
    # Prepare: an empty Hugging Face cache; the working folder holds the bad models only
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    models = tmp_path / "models"
    models.mkdir()
    overrides, key, fragment = _bad_models(models, bert_folder)[case]
    monkeypatch.chdir(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    # Execute
    status = run.main(_parse([*_sets(tiny_settings(**overrides)), "--out", "out", "--no-progress"]))
    # Assert
    err = capsys.readouterr().err
    assert status == 2
    assert f"Config key '{key}'" in err and fragment in err, err
    assert len(err.strip().splitlines()) == 1
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_build_model_names_the_task_that_does_not_fit(bert_folder):
    # Prepare
    cfg = RunConfig.from_dict(tiny_settings(model=str(bert_folder), **GENERATION, task="generation"))
    # Execute / Assert
    with pytest.raises(ConfigError, match="Config key 'task'.*not a decoder"):
        build_model(cfg, build_federation(cfg).shared, 0, 4)


# ----------------------------------------------------------------------------- on Flower


def test_a_folder_model_through_flowers_strategy_and_clientapp_equals_the_runner(bert_folder, tmp_path, monkeypatch):
    # Prepare: Flower's task identity (as tests/llm/test_flower.py sets it), the runner's reference run
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity

    from lowrank_fed.llm.flower.engine import FlowerSimulation
    from tests.llm.test_flower import InlineGrid

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = RunConfig.from_dict(tiny_settings(model=str(bert_folder), methods=["flexlora"], rounds=2, workers=1))
    run_experiment(cfg, tmp_path / "ref", progress=False)
    # Execute: each client's round through Flower messages to its node's ClientApp, which loads the folder itself
    FlowerSimulation(cfg, tmp_path / "fl", progress=False).serve(InlineGrid(cfg.clients))
    # Assert
    for name in ("metrics.jsonl", "adapters/flexlora.safetensors", "adapters/flexlora-peft/adapter_config.json"):
        assert (tmp_path / "fl" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
