"""The screening scores of ``merge --robust``: the properties the equations imply, on NumPy factors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowrank_fed.robust import screening_scores, threshold_flags
from lowrank_fed.robust.screening import alignments, column_factor, module_statistics


def _federation(seed: int, *, K: int = 8, d_out: int = 16, d_in: int = 12):
    """``K`` clients, ranks 2-5, sharing a 2-d column space (plus noise); client 0 lacks module "k"."""
    rng = np.random.default_rng(seed)
    U = {m: np.linalg.qr(rng.standard_normal((d_out, 2)))[0] for m in ("q", "v", "k")}
    updates = []
    for k in range(K):
        r = 2 + k % 4
        mods = ("q", "v") if k == 0 else ("q", "v", "k")
        updates.append({m: (U[m] @ (np.eye(2, r) + 0.2 * rng.standard_normal((2, r)))
                            + 0.02 * rng.standard_normal((d_out, r)), rng.standard_normal((r, d_in)))
                        for m in mods})
    return updates


def _dense_T(B, A):
    """``(Delta W Delta W^T)^{1/2}`` from the dense product (the reference for the factored computation)."""
    w, V = np.linalg.eigh((B @ A) @ (B @ A).T)
    return (V * np.sqrt(np.clip(w, 0, None))) @ V.T


def test_the_factored_alignments_are_the_cosines_of_the_dense_square_root_covariances():
    # Prepare
    rng = np.random.default_rng(0)
    pairs = [(rng.standard_normal((9, r)), rng.standard_normal((r, 7))) for r in (1, 2, 4)]

    # Execute
    a = alignments([column_factor(B, A) for B, A in pairs])

    # Assert
    T = [_dense_T(B, A) for B, A in pairs]
    want = np.array([[np.sum(Ti * Tj) / (np.linalg.norm(Ti) * np.linalg.norm(Tj)) for Tj in T] for Ti in T])
    np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-9)  # the dense square root amplifies rounding


@given(st.integers(0, 10_000), st.floats(1e-3, 1e3))
def test_a_common_rescaling_changes_no_score(seed, c):
    updates = _federation(seed)
    scaled = [{m: (c * B, A) for m, (B, A) in u.items()} for u in updates]
    before, after = screening_scores(updates), screening_scores(scaled)
    np.testing.assert_allclose(after.module_z, before.module_z, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(after.scores, before.scores, rtol=1e-6, atol=1e-6)


@given(st.integers(0, 10_000))
def test_the_subspace_statistic_ignores_each_clients_own_scale_and_factorisation(seed):
    # f depends on Delta W_k only through its column space and profile, not its norm nor its (B, A) split.
    rng = np.random.default_rng(seed)
    pairs = [(B, A) for B, A in (u["q"] for u in _federation(seed))]
    changed = []
    for B, A in pairs:
        M = rng.standard_normal((B.shape[1], B.shape[1])) + 3 * np.eye(B.shape[1])  # invertible
        changed.append((rng.uniform(0.1, 10) * B @ M, np.linalg.solve(M, A)))
    f, _ = module_statistics(pairs)
    f2, _ = module_statistics(changed)
    np.testing.assert_allclose(f2, f, rtol=1e-7, atol=1e-9)


@given(st.integers(0, 10_000), st.permutations(list(range(8))))
def test_scores_are_permutation_equivariant(seed, perm):
    updates = _federation(seed)
    base, permuted = screening_scores(updates), screening_scores([updates[i] for i in perm])
    np.testing.assert_allclose(permuted.scores, base.scores[perm], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(permuted.module_z, base.module_z[:, perm], rtol=1e-9, atol=1e-12)
    assert permuted.worst == tuple(base.worst[i] for i in perm)


@pytest.mark.parametrize("seed", range(5))
def test_a_5x_copy_is_a_norm_outlier_and_a_foreign_subspace_a_subspace_outlier(seed):
    # Prepare: 6 benign, a copy of client 3 scaled 5x, and a client whose q and v leave the shared column space
    rng = np.random.default_rng(100 + seed)
    updates = _federation(seed, K=6)
    updates.append({m: (5 * B, A) for m, (B, A) in updates[3].items()})
    foreign = lambda B: rng.standard_normal(B.shape) * np.linalg.norm(B) / np.sqrt(B.size)  # noqa: E731  same size
    updates.append({m: (foreign(B), A) for m, (B, A) in updates[4].items()})

    # Execute
    found = screening_scores(updates)
    flagged = threshold_flags(found.scores, "gap")

    # Assert
    assert found.worst[6] == "norm" and found.worst[7] == "subspace"
    assert np.flatnonzero(flagged).tolist() == [6, 7], found.scores
    assert found.reason(6).startswith("norm: z ")


def test_the_negative_of_a_benign_adapter_has_its_statistics_exactly():
    # The limit stated in the README: -Delta W has the column space, profile and norm of Delta W.
    updates = _federation(3, K=6)
    pairs = [u["q"] for u in updates] + [(-updates[2]["q"][0], updates[2]["q"][1])]
    f, g = module_statistics(pairs)
    assert f[6] == pytest.approx(f[2], abs=1e-12) and g[6] == pytest.approx(g[2], abs=1e-12)


def test_clients_holding_only_rare_modules_are_not_scored():
    updates = _federation(1, K=6)
    updates.append({"rare": updates[1]["q"]})
    found = screening_scores(updates)
    assert "rare" not in found.modules and np.isnan(found.scores[6])
    assert found.reason(6).startswith("not scored")
    assert np.all(np.isfinite(found.scores[:6]))


@pytest.mark.parametrize("updates, message", [
    ([{"q": (np.ones((3, 1)), np.ones((1, 2)))}] * 2, "at least 3 clients"),
    ([{"q": (np.ones((3, 1)), np.ones((1, 2)))}, {"v": (np.ones((3, 1)), np.ones((1, 2)))},
      {"k": (np.ones((3, 1)), np.ones((1, 2)))}], "the most-held module has 1 holders"),
    ([{"q": (np.ones((3, 1)), np.ones((2, 2)))}] * 3, r"Got B \(3, 1\) and A \(2, 2\)"),
    ([{"q": (np.ones((3, 1)), np.ones((1, 2)))}] * 2 + [{"q": (np.ones((4, 1)), np.ones((1, 2)))}],
     r"share d_out. Got d_out \[3, 4\]"),
])
def test_bad_input_names_what_is_wrong(updates, message):
    with pytest.raises(ValueError, match=message):
        screening_scores(updates)
