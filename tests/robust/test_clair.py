"""clair(): exact recovery, detection, refinement, every backend, every error message."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose

from lowrank_fed import FactorPair, sin_theta
from lowrank_fed.robust import ClairConvergenceWarning, ClairResult, ClairWarning, LamPath, clair, refactor
from lowrank_fed.synthetic import local_estimates, make_lora_clients, make_regression_clients


def regression(attack, gamma, seed, **kw):
    options = dict(n_samples=40, noise=0.0, contamination=gamma, attack=attack, seed=seed)
    options.update(kw)
    fed = make_regression_clients(20, 20, 5, 2, **options)
    return fed, local_estimates(fed)


def exact(res, fed) -> bool:
    return sin_theta(res.subspace, fed.U) < 1e-6 and np.array_equal(~res.collaborative, fed.contaminated)


# ---------------------------------------------------------------- the result type


def test_result_has_the_design_fields():
    names = {f.name for f in dataclasses.fields(ClairResult)}
    assert {"subspace", "collaborative", "block_norms", "refined", "lam", "objective", "gap", "n_iter",
            "converged"} <= names
    fed = make_lora_clients(8, 12, 9, 2, contamination=0.25, seed=0)
    res = clair(fed.pairs, rank=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.lam = 1.0
    assert res.subspace.shape == (12, 2)
    assert_allclose(res.subspace.T @ res.subspace, np.eye(2), atol=1e-12)
    assert res.collaborative.dtype == bool and res.collaborative.shape == (8,)
    assert res.block_norms.shape == (8,) and len(res.refined) == 8
    assert res.converged and res.gap <= 1e-7 * res.objective * 1.0001 and res.n_iter > 0
    assert res.flagged.tolist() == np.flatnonzero(fed.contaminated).tolist()
    # lam=None is the data-driven path; lam="default" (the formula) and a number solve once.
    assert res.solver == "admm" and not res.noisy and isinstance(res.lam_path, LamPath)
    assert res.lam == res.lam_path.lams[res.lam_path.chosen]
    assert clair(fed.pairs, rank=2, lam="default").lam_path is None


# ---------------------------------------------------------------- exact recovery (noiseless, identifiable)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("attack,gamma", [("random", 0.2), ("base_shift", 0.2), ("coordinated", 0.1)])
def test_exact_recovery_with_the_lam_path(attack, gamma, seed):
    # Base unknown, rank chosen from the spectrum of L, lam from the path's plateau.
    fed, est = regression(attack, gamma, seed)
    res = clair(est, base_known=False)
    assert res.rank == 2
    assert exact(res, fed), (sin_theta(res.subspace, fed.U), res.flagged, np.flatnonzero(fed.contaminated))
    assert isinstance(res.lam_path, LamPath) and res.lam_path.stable
    assert res.lam_path.start <= res.lam_path.chosen < res.lam_path.stop
    assert res.lam == pytest.approx(res.lam_path.lams[res.lam_path.chosen])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_recovery_with_the_default_lam(seed):
    fed, est = regression("random", 0.2, seed, base_known=True)
    res = clair(est, rank=2, base_known=True, lam="default")
    assert res.lam == pytest.approx(2 * np.sqrt(2 / (0.8 * 20)))
    assert exact(res, fed)


@pytest.mark.parametrize("attack", ["random", "base_shift", "coordinated"])
def test_exact_recovery_from_lora_factor_pairs(attack):
    gamma = 0.1 if attack == "coordinated" else 0.2
    fed = make_lora_clients(20, 40, 30, 2, contamination=gamma, attack=attack, seed=4)
    res = clair(fed.pairs, rank=2, lam="path")
    assert exact(res, fed)


def test_coordinated_attackers_at_gamma_0_2_need_the_data_driven_lam():
    # gamma = 0.2 coordinated attackers share a subspace: their window closes below the formula's lam
    # (docs/methods.md#choosing-lam), so lam="default" fails; the default path (lam=None) finds the window.
    fed, est = regression("coordinated", 0.2, 0)
    assert not exact(clair(est, rank=2, base_known=False, lam="default"), fed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = clair(est, rank=2, base_known=False)
    assert exact(res, fed) and res.lam_path.stable and res.lam_path.consistent[res.lam_path.chosen]


def test_auto_lam_is_the_path_except_for_the_penalised_program_with_a_rank():
    fed, est = regression("random", 0.2, 0, base_known=True)
    for kwargs in ({"rank": 2}, {}):  # noiseless program (or no rank): the path
        res = clair(est, **kwargs)
        assert isinstance(res.lam_path, LamPath) and res.lam_path.stable and exact(res, fed)
    res = clair(est, rank=2, noise=1e-3, tol=1e-4)  # penalised program with a rank: the formula, one solve
    assert res.lam_path is None and res.lam == pytest.approx(2 * np.sqrt(2 / (0.8 * 20)))
    assert clair(est, rank=2, lam="auto").lam == clair(est, rank=2).lam


def _slightly_noisy(eps, gamma=0.2, seed=0):
    """Coordinated attackers, base known, plus i.i.d. noise of ``eps`` times the signal's entry scale."""
    fed = make_regression_clients(20, 20, 5, 2, noise=0.0, contamination=gamma, attack="coordinated",
                                  seed=seed, base_known=True)
    rng = np.random.default_rng(seed)
    return fed, [t + eps * np.sqrt(2 / 20) * rng.standard_normal(t.shape) for t in fed.Theta]


def test_lam_path_with_rank_on_slightly_noisy_updates():
    # 1e-4 noise (below the support tolerance): the numerical rank of L counts noise directions at the
    # S = 0 end, and consistency (every client leaving the rank-2 subspace is flagged) excludes that end.
    fed, noisy = _slightly_noisy(1e-4, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ClairWarning)
        res = clair(noisy, rank=2, tol=1e-6)
    path = res.lam_path
    assert not path.consistent[0] and path.flagged[0] == ()  # S = 0: attackers absorbed into L
    assert path.consistent[path.chosen]
    assert np.array_equal(~res.collaborative, fed.contaminated)
    assert sin_theta(res.subspace, fed.U) < 1e-3


def test_lam_path_warns_when_no_lam_separates_the_noisy_updates():
    # 1e-3 noise without noise=: at every lam the noise of every block is in S (all flagged) or the
    # attackers are absorbed into L (none flagged). The path says so instead of silently flagging nobody.
    fed, noisy = _slightly_noisy(1e-3)
    with pytest.warns(ClairWarning, match="no stable plateau .* every client leaving the rank-r subspace"):
        clair(noisy, rank=2, tol=1e-6)
    res = clair(noisy, rank=2, noise=1e-3 * np.sqrt(2 / 20), tol=1e-4)  # the penalised program separates them
    assert np.array_equal(~res.collaborative, fed.contaminated)


# ---------------------------------------------------------------- noisy detection and refinement


def benign_error(estimates, fed):
    return float(np.mean([np.sum((np.asarray(estimates[k]) - fed.Theta[k]) ** 2) for k in fed.benign]))


@pytest.mark.parametrize("attack", ["random", "base_shift", "coordinated"])
def test_noisy_detection_has_full_precision_and_recall(attack):
    gamma = 0.1 if attack == "coordinated" else 0.2
    fed, est = regression(attack, gamma, 3, noise=1.0, n_samples=80)
    res = clair(est, rank=2, base_known=False, noise=1.0 / np.sqrt(80 - 20 - 1))
    assert res.noisy and res.alpha > 0
    assert np.array_equal(~res.collaborative, fed.contaminated)
    assert res.scores[fed.contaminated].min() > 3.5 > res.scores[~fed.contaminated].max()


def test_clair_beats_local_which_beats_fedavg_on_a_heterogeneous_instance():
    fed, est = regression("random", 0.2, 5, noise=1.0, n_samples=60, heterogeneity=0.1)
    res = clair(est, rank=2, base_known=False, noise=1.0 / np.sqrt(60 - 20 - 1))
    weights = np.array([x.shape[0] for x in fed.X], dtype=float)
    fedavg = sum(w * e for w, e in zip(weights / weights.sum(), est, strict=True))
    err_clair, err_local = benign_error(list(res.refined), fed), benign_error(est, fed)
    err_fedavg = benign_error([fedavg] * len(est), fed)
    assert err_clair < 0.5 * err_local < 0.5 * err_fedavg


@pytest.mark.parametrize("attack", ["sign_flip", "scaled", "mean_flip"])
def test_in_subspace_attacks_do_not_hurt_the_refinement(attack):
    # One seed gives the same benign clients with and without contamination: compare on those.
    ratios = []
    for seed in range(3):
        errors = []
        for gamma in (0.2, 0.0):
            fed, est = regression(attack, gamma, seed, noise=1.0, n_samples=60, heterogeneity=0.1)
            if gamma:
                benign = fed.benign
            res = clair(est, rank=2, base_known=False, noise=1.0 / np.sqrt(60 - 20 - 1))
            refined = list(res.refined)
            errors.append(np.mean([np.sum((refined[k] - fed.Theta[k]) ** 2) for k in benign]))
        ratios.append(errors[0] / errors[1])
    assert np.mean(ratios) < 1.05, ratios


def test_refined_pairs_are_the_exact_refinement():
    fed = make_lora_clients(8, 12, 9, 2, client_rank=[1, 2, 3, 1, 2, 3, 2, 2], contamination=0.25, seed=1)
    weights = np.arange(1.0, 9.0)
    res = clair(fed.pairs, rank=2, weights=weights)
    G = res.collaborative
    pi = np.where(G, weights, 0) / weights[G].sum()
    P = res.subspace @ res.subspace.T
    mean = sum(w * (p.B @ p.A) for w, p in zip(pi, fed.pairs, strict=True))
    sum_ranks = sum(p.rank for p, g in zip(fed.pairs, G, strict=True) if g)
    for pair, out in zip(fed.pairs, res.refined, strict=True):
        assert out.rank == pair.rank + sum_ranks
        assert_allclose(out.B @ out.A, P @ pair.B @ pair.A + (np.eye(12) - P) @ mean, atol=1e-12)
    assert len(list(res.refined)) == 8 and len(res.refined[2:5]) == 3
    small = refactor(res.refined, [p.rank for p in fed.pairs])
    assert [p.rank for p in small] == [p.rank for p in fed.pairs]


def test_refinement_in_the_inputs_namespace(xp):
    fed = make_lora_clients(6, 10, 8, 2, contamination=0.2, seed=2)
    for dtype in ("float64", "float32"):
        pairs = [FactorPair(xp.asarray(p.B, dtype), xp.asarray(p.A, dtype)) for p in fed.pairs]
        res = clair(pairs, rank=2)
        out = res.refined[0]
        assert type(out.B) is type(pairs[0].B) and out.B.dtype == pairs[0].B.dtype
        assert np.array_equal(~res.collaborative, fed.contaminated)
        dense = [xp.asarray(p.B @ p.A, dtype) for p in fed.pairs]
        res_dense = clair(dense, rank=2)
        assert type(res_dense.refined[0]) is type(dense[0]) and res_dense.refined[0].dtype == dense[0].dtype
        tol = 1e-5 if dtype == "float32" else 1e-10
        assert_allclose(xp.numpy(out.B) @ xp.numpy(out.A), xp.numpy(res_dense.refined[0]), atol=tol)


def test_cvxpy_solver_gives_the_same_answer():
    fed = make_lora_clients(8, 10, 6, 2, contamination=0.25, seed=3)
    fast = clair(fed.pairs, rank=2)
    ref = clair(fed.pairs, rank=2, solver="cvxpy", tol=1e-9)
    assert ref.solver == "cvxpy-scs"
    assert ref.objective == pytest.approx(fast.objective, rel=1e-4)
    assert np.array_equal(ref.collaborative, fast.collaborative)
    assert sin_theta(ref.subspace, fast.subspace) < 1e-4


def test_rank_none_takes_the_numerical_rank_of_L():
    fed = make_lora_clients(10, 15, 10, 3, contamination=0.2, seed=5)
    res = clair(fed.pairs, lam=0.9)
    assert res.rank == 3 and res.singular_values.size == 3


# ---------------------------------------------------------------- convergence and degenerate cases


def test_non_convergence_warns_and_is_recorded():
    fed = make_lora_clients(8, 12, 9, 2, contamination=0.25, seed=0)
    with pytest.warns(ClairConvergenceWarning, match="stopped at max_iter"):
        res = clair(fed.pairs, rank=2, max_iter=2)
    assert res.converged is False


def test_every_client_flagged_warns():
    fed = make_lora_clients(6, 12, 9, 2, contamination=0.2, seed=0)
    with pytest.warns(ClairWarning, match="flagged all 6 clients"):
        res = clair(fed.pairs, rank=2, lam=0.01)
    assert not res.collaborative.any()


def test_a_clean_federation_flags_nobody():
    fed = make_lora_clients(10, 12, 9, 2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = clair(fed.pairs)
    assert res.collaborative.all() and res.rank == 2


# ---------------------------------------------------------------- error messages


@pytest.fixture
def pairs():
    return make_lora_clients(4, 6, 5, 2, seed=0).pairs


def test_k_below_two(pairs):
    with pytest.raises(ValueError, match=r"CLAIR needs at least 2 clients \(K >= 2\). Got K = 1."):
        clair(pairs[:1])
    with pytest.raises(ValueError, match="Got K = 0"):
        clair([])


def test_not_a_list(pairs):
    with pytest.raises(TypeError, match="Expected a list of client updates"):
        clair(pairs[0])
    with pytest.raises(TypeError, match="Expected a list of client updates"):
        clair(np.ones((3, 4)))


def test_mixed_input_kinds(pairs):
    expected = r"Mixed input kinds: client 0 is a FactorPair but client 2 is ndarray"
    with pytest.raises(TypeError, match=expected):
        clair([pairs[0], pairs[1], np.ones((6, 5))])


def test_wrong_shapes(pairs):
    bad = pairs[:2] + [FactorPair(np.ones((7, 2)), np.ones((2, 5)))]
    with pytest.raises(ValueError, match=r"Client 2: B has d_out = 7; expected 6"):
        clair(bad)
    with pytest.raises(ValueError, match=r"Client 1: update has p = 5 rows; expected 6"):
        clair([np.ones((6, 3)), np.ones((5, 3))])
    with pytest.raises(ValueError, match=r"Client 1: update has q = 4 columns; expected 3 .*unknown base"):
        clair([np.ones((6, 3)), np.ones((6, 4))], base_known=False)
    with pytest.raises(ValueError, match=r"Client 0: expected a 2-D array \(p, q\). Got ndim = 1."):
        clair([np.ones(6), np.ones(6)])


def test_non_finite_input(pairs):
    B = pairs[1].B.copy()
    B[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"Client 1: B has 1 non-finite entries"):
        clair([pairs[0], FactorPair(B, pairs[1].A)])
    M = np.ones((4, 3))
    M[1, 1] = np.inf
    with pytest.raises(ValueError, match=r"Client 1: update has 1 non-finite entries"):
        clair([np.ones((4, 3)), M])


def test_rank_out_of_range(pairs):
    with pytest.raises(ValueError, match=r"The 'rank' parameter must be in \[1, 6\] .* Got 7."):
        clair(pairs, rank=7)
    with pytest.raises(ValueError, match=r"The 'rank' parameter must be in \[1, 6\] .* Got 0."):
        clair(pairs, rank=0)
    with pytest.raises(TypeError, match=r"The 'rank' parameter must be an int. Got 2.5"):
        clair(pairs, rank=2.5)
    low = make_lora_clients(4, 6, 5, 1, client_rank=1, seed=0).pairs  # stack of numerical rank 1
    expected = r"The 'rank' parameter \(2\) exceeds the numerical rank of the stacked updates \(1\)"
    with pytest.raises(ValueError, match=expected):
        clair(low, rank=2)


def test_unknown_solver_and_options(pairs):
    with pytest.raises(ValueError, match=r"Unknown solver 'fast'; expected one of \['admm', 'cvxpy'\]."):
        clair(pairs, solver="fast")
    with pytest.raises(ValueError, match=r"Unknown CVXPY solver 'gurobi'"):
        clair(pairs, solver="cvxpy", cvxpy_solver="gurobi")
    with pytest.raises(ValueError, match=r"Unknown lam rule 'best'; expected a positive float or one of"):
        clair(pairs, lam="best")
    with pytest.raises(ValueError, match=r"The 'lam' parameter must be positive and finite. Got -1.0."):
        clair(pairs, lam=-1.0)
    with pytest.raises(ValueError, match=r"lam='default' needs the 'rank' parameter"):
        clair(pairs, lam="default")
    with pytest.raises(ValueError, match=r"The 'tol' parameter must be positive and finite. Got 0.0."):
        clair(pairs, tol=0.0)
    with pytest.raises(ValueError, match=r"The 'gamma_bar' parameter must be in \[0, 1\). Got 1.0."):
        clair(pairs, gamma_bar=1.0)
    with pytest.raises(ValueError, match=r"The 'max_iter' parameter must be a positive int. Got 0."):
        clair(pairs, max_iter=0)
    with pytest.raises(ValueError, match=r"Give at most one of 'noise' and 'alpha'."):
        clair(pairs, noise=0.1, alpha=0.1)
    with pytest.raises(ValueError, match=r"The 'noise' parameter must be non-negative and finite. Got -0.1."):
        clair(pairs, noise=-0.1)
    with pytest.raises(ValueError, match=r"The 'weights' parameter must be finite and non-negative"):
        clair(pairs, weights=[1, -1, 1, 1])
    with pytest.raises(TypeError, match=r"The 'base_known' parameter must be a bool."):
        clair(pairs, base_known="yes")


def test_mixed_array_libraries(pairs):
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="Mixed array types"):
        clair([np.ones((3, 2)), torch.ones((3, 2), dtype=torch.float64)])


def test_a_repeated_top_eigenvalue_does_not_crash_the_path():
    # LAPACK's evr driver raised "Internal Error" on this instance's Gram matrix (the path's spectral norm);
    # spectral_norm now falls back to all eigenvalues.
    fed = make_regression_clients(40, 60, 12, 2, noise=0.0, contamination=0.2, attack="random",
                                  base_known=True, seed=1004)
    res = clair(fed.Theta, rank=2)
    assert res.rank == 2 and np.array_equal(~res.collaborative, fed.contaminated)
