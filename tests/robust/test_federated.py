r"""CLAIR's server step in a federated round (:mod:`lowrank_fed.robust.federated`), in the core.

:func:`stack_subspace` depends on the products ``B_k A_k`` only (any refactoring ``B M``, ``M^{-1} A`` gives
the same projector, equal to the dense stack's top singular subspace), and on torch tensors it is the same
arithmetic as on NumPy arrays. :func:`flag_clients` is equivariant to the order of the clients, invariant to a
common scale of every update, and flags a planted outlier (and leaves it out of the refitted subspace).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from lowrank_fed import FactorPair
from lowrank_fed.robust import ClientFlags, clair, flag_clients, stack_subspace

from ..strategies import client_pairs


def _projector(U):
    return U @ U.T


def _dense_subspace(pairs, rank):
    U = np.linalg.svd(np.hstack([p.B @ p.A for p in pairs]), full_matrices=False)[0]
    return U[:, :rank]


def _well_separated(pairs, rank) -> bool:
    """The stack's singular values at ``rank`` and ``rank + 1`` apart, so its top subspace is well defined."""
    s = np.linalg.svd(np.hstack([p.B @ p.A for p in pairs]), compute_uv=False)
    return s[rank - 1] > 1e-6 * s[0] and (rank == len(s) or s[rank - 1] - s[rank] > 1e-3 * s[0])


@settings(max_examples=60, deadline=None)
@given(client_pairs(min_clients=1, max_clients=4, max_rank=4, max_dim=8), st.integers(0, 2**32 - 1))
def test_stack_subspace_depends_on_the_products_not_the_factors(case, seed):
    # Prepare: every client's product refactored by an invertible, well-conditioned M_k
    pairs, _ = case
    rng = np.random.default_rng(seed)
    rank = min(2, min(pairs[0].shape))
    if not _well_separated(pairs, rank):
        return
    moved = []
    for p in pairs:
        M = np.linalg.qr(rng.normal(size=(p.rank, p.rank)))[0] * rng.uniform(0.5, 2.0, size=p.rank)
        moved.append(FactorPair(p.B @ M, np.linalg.solve(M, p.A)))
    # Execute
    U, V = stack_subspace(pairs, rank), stack_subspace(moved, rank)
    # Assert: one projector, the dense stack's top-rank subspace
    assert_allclose(_projector(U), _projector(V), atol=1e-7)
    assert_allclose(_projector(U), _projector(_dense_subspace(pairs, rank)), atol=1e-7)
    assert_allclose(U.T @ U, np.eye(rank), atol=1e-10)


def test_stack_subspace_on_torch_is_the_numpy_arithmetic_in_torch():
    torch = pytest.importorskip("torch")
    # Prepare
    rng = np.random.default_rng(3)
    pairs = [FactorPair(rng.normal(size=(12, r)), rng.normal(size=(r, 9))) for r in (1, 3, 2)]
    tensors = [FactorPair(torch.from_numpy(p.B).float(), torch.from_numpy(p.A).float()) for p in pairs]
    # Execute
    U = stack_subspace(tensors, 3)
    # Assert: a float64 NumPy result spanning the float32 inputs' subspace
    assert isinstance(U, np.ndarray) and U.dtype == np.float64 and U.shape == (12, 3)
    assert_allclose(_projector(U), _projector(stack_subspace(pairs, 3)), atol=1e-5)


def test_stack_subspace_refuses_a_rank_the_stack_cannot_hold():
    pairs = [FactorPair(np.ones((4, 1)), np.ones((1, 3)))]
    with pytest.raises(ValueError, match="'rank' parameter must be between 1 and 1"):
        stack_subspace(pairs, 2)


def _federation(n_clients=8, attackers=(2,), modules=("q", "v"), seed=0):
    """Clients sharing one rank-2 subspace per module (plus small noise); attackers get a foreign direction."""
    rng = np.random.default_rng(seed)
    updates = [{} for _ in range(n_clients)]
    for m in modules:
        U = np.linalg.qr(rng.normal(size=(16, 2)))[0]
        for k in range(n_clients):
            r = 2 + k % 2
            B = U @ rng.normal(size=(2, r)) + 0.01 * rng.normal(size=(16, r))
            if k in attackers:
                B = np.linalg.qr(rng.normal(size=(16, r)))[0] * 3.0
            updates[k][m] = FactorPair(B, rng.normal(size=(r, 12)))
    return updates


def test_flag_clients_flags_a_planted_outlier_and_refits_without_it():
    # Prepare
    updates = _federation()
    # Execute
    found = flag_clients(updates, rank=2)
    # Assert: only client 2 is flagged; the refitted subspace is the benign clients' alone
    assert isinstance(found, ClientFlags)
    assert np.flatnonzero(~found.benign).tolist() == [2]
    benign = [k for k in range(len(updates)) if k != 2]
    for m, U in found.subspaces.items():
        assert_allclose(_projector(U), _projector(stack_subspace([updates[k][m] for k in benign], 2)), atol=1e-12)


@pytest.mark.filterwarnings("ignore:CLAIR flagged all")  # its own all-or-none flags, which flag_clients ignores too
def test_flag_clients_per_module_scores_are_each_modules_clair_scores_and_average_to_the_decision():
    # Prepare
    updates = _federation()
    modules = list(updates[0])
    # Execute
    found = flag_clients(updates, rank=2)
    # Assert: column m is CLAIR on module m alone (its scores standardise its residuals); the row mean is zbar_k
    assert found.module_scores.shape == found.module_residuals.shape == (len(updates), len(modules))
    for j, m in enumerate(modules):
        alone = clair([u[m] for u in updates], rank=2, lam="default", gamma_bar=0.3)  # flag_clients' defaults
        assert_allclose(found.module_scores[:, j], alone.scores, atol=1e-9)
        assert_allclose(found.module_residuals[:, j], alone.residuals, rtol=1e-9)
    assert_allclose(found.module_scores.mean(axis=1), found.scores, atol=1e-12)
    assert np.argmax(found.module_residuals.sum(axis=1)) == 2  # the planted outlier is off-subspace in every module


def test_flag_clients_keeps_the_clients_flagged_before_flagged_and_out_of_the_subspace():
    # Prepare: client 2 is the planted outlier; client 0, benign, was flagged in an earlier round
    updates = _federation()
    before = [k == 0 for k in range(len(updates))]
    # Execute
    found = flag_clients(updates, rank=2, flagged_before=before)
    # Assert: O = the scores' flags plus client 0; the scores are unchanged; the subspace is fitted without both
    alone = flag_clients(updates, rank=2)
    assert np.flatnonzero(~found.benign).tolist() == [0, 2]
    assert_allclose(found.scores, alone.scores, atol=1e-12)
    kept = [k for k in range(len(updates)) if k not in (0, 2)]
    for m, U in found.subspaces.items():
        assert_allclose(_projector(U), _projector(stack_subspace([updates[k][m] for k in kept], 2)), atol=1e-12)
    with pytest.raises(ValueError, match="'flagged_before'.*one bool per update: 8. Got shape \\(7,\\)"):
        flag_clients(updates, rank=2, flagged_before=before[:7])


def test_flag_clients_decides_on_the_updates_and_fits_the_subspace_on_fit_on():
    # Prepare: the scored updates flag client 2; the subspace is to be fitted on other pairs, of the same clients
    updates, other = _federation(), _federation(seed=1, attackers=())
    # Execute
    found = flag_clients(updates, rank=2, fit_on=other)
    # Assert: the same decision as without fit_on; the subspace is the kept clients' other pairs'
    assert found.benign.tolist() == flag_clients(updates, rank=2).benign.tolist()
    kept = np.flatnonzero(found.benign)
    for m, U in found.subspaces.items():
        assert_allclose(_projector(U), _projector(stack_subspace([other[k][m] for k in kept], 2)), atol=1e-12)
    with pytest.raises(ValueError, match="'fit_on'.*one client's pairs per update: 8. Got 7"):
        flag_clients(updates, rank=2, fit_on=other[:7])


def test_flag_clients_is_equivariant_to_the_order_of_the_clients():
    # Prepare
    updates = _federation(attackers=(2, 5))
    perm = np.random.default_rng(1).permutation(len(updates))
    # Execute
    found = flag_clients(updates, rank=2)
    shuffled = flag_clients([updates[k] for k in perm], rank=2)
    # Assert: the same decision and scores, in the new order; the same subspaces
    assert shuffled.benign.tolist() == found.benign[perm].tolist()
    assert_allclose(shuffled.scores, found.scores[perm], rtol=1e-5, atol=1e-6)
    for m in found.subspaces:
        assert_allclose(_projector(shuffled.subspaces[m]), _projector(found.subspaces[m]), atol=1e-8)


@pytest.mark.parametrize("scale", [1e-3, 7.0])
def test_flag_clients_is_invariant_to_a_common_scale(scale):
    # Prepare
    updates = _federation(attackers=(4,))
    scaled = [{m: FactorPair(scale * p.B, p.A) for m, p in u.items()} for u in updates]
    # Execute
    found, again = flag_clients(updates, rank=2), flag_clients(scaled, rank=2)
    # Assert
    assert again.benign.tolist() == found.benign.tolist() and np.flatnonzero(~found.benign).tolist() == [4]
    assert_allclose(again.scores, found.scores, rtol=1e-4, atol=1e-5)
    for m in found.subspaces:
        assert_allclose(_projector(again.subspaces[m]), _projector(found.subspaces[m]), atol=1e-8)


def test_flag_clients_is_still_importable_from_the_torch_layer():
    pytest.importorskip("torch")
    from lowrank_fed.llm.methods import clair as layer

    assert layer.flag_clients is flag_clients and layer.stack_subspace is stack_subspace
    assert layer.Flags is ClientFlags
