"""One implementation of the merge: ``lowrank-fed merge`` calls :func:`~lowrank_fed.llm.adapters.aggregate_adapters`.

The command's written adapter is, tensor for tensor, what ``aggregate_adapters`` returns for the same options
(``--missing zero`` / ``holders``, ``--rank``, ``--allow-negative``); the library function's new options keep
their equations (``missing="zero"`` scales a module by its holders' share of the weight, ``rank`` keeps a sum of
lower rank exactly), and what it refuses it names (module or head, the holders). The command aggregates the
modules in threads (the whole-model path) and writes the bytes the serial path (``workers=1``) gives; a refusal
is the first in module-name order, whichever thread failed first.
"""

from __future__ import annotations

import pickle
import threading

import pytest
from threadpoolctl import threadpool_limits

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import lowrank_fed.aggregation as core_aggregation  # noqa: E402
from lowrank_fed import AGGREGATORS, FactorPair  # noqa: E402
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
    # it crosses a process boundary whole (a worker process may raise it)
    back = pickle.loads(pickle.dumps(caught.value))
    assert (type(back), back.kind, back.where, back.holders, back.reason, str(back)) == (
        MergeError, kind, where, [0, 1], caught.value.reason, str(caught.value))


# ----------------------------------------------------------------------------- the modules in threads
def _in_threads(monkeypatch) -> set[str]:
    """Three cores for aggregate_modules' default (threads even on a one-core machine); the threads that run the
    rule are recorded in the returned set."""
    threads, real = set(), core_aggregation.aggregate

    def recording(*args, **kw):
        threads.add(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(core_aggregation, "available_cores", lambda: 3)
    monkeypatch.setattr(core_aggregation, "aggregate", recording)
    return threads


@pytest.mark.parametrize("argv, rule, kwargs", [
    (["--rule", "svd", "--rank", "2", "--weights", "1", "2", "3"], "svd", {"rank": 2, "weights": [1.0, 2.0, 3.0]}),
    (["--rule", "zero_pad"], "zero_pad", {"weights": [1.0, 1.0, 1.0]}),
])
def test_merge_in_threads_writes_the_bytes_of_the_serial_path(tmp_path, monkeypatch, argv, rule, kwargs):
    # Prepare: ranks 2, 3, 1; the third client lacks enc.k
    folders = _folders(tmp_path)
    threads = _in_threads(monkeypatch)
    # Execute: the command, then aggregate_adapters one module after another, written as the command writes
    status = cli(["merge", *map(str, folders), *argv, "--out", str(tmp_path / "out"), "--no-progress"])
    ran_in = set(threads)
    loaded = [load_peft_adapter(f) for f in folders]
    with threadpool_limits(limits=1):  # as the command runs (LOWRANK_FED_THREADS=1)
        serial = aggregate_adapters(rule, loaded, kwargs.pop("weights"), workers=1, missing="zero", **kwargs)
    save_peft_adapter(tmp_path / "serial", Adapter(serial.pairs, serial.extras, loaded[0].config))
    # Assert: the rule ran off the main thread, and every written file has the serial path's bytes
    assert status == 0 and ran_in and threading.main_thread().name not in ran_in
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "serial").iterdir())
    for name in written:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes(), name


def test_merge_names_the_first_refusal_in_module_order_not_the_first_thread_to_fail(tmp_path, monkeypatch,
                                                                                      capsys):
    # Prepare: svd refuses enc.v at once and enc.q only after enc.v has failed; enc.k is merged
    folders = _folders(tmp_path)
    _in_threads(monkeypatch)
    real, v_failed = AGGREGATORS["svd"], threading.Event()

    def svd(pairs, weights=None, **options):
        if tuple(pairs[0].shape) == SHAPES["enc.v"]:
            v_failed.set()
            raise ValueError("refused enc.v")
        if tuple(pairs[0].shape) == SHAPES["enc.q"]:
            assert v_failed.wait(10), "enc.v never ran"
            raise ValueError("refused enc.q")
        return real(pairs, weights, **options)

    monkeypatch.setitem(AGGREGATORS, "svd", svd)
    # Execute
    status = cli(["merge", *map(str, folders), "--rule", "svd", "--out", str(tmp_path / "out"), "--no-progress"])
    # Assert: the command's one-line refusal of the first module in name order, and nothing written
    assert status == 2 and not (tmp_path / "out").exists()
    assert capsys.readouterr().err == "error: module 'enc.q' (held by ['c0', 'c1', 'c2']): refused enc.q\n"


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("unequal, unweighted, kind", [("a.k", "a.q", "rule"), ("a.q", "a.k", "weight")])
def test_the_first_refusal_in_name_order_whatever_the_workers(workers, unequal, unweighted, kind):
    # Prepare: fedavg refuses the module of unequal ranks; the other is held only by the client of weight 0
    def pair(rank):
        return FactorPair(torch.ones(3, rank), torch.ones(rank, 4))

    adapters = [Adapter({unequal: pair(1)}), Adapter({unequal: pair(2)}), Adapter({unweighted: pair(1)})]
    # Execute
    with pytest.raises(MergeError) as caught:
        aggregate_adapters("fedavg", adapters, [1.0, 1.0, 0.0], workers=workers)
    # Assert: "a.k" comes first, whichever refusal it has
    assert caught.value.kind == kind and caught.value.where == "a.k"
    assert caught.value.holders == ([0, 1] if kind == "rule" else [2])
