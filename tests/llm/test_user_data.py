"""A user's own data (``dataset = "PATH"``): formats, splits, label sets, instruction encoding, runs, bad inputs.

Runs go through ``lowrank-fed run`` (``run.main``) on the tiny models, one or two rounds.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

from lowrank_fed.llm import run  # noqa: E402
from lowrank_fed.llm.config import RunConfig  # noqa: E402
from lowrank_fed.llm.data import encode_generation  # noqa: E402
from lowrank_fed.llm.data.files import (DataFileError, data_label_set, load_data_file, read_data,  # noqa: E402
                                        to_text_dataset)
from lowrank_fed.llm.data.instructions import count_truncated, encode_instructions, instruction_ids  # noqa: E402
from lowrank_fed.llm.federation import DataSource, build_federation, encode_examples  # noqa: E402
from lowrank_fed.llm.models.tiny import word_tokenizer  # noqa: E402

TOPICS = {"sport": "goal match team win", "money": "bank market price trade", "music": "song band album tour"}
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


def _rows(n_per_topic: int = 8) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_per_topic):
        for topic, words in TOPICS.items():
            filler = " ".join(f"w{j}" for j in rng.integers(0, 30, size=6))
            rows.append({"text": f"{words.split()[i % 4]} {filler} {words.split()[(i + 1) % 4]}", "label": topic})
    return rows


def _instructions(n: int = 24) -> list[dict]:
    return [{"prompt": f"repeat the words a{i % 5} b{i % 3} c{i % 4}", "response": f"a{i % 5} b{i % 3}"}
            for i in range(n)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cols(**kw):
    base = dict(text_column="text", label_column="label", prompt_column="prompt", response_column="response",
                messages_column=None, labels=[], test_fraction=0.25, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


def _parse(argv):
    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    return parser.parse_args(argv)


def _run(tmp_path, data: Path, *sets: str) -> tuple[int, Path]:
    out = tmp_path / "run"
    argv = ["--set", f'dataset="{data}"', "--set", "clients=3", "--set", "ranks=[2,4,8]", "--set", "rounds=1",
            "--set", "local_steps=2", "--set", "batch_size=4", "--set", "eval_size=20", "--set", "val_size=4",
            "--set", "max_length=32", "--set", 'methods=["fedit","flexlora"]', "--set", "partition=iid",
            "--set", "checkpoint=false", "--no-progress", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    return run.main(_parse(argv)), out


# ----------------------------------------------------------------------------- reading: formats, splits, labels


def test_jsonl_csv_parquet_and_saved_folder_read_to_the_same_dataset(tmp_path):
    # Prepare
    rows = _rows(4)
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    paths = [_jsonl(tmp_path / "d.jsonl", rows), _csv(tmp_path / "d.csv", rows), tmp_path / "d.parquet",
             tmp_path / "saved"]
    # Execute
    read = [read_data(str(p), "classification", _cols()) for p in paths]
    # Assert
    for d in read:
        assert d.texts == [r["text"] for r in rows]
        assert d.label_names == ["money", "music", "sport"]
        assert d.labels.tolist() == read[0].labels.tolist()
        assert d.meta == {"source": "file"}


def test_saved_folder_with_a_test_split_uses_it_and_one_without_is_split_by_label(tmp_path):
    # Prepare
    rows = _rows(8)
    train, test = datasets.Dataset.from_list(rows[:18]), datasets.Dataset.from_list(rows[18:])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "both"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "one"))
    # Execute
    tr, te = load_data_file(str(tmp_path / "both"), "classification", _cols())
    tr1, te1 = load_data_file(str(tmp_path / "one"), "classification", _cols())
    # Assert: the folder's own splits; else round(0.25 * 8) = 2 test rows of each of the 3 labels
    assert tr.texts == [r["text"] for r in rows[:18]] and te.texts == [r["text"] for r in rows[18:]]
    assert len(te1) == 6 and np.bincount(te1.labels).tolist() == [2, 2, 2] and len(tr1) == 18
    assert sorted(tr1.texts + te1.texts) == sorted(r["text"] for r in rows)


def test_string_and_integer_labels_and_the_label_set(tmp_path):
    # Prepare
    ints = [{"text": f"t{i}", "label": [10, 2, 7][i % 3]} for i in range(6)]
    a = _jsonl(tmp_path / "a.jsonl", ints)
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": 30}])
    # Execute
    d = read_data(str(a), "classification", _cols())
    union = data_label_set([str(a), str(b)], _cols())
    given = data_label_set([str(a)], _cols(labels=["7", "2", "10"]))
    # Assert: integers sort numerically; the config's labels keep their order
    assert d.label_names == ["2", "7", "10"] and d.labels.tolist() == [2, 0, 1, 2, 0, 1]
    assert union == ["2", "7", "10", "30"] and given == ["7", "2", "10"]
    with pytest.raises(DataFileError, match=r"row 0, column 'label'.*label set \['2', '7', '10'\]; got 30"):
        read_data(str(b), "classification", _cols(), labels=union[:3])


def test_messages_become_prompt_turns_and_the_last_assistant_response(tmp_path):
    # Prepare
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name?"},
            {"role": "assistant", "content": "bob"}]
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": chat}])
    # Execute
    d = read_data(str(path), "generation", _cols(messages_column="messages"))
    # Assert
    assert d.targets == ["bob"] and d.turns == [chat[:4]]
    assert d.texts == ["system: be brief\nuser: hi\nassistant: hello\nuser: name?"]
    assert d.subset([0]).turns == [chat[:4]]


# ----------------------------------------------------------------------------- instruction encoding


def _tokenizer(template: str | None = None):
    tok = word_tokenizer(["<user>", "<assistant>", "repeat", "the", "words"] + [f"{c}{i}" for c in "abc"
                                                                               for i in range(5)], causal=True)
    tok.chat_template = template
    return tok


def _generation(rows, **kw):
    return to_text_dataset(datasets.Dataset.from_list(rows), "generation", _cols(**kw), path="x.jsonl")


@pytest.mark.parametrize("template", [None, TEMPLATE])
def test_labels_are_minus_100_exactly_on_the_prompt_and_padding(template):
    # Prepare
    tok = _tokenizer(template)
    examples = _generation(_instructions(2))
    prompt0 = tok("<user> repeat the words a0 b0 c0 <assistant>" if template else "repeat the words a0 b0 c0",
                  add_special_tokens=False)["input_ids"]
    # Execute
    enc = encode_instructions(tok, examples, 32)
    # Assert: row 0 is prompt, response "a0 b0", eos; row 1 has the same lengths; padding right
    eos = tok.eos_token_id
    response = tok("a0 b0", add_special_tokens=False)["input_ids"] + [eos]
    n_p = len(prompt0)
    assert enc["input_ids"][0].tolist()[:n_p] == prompt0
    assert enc["labels"][0].tolist() == [-100] * n_p + response + [-100] * (enc["labels"].shape[1] - n_p - 3)
    assert (enc["labels"] != -100).sum().item() == 6
    assert enc["prompt_ids"][0].tolist()[-n_p:] == prompt0 and enc["prompt_mask"].sum().item() == 2 * n_p


def test_the_loss_is_the_mean_cross_entropy_over_the_response_tokens_of_a_two_example_batch():
    # Prepare
    from lowrank_fed.llm.models import load_model

    rows = [{"prompt": "repeat the words a1 b2", "response": "a1"}, {"prompt": "repeat a3", "response": "a3 b1 c2"}]
    examples = _generation(rows)
    model, tok, _ = load_model("tiny-llama", num_labels=1, seed=0, dtype=torch.float32,
                               vocabulary=["repeat", "the", "words", "a1", "b2", "a3", "b1", "c2"])
    tok.chat_template = TEMPLATE
    enc = encode_instructions(tok, examples, 32)
    # Execute
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=enc["labels"])
    # Assert: by hand, -log softmax of the next token at each response position, averaged over the 2 + 4 of them
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    terms = []
    for i, n_prompt in enumerate(len(tok(f"<user> {r['prompt']} <assistant>", add_special_tokens=False)["input_ids"])
                                 for r in rows):
        n_resp = len(rows[i]["response"].split()) + 1
        for t in range(n_prompt, n_prompt + n_resp):
            terms.append(-logp[i, t - 1, enc["input_ids"][i, t]])
    assert len(terms) == 6
    assert out.loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_an_example_longer_than_max_length_keeps_its_response_and_the_end_of_its_prompt():
    # Prepare
    tok = _tokenizer()
    long = "repeat " + " ".join(f"a{i % 5}" for i in range(20))
    examples = _generation([{"prompt": long, "response": "b1 b2"}, {"prompt": "a1", "response": "b1"},
                            {"prompt": "a1", "response": " ".join(["c1"] * 12)}])
    # Execute
    p, r, cut = instruction_ids(tok, long, "b1 b2", 8)
    p3, r3, cut3 = instruction_ids(tok, "a1", " ".join(["c1"] * 12), 8)
    # Assert: 5 prompt tokens (the last ones) + 2 response tokens + eos; a too-long response keeps 6 and eos
    assert cut and len(p) + len(r) == 8 and r == tok("b1 b2", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert p == tok(long, add_special_tokens=False)["input_ids"][-5:]
    assert cut3 and len(p3) == 1 and len(r3) == 7 and r3[-1] == tok.eos_token_id
    assert count_truncated(tok, examples, 8) == 2 and count_truncated(tok, examples, 64) == 0
    assert encode_instructions(tok, examples, 8)["input_ids"].shape[1] == 8


def test_a_tiny_models_vocabulary_holds_the_words_of_the_responses_too(tmp_path):
    # Prepare: "zebra" is in no prompt, only in responses
    rows = [{"prompt": f"say a{i}", "response": f"zebra a{i}"} for i in range(12)]
    data = _jsonl(tmp_path / "z.jsonl", rows)
    cfg = RunConfig.from_dict(dict(model="tiny-llama", dataset=str(data), clients=2, ranks=[2, 2], val_size=2,
                                   partition="iid"))
    # Execute
    shared = build_federation(cfg).shared
    # Assert
    assert "zebra" in shared.vocabulary and "say" in shared.vocabulary


def test_packaged_generation_keeps_its_article_headline_encoding():
    # Prepare: the copy task is packaged (no file meta), so encode_examples takes encode_generation
    cfg = RunConfig.from_dict(dict(model="tiny-llama", dataset="copy", clients=2, ranks=[2, 2]))
    source = DataSource(cfg)
    tok = _tokenizer()
    # Execute
    examples = source.test.subset([0, 1])
    enc = encode_examples(tok, examples, 64)
    # Assert
    expected = encode_generation(tok, examples.texts, examples.targets, 64)
    assert set(enc) == set(expected) and all(torch.equal(enc[k], expected[k]) for k in enc)


# ----------------------------------------------------------------------------- runs through lowrank-fed run


def test_main_runs_a_classification_file_and_reports_accuracy(tmp_path, capsys):
    # Prepare
    data = _csv(tmp_path / "topics.csv", _rows(12))
    # Execute
    status, out = _run(tmp_path, data, 'model="tiny-bert"')
    # Assert
    assert status == 0, capsys.readouterr().err
    setup = json.loads((out / "setup.json").read_text())
    assert setup["label_names"] == ["money", "music", "sport"] and setup["eval_size"] == 6  # round(0.2 * 12) x 3
    assert "truncated_examples" not in setup
    final = {r["method"]: r["final"] for r in json.loads((out / "summary.json").read_text())}
    assert set(final) == {"fedit", "flexlora"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 4 and all(0 <= m["accuracy"] <= 1 and np.isfinite(m["loss"]) for m in metrics)


@pytest.mark.parametrize("chat", [False, True])
def test_main_runs_an_instruction_file_and_reports_perplexity_and_rouge_l(tmp_path, capsys, chat):
    # Prepare: prompt/response columns, or the same examples as messages
    rows = _instructions(24)
    if chat:
        rows = [{"conv": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
                for r in rows]
    data = _jsonl(tmp_path / "instr.jsonl", rows)
    extra = ['messages_column="conv"'] if chat else []
    # Execute
    status, out = _run(tmp_path, data, 'model="tiny-llama"', "rouge_size=4", "max_new_tokens=4", "max_length=8",
                       'partition="dirichlet"', *extra)  # dirichlet over one group
    # Assert: round(0.2 * 24) = 5 test rows, 4 validation rows, 15 training rows; every example, "repeat the words
    # aX bY cZ" (6 tokens) + "\n" + "aX bY" + eos, is 9 > 8 tokens, so each is truncated
    assert status == 0, capsys.readouterr().err
    setup = json.loads((out / "setup.json").read_text())
    assert setup["task"] == "generation" and setup["eval_size"] == 5 and sum(setup["n_k"]) == 15
    assert setup["truncated_examples"] == {"train": 15, "val": 4, "test": 5}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["perplexity"]) for m in metrics)
    assert all(0 <= r["rouge_l"] <= 1 for r in json.loads((out / "summary.json").read_text()))
    assert sum("rouge_l" in m for m in metrics) == 4  # round 0 and the last round of each method
    assert all(s["reference"] in {r.get("response") for r in _instructions(24)} for s in metrics[-1]["samples"])


# ----------------------------------------------------------------------------- bad inputs: exit 2, nothing written


def _bad(tmp_path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


BAD = [
    ("missing.jsonl", None, 'model="tiny-bert"', ["dataset", "does not exist"]),
    ("empty.jsonl", "", 'model="tiny-bert"', ["empty.jsonl", "empty"]),
    ("nolabel.jsonl", '{"text": "a b"}\n' * 6, 'model="tiny-bert"', ["nolabel.jsonl", "'label'", "label_column"]),
    ("outside.jsonl", '{"text": "a b", "label": "x"}\n' * 5 + '{"text": "a", "label": "z"}\n', 'model="tiny-bert"',
     ["outside.jsonl", "row 5", "'label'", "['x', 'y']", "'z'"]),
    ("emptytext.jsonl", '{"text": "a b", "label": "x"}\n' * 5 + '{"text": " ", "label": "x"}\n', 'model="tiny-bert"',
     ["emptytext.jsonl", "row 5", "'text'", "non-empty string"]),
    ("badmsg.jsonl", '{"m": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n' * 5
     + '{"m": "hello"}\n', 'model="tiny-llama"', ["badmsg.jsonl", "row 5", "'m'", "list of {role, content}"]),
    ("noanswer.jsonl", '{"m": [{"role": "user", "content": "a"}]}\n' * 6, 'model="tiny-llama"',
     ["noanswer.jsonl", "row 0", "assistant turn"]),
    ("broken.jsonl", '{"text": "a", "label": "x"}\n{not json\n', 'model="tiny-bert"',
     ["broken.jsonl", "expected a readable .jsonl data source", "reading it failed"]),
    ("broken.csv", 'text,label\na,x\n"b,y\n', 'model="tiny-bert"', ["broken.csv", "ParserError"]),
    ("wrongtask.jsonl", '{"text": "a b", "label": "x"}\n' * 6, 'model="tiny-llama"',
     ["wrongtask.jsonl", "'prompt'", "classification columns", "task is generation"]),
]


@pytest.mark.parametrize("name, content, model, words", BAD, ids=[b[0] for b in BAD])
def test_main_refuses_a_bad_data_file_with_exit_2_and_writes_nothing(tmp_path, capsys, name, content, model, words):
    # Prepare
    path = tmp_path / name if content is None else _bad(tmp_path, name, content)
    sets = [model, 'labels=["x","y"]'] if name == "outside.jsonl" else [model]
    if name in ("badmsg.jsonl", "noanswer.jsonl"):
        sets.append('messages_column="m"')
    before = sorted(p.name for p in tmp_path.iterdir())
    # Execute
    status, out = _run(tmp_path, path, *sets)
    # Assert
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before
