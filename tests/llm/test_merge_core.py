"""One implementation of the merge: ``lowrank-fed merge`` calls :func:`~lowrank_fed.llm.adapters.aggregate_adapters`.

The command's written adapter is, tensor for tensor, what ``aggregate_adapters`` returns for the same options
(``--missing zero`` / ``holders``, ``--rank``, ``--allow-negative``); the library function's new options keep
their equations (``missing="zero"`` scales a module by its holders' share of the weight, ``rank`` keeps a sum of
lower rank exactly), and what it refuses it names (module or head, the holders).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lowrank_fed import FactorPair  # noqa: E402
from lowrank_fed.cli import main as cli  # noqa: E402
from lowrank_fed.llm import Adapter, aggregate_adapters, load_peft_adapter, save_peft_adapter  # noqa: E402
from lowrank_fed.llm import adapters as adapters_module  # noqa: E402
from lowrank_fed.llm.adapters import MergeError  # noqa: E402

SHAPES = {"enc.q": (6, 5), "enc.v": (4, 7), "enc.k": (5, 5)}


def _adapter(seed: int, rank: int, modules=tuple(SHAPES)) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    return Adapter({m: FactorPair(torch.randn(SHAPES[m][0], rank, generator=gen),
                                  torch.randn(rank, SHAPES[m][1], generator=gen)) for m in modules})


def _folders(tmp_path):
    """Three clients: ranks 2, 3, 1; the third lacks ``enc.k``."""
    specs = [(0, 2, tuple(SHAPES)), (1, 3, tuple(SHAPES)), (2, 1, ("enc.q", "enc.v"))]
    return [save_peft_adapter(tmp_path / f"c{k}", _adapter(seed, r, mods), lora_alpha=4)
            for k, (seed, r, mods) in enumerate(specs)]


@pytest.mark.parametrize("argv, kwargs", [
    (["--rule", "svd", "--weights", "1", "2", "3"], {"missing": "zero"}),
    (["--rule", "svd", "--weights", "1", "2", "3", "--missing", "holders", "--rank", "2"],
     {"missing": "holders", "rank": 2}),
    (["--rule", "zero_pad", "--missing", "zero"], {"missing": "zero"}),
    (["--rule", "stack", "--weights", "2", "-1", "0.5", "--allow-negative"], {"coefficients": True}),
])
def test_merge_writes_what_aggregate_adapters_returns(tmp_path, argv, kwargs, monkeypatch):
    # Prepare: the command's calls to aggregate_adapters recorded
    folders = _folders(tmp_path)
    calls = []
    real = adapters_module.aggregate_adapters

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(adapters_module, "aggregate_adapters", spy)
    weights = [float(x) for x in argv[argv.index("--weights") + 1:argv.index("--weights") + 4]] \
        if "--weights" in argv else [1.0, 1.0, 1.0]
    # Execute
    status = cli(["merge", *map(str, folders), *argv, "--out", str(tmp_path / "out"), "--no-progress"])
    written = load_peft_adapter(tmp_path / "out")
    expected = real(argv[1], [load_peft_adapter(f) for f in folders], weights, **kwargs)
    # Assert: one call, and the written adapter is its result (up to float32 writing through lora_B = B / s)
    assert status == 0 and len(calls) == 1
    assert sorted(written.pairs) == sorted(expected.pairs)
    for m, pair in expected.pairs.items():
        assert written.pairs[m].rank == pair.rank
        torch.testing.assert_close(written.pairs[m].B @ written.pairs[m].A, pair.B @ pair.A, rtol=1e-5, atol=1e-6)


def test_missing_zero_scales_each_module_by_its_holders_share_of_the_weight():
    # Prepare
    adapters = [_adapter(0, 2), _adapter(1, 2), _adapter(2, 2, ("enc.q",))]
    weights = [1.0, 3.0, 4.0]
    # Execute
    holders = aggregate_adapters("svd", adapters, weights, missing="holders")
    zero = aggregate_adapters("svd", adapters, weights, missing="zero")
    # Assert: enc.q is held by all (share 1); enc.v by clients 0 and 1 (share 4 / 8)
    assert torch.equal(zero.pairs["enc.q"].B, holders.pairs["enc.q"].B)
    torch.testing.assert_close(zero.pairs["enc.v"].B, holders.pairs["enc.v"].B * 0.5)
    assert torch.equal(zero.pairs["enc.v"].A, holders.pairs["enc.v"].A)


def test_rank_keeps_a_sum_of_lower_rank_exactly_and_details_record_each_module():
    # Prepare: two rank-1 clients: every module's sum has rank 2 < 4
    adapters = [_adapter(0, 1), _adapter(1, 1)]
    details = {}
    # Execute
    merged = aggregate_adapters("svd", adapters, [1.0, 1.0], rank=4, workers=1, details=details)
    # Assert
    assert {m: p.rank for m, p in merged.pairs.items()} == {m: 2 for m in SHAPES}
    assert sorted(details) == sorted(SHAPES)
    d = details["enc.q"]
    assert d.holders == [0, 1] and d.share == 1.0 and d.seconds >= 0 and d.pair is merged.pairs["enc.q"]


@pytest.mark.parametrize("weights, kw, kind, where", [
    ([0.0, 0.0, 1.0], {}, "weight", "enc.k"),
    ([1e38, 1e38, 1.0], {"coefficients": True}, "overflow", "enc.k"),
])
def test_what_cannot_be_merged_is_named(weights, kw, kind, where):
    # Prepare: the third client lacks enc.k (the first module in name order)
    adapters = [_adapter(0, 2), _adapter(1, 2), _adapter(2, 2, ("enc.q", "enc.v"))]
    adapters = [Adapter({m: FactorPair(p.B * 1e3, p.A) for m, p in a.pairs.items()}) for a in adapters]
    # Execute
    with pytest.raises(MergeError) as caught:
        aggregate_adapters("svd", adapters, weights, **kw)
    # Assert
    assert caught.value.kind == kind and caught.value.where == where and caught.value.holders == [0, 1]
    assert repr(where) in str(caught.value)
