"""Synthetic federations: the model, every attack, reproducibility, OLS, error messages."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from lowrank_fed.synthetic import (
    ATTACKS,
    LORA_ATTACKS,
    local_estimates,
    make_lora_clients,
    make_regression_clients,
    random_factor_pairs,
)


def off_subspace(U, X):
    return np.linalg.norm(X - U @ (U.T @ X))


def test_shapes_and_contamination_count():
    fed = make_regression_clients(10, 8, 3, 2, n_samples=[20] * 5 + [30] * 5, contamination=0.3, seed=0)
    assert [x.shape for x in fed.X] == [(20, 8)] * 5 + [(30, 8)] * 5
    assert [y.shape for y in fed.Y] == [(20, 3)] * 5 + [(30, 3)] * 5
    assert all(t.shape == (8, 3) for t in fed.Theta) and fed.W0.shape == (8, 3)
    assert fed.U.shape == (8, 2) and fed.n_clients == 10
    assert_allclose(fed.U.T @ fed.U, np.eye(2), atol=1e-12)
    assert int(fed.contaminated.sum()) == 3 and fed.benign.size == 7


@pytest.mark.parametrize("base_known", [True, False])
def test_benign_clients_follow_the_model(base_known):
    fed = make_regression_clients(6, 10, 4, 2, contamination=0.0, seed=1, base_known=base_known)
    assert (np.abs(fed.W0).max() == 0) == base_known
    for theta, phi in zip(fed.Theta, fed.Phi, strict=True):
        assert_allclose(theta, fed.W0 + fed.U @ phi, atol=1e-12)


def test_attacks_have_their_geometry():
    seed, K = 2, 10
    feds = {a: make_regression_clients(K, 12, 4, 2, contamination=0.2, attack=a, seed=seed) for a in ATTACKS}
    bad = feds["random"].contaminated
    for fed in feds.values():  # one seed, one set of contaminated clients and benign data for all attacks
        assert np.array_equal(fed.contaminated, bad)
        for k in fed.benign:
            assert_allclose(fed.X[k], feds["random"].X[k])
            assert_allclose(fed.Theta[k], feds["random"].Theta[k])
    U, W0 = feds["random"].U, feds["random"].W0
    for a in ("sign_flip", "scaled", "mean_flip"):  # in-subspace: nothing off the subspace
        for k in np.flatnonzero(bad):
            assert off_subspace(U, feds[a].Theta[k] - W0) < 1e-10
    for a in ("random", "base_shift", "coordinated"):  # identifiable: a sizeable off-subspace part
        for k in np.flatnonzero(bad):
            assert off_subspace(U, feds[a].Theta[k] - W0) > 0.1 * np.linalg.norm(feds[a].Theta[k] - W0)
    # base_shift: one common shift D; coordinated: one common subspace orthogonal to U
    d = [feds["base_shift"].Theta[k] - W0 - U @ feds["base_shift"].Phi[k] for k in np.flatnonzero(bad)]
    assert_allclose(d[0], d[1], atol=1e-12)
    coord = np.hstack([feds["coordinated"].Theta[k] - W0 for k in np.flatnonzero(bad)])
    assert np.linalg.matrix_rank(coord, tol=1e-10) == 2
    assert np.linalg.norm(U.T @ coord) < 1e-10
    # sign_flip and scaled scale the client's own in-subspace part
    k = np.flatnonzero(bad)[0]
    assert_allclose(feds["sign_flip"].Theta[k] - W0, -(U @ feds["sign_flip"].Phi[k]), atol=1e-12)
    assert_allclose(feds["scaled"].Theta[k] - W0, 5 * (U @ feds["scaled"].Phi[k]), atol=1e-12)


def test_heterogeneity_is_off_subspace_and_scaled():
    fed = make_regression_clients(8, 40, 5, 2, heterogeneity=0.5, seed=3, base_known=True)
    H = [t - fed.U @ phi for t, phi in zip(fed.Theta, fed.Phi, strict=True)]
    ratio = np.mean([np.linalg.norm(h) for h in H]) / np.mean([np.linalg.norm(fed.U @ p) for p in fed.Phi])
    assert 0.3 < ratio < 0.8


def test_local_estimates_are_ols():
    fed = make_regression_clients(4, 6, 3, 2, n_samples=30, noise=0.5, seed=4)
    est = local_estimates(fed)
    for X, Y, theta in zip(fed.X, fed.Y, est, strict=True):
        assert_allclose(X.T @ (X @ theta - Y), 0, atol=1e-9)  # normal equations
    noiseless = make_regression_clients(4, 6, 3, 2, n_samples=30, noise=0.0, seed=4)
    for theta, truth in zip(local_estimates(noiseless), noiseless.Theta, strict=True):
        assert_allclose(theta, truth, atol=1e-10)


def test_same_seed_same_federation():
    a = make_regression_clients(5, 6, 2, 1, seed=7, contamination=0.2)
    b = make_regression_clients(5, 6, 2, 1, seed=7, contamination=0.2)
    for x, y in zip(a.Y, b.Y, strict=True):
        assert_allclose(x, y)


@pytest.mark.parametrize("attack", LORA_ATTACKS)
def test_lora_clients(attack):
    fed = make_lora_clients(10, 20, 15, 2, client_rank=3, contamination=0.2, attack=attack, seed=5)
    assert len(fed.pairs) == 10 and int(fed.contaminated.sum()) == 2
    for k, pair in enumerate(fed.pairs):
        assert pair.shape == (20, 15)
        dW = pair.B @ pair.A
        if not fed.contaminated[k] or attack in ("sign_flip", "scaled"):
            assert off_subspace(fed.U, dW) < 1e-10
        else:
            assert off_subspace(fed.U, dW) > 0.1 * np.linalg.norm(dW)
    assert fed.benign.size == 8


def test_random_factor_pairs():
    pairs = random_factor_pairs([1, 2, 3], 5, 4, seed=0, scale=2.0)
    assert [p.rank for p in pairs] == [1, 2, 3] and all(p.shape == (5, 4) for p in pairs)


def test_error_messages():
    with pytest.raises(ValueError, match=r"Unknown attack 'boom'; expected one of \['random'"):
        make_regression_clients(4, 5, 2, 1, attack="boom")
    with pytest.raises(ValueError, match=r"gives 2 contaminated clients of 4; expected a benign majority"):
        make_regression_clients(4, 5, 2, 1, contamination=0.45)
    with pytest.raises(ValueError, match=r"The 'contamination' parameter must be in \[0, 1\). Got 1.5"):
        make_regression_clients(4, 5, 2, 1, contamination=1.5)
    with pytest.raises(ValueError, match=r"The 'rank' parameter must be an int in \[1, 2\]. Got 3"):
        make_regression_clients(4, 5, 2, 3)
    with pytest.raises(ValueError, match=r"The 'n_clients' parameter must be a positive int. Got 0"):
        make_regression_clients(0, 5, 2, 1)
    with pytest.raises(ValueError, match=r"The 'n_samples' parameter must be a positive int or one per"):
        make_regression_clients(4, 5, 2, 1, n_samples=[10, 10])
    with pytest.raises(ValueError, match=r"The 'coordinated' attack needs p >= 2 rank = 4. Got p = 3"):
        make_regression_clients(10, 3, 3, 2, attack="coordinated", contamination=0.2)
    with pytest.raises(ValueError, match=r"Unknown attack 'mean_flip'"):
        make_lora_clients(4, 5, 5, 1, attack="mean_flip")
    with pytest.raises(ValueError, match=r"The 'client_rank' parameter must be a positive int or one"):
        make_lora_clients(4, 5, 5, 1, client_rank=[1, 2])
