"""Whole PEFT adapters: read what PEFT wrote, aggregate exactly, write what PEFT loads, refuse what we cannot fold.

The reference is computed independently of the bridge: ``W0 + sum_k p_k s_k B_k A_k`` from the raw PEFT
tensors and each client's own scale, against PEFT's ``merge_and_unload`` of the written global adapter.
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lowrank_fed import FactorPair  # noqa: E402
from lowrank_fed.llm import (Adapter, aggregate_adapters, load_peft_adapter, redistribute_adapter,  # noqa: E402
                             save_peft_adapter)
from lowrank_fed.llm.models import tiny_bert  # noqa: E402

TARGETS = ["query", "value"]
CLIENTS = [  # (r, alpha, rslora, rank_pattern)
    dict(r=2, lora_alpha=4),
    dict(r=4, lora_alpha=16, use_rslora=True),
    dict(r=8, lora_alpha=8, rank_pattern={"layer.1.attention.self.value": 3}),
    dict(r=6, lora_alpha=32),
]


def _base(seed=0):
    return tiny_bert(3, vocab_size=50, seed=seed).eval()


def _client(tmp_path, k, spec):
    """A PEFT adapter made by PEFT itself, with random non-zero factors, saved with save_pretrained."""
    model = get_peft_model(_base(), LoraConfig(target_modules=TARGETS, **spec))
    gen = torch.Generator().manual_seed(100 + k)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    folder = tmp_path / f"client{k}"
    model.save_pretrained(folder)
    return folder, model


def _clients(tmp_path):
    """The four CLIENTS' folders, and each PEFT model with its spec (for the reference)."""
    made = [_client(tmp_path, k, spec) for k, spec in enumerate(CLIENTS)]
    return [f for f, _ in made], [(m, spec) for (_, m), spec in zip(made, CLIENTS, strict=True)]


def _scale(spec, module):
    """The client's own PEFT scale: alpha / r (or alpha / sqrt(r)), r from a rank_pattern key the name ends with."""
    r = next((v for key, v in spec.get("rank_pattern", {}).items() if module.endswith(key)), spec["r"])
    return spec["lora_alpha"] / (r ** 0.5 if spec.get("use_rslora") else r)


@torch.no_grad()
def _reference(models, weights):
    """W0 + sum_k p_k s_k B_k A_k per adapted module, from the raw PEFT tensors."""
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    base = dict(_base().named_parameters())
    out = {}
    for (model, spec), pk in zip(models, p, strict=True):
        for name, mod in model.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                module = name.replace("base_model.model.", "")
                B = mod.lora_B["default"].weight.double()
                A = mod.lora_A["default"].weight.double()
                delta = pk * _scale(spec, module) * (B @ A)
                key = module + ".weight"
                out[key] = out.get(key, base[key].double().detach().clone()) + delta
    return out


def test_peft_adapters_merge_exactly_to_what_peft_loads(tmp_path):
    folders, models = _clients(tmp_path)
    adapters = [load_peft_adapter(f) for f in folders]
    assert adapters[2].ranks["bert.encoder.layer.1.attention.self.value"] == 3
    weights = [10, 20, 30, 40]
    merged = aggregate_adapters("svd", adapters, weights)
    out = save_peft_adapter(tmp_path / "global", merged, lora_alpha=16, base_model_name_or_path="tiny-bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT loads it without a warning (missing or unexpected keys)
        loaded = PeftModel.from_pretrained(_base(), out)
    merged_model = loaded.merge_and_unload()
    expected = _reference(models, weights)
    got = {k: v.detach() for k, v in merged_model.named_parameters()}
    assert len(expected) == 4
    for key, want in expected.items():
        torch.testing.assert_close(got[key].double(), want, rtol=0, atol=2e-5 * float(want.abs().max()))
    # the folder round-trips: reading it back gives the same products
    again = load_peft_adapter(out)
    for m, pair in merged.pairs.items():
        torch.testing.assert_close(again.pairs[m].B @ again.pairs[m].A, pair.B @ pair.A, rtol=1e-5, atol=1e-6)


def test_redistribute_adapter_follows_the_client_config(tmp_path):
    folder, _ = _client(tmp_path, 2, CLIENTS[2])
    adapter = load_peft_adapter(folder)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, rank_pattern={"layer.1.attention.self.value": 1})
    share = redistribute_adapter(adapter, cfg)
    ranks = share.ranks
    assert ranks["bert.encoder.layer.1.attention.self.value"] == 1 and ranks["bert.encoder.layer.0.attention.self.query"] == 2
    for m, pair in share.pairs.items():  # the best rank-r_m approximation (Eckart-Young)
        full = (adapter.pairs[m].B @ adapter.pairs[m].A).double()
        U, S, Vh = torch.linalg.svd(full)
        r = ranks[m]
        torch.testing.assert_close((pair.B @ pair.A).double(), (U[:, :r] * S[:r]) @ Vh[:r], rtol=1e-4, atol=1e-5)
    out = save_peft_adapter(tmp_path / "share", share)
    saved = LoraConfig.from_pretrained(str(out))
    assert saved.lora_alpha == 4  # the client's own alpha


def test_a_module_missing_from_some_clients_is_averaged_over_its_holders():
    pair = lambda v: FactorPair(torch.full((3, 1), float(v)), torch.ones(1, 2))  # noqa: E731
    a = Adapter({"m": pair(1.0), "only_a": pair(5.0)})
    b = Adapter({"m": pair(3.0)})
    out = aggregate_adapters("svd", [a, b], [1, 3])
    torch.testing.assert_close(out.pairs["m"].B @ out.pairs["m"].A, torch.full((3, 2), 2.5), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.pairs["only_a"].B @ out.pairs["only_a"].A, torch.full((3, 2), 5.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("spec, named", [
    (dict(r=4, use_dora=True), "use_dora = True"),
    (dict(r=4, lora_bias=True), "lora_bias = True"),
])
def test_dora_and_lora_bias_are_refused_by_name(tmp_path, spec, named):
    model = get_peft_model(_base(), LoraConfig(target_modules=TARGETS, **spec))
    model.save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match=named):
        load_peft_adapter(tmp_path / "a")


def test_a_magnitude_vector_in_the_tensors_is_refused_even_without_the_config_flag(tmp_path):
    sd = {"base_model.model.q.lora_A.weight": torch.ones(2, 3), "base_model.model.q.lora_B.weight": torch.ones(4, 2),
          "base_model.model.q.lora_magnitude_vector": torch.ones(4)}
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        load_peft_adapter((sd, LoraConfig(r=2, lora_alpha=4)))
    emb = {"base_model.model.e.lora_embedding_A": torch.ones(2, 3), "base_model.model.e.lora_embedding_B": torch.ones(4, 2)}
    with pytest.raises(ValueError, match="embedding LoRA"):
        load_peft_adapter((emb, LoraConfig(r=2, lora_alpha=4)))


def test_bad_input_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_peft_adapter(tmp_path)
    with pytest.raises(ValueError, match="Unknown rule 'mean'"):
        aggregate_adapters("mean", [Adapter({"m": FactorPair(torch.ones(2, 1), torch.ones(1, 2))})])
    with pytest.raises(ValueError, match="Module 'm': .* different shapes"):
        aggregate_adapters("svd", [Adapter({"m": FactorPair(torch.ones(2, 1), torch.ones(1, 2))}),
                                   Adapter({"m": FactorPair(torch.ones(3, 1), torch.ones(1, 2))})])


# ----------------------------------------------------------------------------- lowrank-fed merge
def _merge(*argv):
    from lowrank_fed.cli import main

    return main(["merge", *map(str, argv), "--no-progress"])


def test_merge_cli_is_exact_and_writes_per_client_shares(tmp_path):
    folders, models = _clients(tmp_path)
    out, shares = tmp_path / "global", tmp_path / "shares"
    assert _merge(*folders, "--rule", "svd", "--weights", 10, 20, 30, 40, "--out", out, "--per-client", shares) == 0
    merged = PeftModel.from_pretrained(_base(), out).merge_and_unload()
    got = {k: v.detach() for k, v in merged.named_parameters()}
    for key, want in _reference(models, [10, 20, 30, 40]).items():
        torch.testing.assert_close(got[key].double(), want, rtol=0, atol=2e-5 * float(want.abs().max()))
    for k, spec in enumerate(CLIENTS):  # each share in the client's own config: its alpha and ranks
        cfg = LoraConfig.from_pretrained(str(shares / f"client{k}"))
        assert cfg.lora_alpha == spec["lora_alpha"] and cfg.r == spec["r"]
    # svd --rank 2: the Eckart-Young truncation of the same sum
    low = tmp_path / "low"
    assert _merge(*folders, "--rule", "svd", "--rank", "2", "--out", low) == 0
    assert set(load_peft_adapter(low).ranks.values()) == {2}


def test_merge_refuses_bad_input_before_writing(tmp_path, capsys):
    folder, _ = _client(tmp_path, 0, CLIENTS[0])
    out = tmp_path / "out"
    assert _merge(folder, folder, "--rule", "mean", "--out", out) == 2
    assert "--rule 'mean' is unknown" in capsys.readouterr().err
    assert _merge(folder, folder, "--rule", "svd", "--weights", 1, "--out", out) == 2
    assert "expected 2 finite non-negative numbers" in capsys.readouterr().err
    assert _merge(folder, tmp_path / "nowhere", "--rule", "svd", "--out", out) == 2
    assert "nowhere: no such folder; expected a PEFT adapter folder." in capsys.readouterr().err
    assert _merge(folder, folder, "--rule", "zero_pad", "--rank", "2", "--out", out) == 2
    assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")
    assert _merge(folder, folder, "--rule", "svd", "--out", out) == 2
    assert (out / "keep.txt").read_text() == "an earlier result"


@pytest.mark.parametrize("text,why", [('{"r": 4,', "JSONDecodeError"), ("[1, 2]", "TypeError"),
                                      (b"\xff\xfe", "UnicodeDecodeError")])
def test_merge_names_the_adapter_config_it_cannot_read(tmp_path, capsys, text, why):
    # Prepare: one good client, one whose adapter_config.json is not a JSON object
    good, _ = _client(tmp_path, 0, CLIENTS[0])
    bad = tmp_path / "bad"
    bad.mkdir()
    config = bad / "adapter_config.json"
    config.write_bytes(text if isinstance(text, bytes) else text.encode())

    # Execute
    status = _merge(good, bad, "--rule", "svd", "--out", tmp_path / "out")

    # Assert: one line naming the file and the parse error; nothing written
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1
    assert f"{config}: cannot be read as a PEFT config: {why}" in err
    assert not (tmp_path / "out").exists()


def test_merge_of_a_missing_folder_or_a_file_says_so(tmp_path, capsys):
    # Prepare
    good, _ = _client(tmp_path, 0, CLIENTS[0])
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not an adapter")

    # Execute
    missing = _merge(good, tmp_path / "gone", "--rule", "svd", "--out", tmp_path / "out")
    missing_err = capsys.readouterr().err
    not_folder = _merge(good, a_file, "--rule", "svd", "--out", tmp_path / "out")
    not_folder_err = capsys.readouterr().err

    # Assert
    assert missing == 2 and f"{tmp_path / 'gone'}: no such folder" in missing_err
    assert not_folder == 2 and f"{a_file}: is not a folder" in not_folder_err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threshold", [None, "gap", "3"])
def test_merge_robust_leaves_out_the_clients_trained_on_another_task(tmp_path, capsys, threshold):
    # Benign clients: updates in one shared column space (plus small noise); contaminated: other directions.
    gen = torch.Generator().manual_seed(0)
    base = _base()
    shapes = {n.replace(".weight", ""): p.shape for n, p in base.named_parameters()
              if n.endswith(("query.weight", "value.weight"))}
    U = {m: torch.linalg.qr(torch.randn(s[0], 2, generator=gen))[0] for m, s in shapes.items()}
    folders = []
    for k in range(8):
        pairs = {}
        for m, (d_out, d_in) in shapes.items():
            if k < 6:
                B = U[m] @ torch.randn(2, 2, generator=gen) + 1e-3 * torch.randn(d_out, 2, generator=gen)
            else:
                B = torch.randn(d_out, 2, generator=gen)
            pairs[m] = FactorPair(B, torch.randn(2, d_in, generator=gen))
        folders.append(save_peft_adapter(tmp_path / f"c{k}", Adapter(pairs), lora_alpha=4))
    out = tmp_path / "global"
    decision = [] if threshold is None else ["--threshold", threshold]  # the default (the gap rule) or a number
    assert _merge(*folders, "--rule", "svd", "--robust", *decision, "--out", out, "--per-client", tmp_path / "shares") == 0
    text = capsys.readouterr().out
    assert ("largest significant gap" if threshold != "3" else "flagged above 3") in " ".join(text.split())
    flagged = [line.split()[1] for line in text.splitlines() if "FLAGGED" in line]
    assert flagged == ["c6", "c7"], text
    assert sorted(p.name for p in (tmp_path / "shares").iterdir()) == [f"c{k}" for k in range(6)]
    merged = load_peft_adapter(out)
    for m in shapes:  # the benign mean only
        benign = sum((load_peft_adapter(folders[k]).pairs[m].B @ load_peft_adapter(folders[k]).pairs[m].A) for k in range(6)) / 6
        torch.testing.assert_close(merged.pairs[m].B @ merged.pairs[m].A, benign, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("argv, expected", [
    (["--robust", "--threshold", "median"], "--threshold: expected 'gap' or a finite positive z-score cut; got 'median'"),
    (["--robust", "--threshold", "-1"], "--threshold: expected 'gap' or a finite positive z-score cut; got '-1'"),
    (["--threshold", "3"], "--threshold 3 is --robust's decision; give --robust too"),
])
def test_merge_refuses_a_bad_threshold_before_reading_anything(tmp_path, capsys, argv, expected):
    missing = [tmp_path / f"c{k}" for k in range(3)]  # never read: the options are checked first
    assert _merge(*missing, "--rule", "svd", *argv, "--out", tmp_path / "out") == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_per_client_shares_stay_in_each_clients_own_config(tmp_path):
    # Prepare: client 0 adapts query only, with an alpha_pattern; client 1 adapts query and value, with a head
    from lowrank_fed.llm.peft_bridge import lora_scale

    spec0 = dict(r=4, lora_alpha=8, alpha_pattern={"layer.1.attention.self.query": 2})
    model0 = get_peft_model(_base(), LoraConfig(target_modules=["query"], **spec0))
    model1 = get_peft_model(_base(), LoraConfig(target_modules=TARGETS, r=2, lora_alpha=4,
                                                modules_to_save=["classifier"]))
    gen = torch.Generator().manual_seed(3)
    for k, model in enumerate((model0, model1)):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.save_pretrained(tmp_path / f"c{k}")
    # Execute
    assert _merge(tmp_path / "c0", tmp_path / "c1", "--rule", "svd", "--out", tmp_path / "g",
                  "--per-client", tmp_path / "shares") == 0
    # Assert: client 0's share holds its own modules only, no head, and its own per-module alphas
    share, own = load_peft_adapter(tmp_path / "shares" / "c0"), load_peft_adapter(tmp_path / "c0")
    assert set(share.pairs) == set(own.pairs) and not share.extras
    assert {m: lora_scale(share.config, m) for m in own.pairs} == {m: lora_scale(own.config, m) for m in own.pairs}
    assert len(set(lora_scale(share.config, m) for m in own.pairs)) == 2  # the alpha_pattern survived
    assert set(load_peft_adapter(tmp_path / "shares" / "c1").extras) == set(load_peft_adapter(tmp_path / "c1").extras)


# ----------------------------------------------------------------------------- PEFT's known merge failures
def test_merge_with_an_rslora_adapter_first_is_exact(tmp_path):
    # PEFT's add_weighted_adapter takes the first adapter's use_rslora for all of them (3-6x off when it is rsLoRA)
    folders, models = _clients(tmp_path)
    order = [1, 0, 3, 2]  # CLIENTS[1] is the rsLoRA one
    assert CLIENTS[order[0]].get("use_rslora")
    weights = [10, 20, 30, 40]
    assert _merge(*[folders[k] for k in order], "--rule", "svd", "--weights", *weights, "--out", tmp_path / "g") == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        merged = PeftModel.from_pretrained(_base(), tmp_path / "g").merge_and_unload()
    got = {k: v.detach() for k, v in merged.named_parameters()}
    for key, want in _reference([models[k] for k in order], weights).items():
        torch.testing.assert_close(got[key].double(), want, rtol=0, atol=2e-5 * float(want.abs().max()))


def test_convolution_lora_is_refused_by_name(tmp_path):
    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x)

    model = get_peft_model(Conv(), LoraConfig(target_modules=["conv"], r=2))
    model.save_pretrained(tmp_path / "conv")
    with pytest.raises(ValueError, match="convolution LoRA"):
        load_peft_adapter(tmp_path / "conv")
