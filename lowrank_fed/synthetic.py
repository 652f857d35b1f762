r"""Synthetic federations with a shared low-rank subspace and contaminated clients.

Multi-response regression (:func:`make_regression_clients`): client ``k`` observes

.. math::

    Y_k = X_k \Theta_k + E_k,\qquad
    \Theta_k = W_0 + U \Phi_k + H_k \ (k \in G),

where

- ``X_k`` shape ``(n_k, p)`` has i.i.d. N(0, 1) entries, ``E_k`` shape ``(n_k, q)`` i.i.d. N(0, noise^2),
- ``U`` shape ``(p, r)`` is a Haar-random orthonormal basis shared by the benign clients ``G``,
- ``Phi_k`` shape ``(r, q)`` has i.i.d. N(0, signal^2) entries (client-specific coefficients),
- ``W0`` shape ``(p, q)`` is the base: zero when ``base_known``, else i.i.d. N(0, (signal sqrt(r/p))^2)
  so that ``||W0||_F ~ ||U Phi_k||_F``,
- ``H_k`` is benign heterogeneity, i.i.d. N(0, (heterogeneity signal sqrt(r/p))^2): a share
  ``heterogeneity`` of the signal's norm, off the subspace,
- contaminated clients (a fraction ``contamination``, chosen at random) replace ``Theta_k`` by an
  attack (table below); ``a`` is ``attack_scale`` and ``Z`` a fresh N(0, (signal sqrt(r/p))^2) matrix.

============== ======================================================== ==============
attack          contaminated ``Theta_k``                                  identifiable?
============== ======================================================== ==============
``random``      ``W0 + a Z_k``                                            yes (off-subspace)
``base_shift``  ``W0 + a D + U Phi_k``, one ``D`` for all attackers       yes
``coordinated`` ``W0 + V Psi_k``, one ``V`` (p x r, orthogonal to U)      yes, harder
``sign_flip``   ``W0 - a U Phi_k``                                        no (in-subspace)
``scaled``      ``W0 + a U Phi_k`` (default ``a = 5``)                    no (in-subspace)
``mean_flip``   ``W0 - a mean_G U Phi_j`` (default ``a = 3``)             no (in-subspace)
============== ======================================================== ==============

Attacks poison the data: ``Y_k`` is generated from the attacked ``Theta_k``. LoRA-shaped federations
(:func:`make_lora_clients`) follow the same pattern with ``Theta_k = B_k A_k``.

Notes
-----
Our construction (docs/methods.md#setting); the paper's experiments use linear regression with a
shared subspace and contaminated clients (abstract), whose exact generator is not public.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .factors import FactorPair

__all__ = [
    "ATTACKS",
    "LORA_ATTACKS",
    "RegressionClients",
    "LoraClients",
    "make_regression_clients",
    "make_lora_clients",
    "local_estimates",
    "random_factor_pairs",
    "haar_basis",
]

ATTACKS = ("random", "base_shift", "coordinated", "sign_flip", "scaled", "mean_flip")
LORA_ATTACKS = ("random", "base_shift", "coordinated", "sign_flip", "scaled")
IN_SUBSPACE = ("sign_flip", "scaled", "mean_flip")
_DEFAULT_SCALE = {
    "random": 1.0,
    "base_shift": 1.0,
    "coordinated": 1.0,
    "sign_flip": 1.0,
    "scaled": 5.0,
    "mean_flip": 3.0,
}


def haar_basis(rng: np.random.Generator, p: int, r: int) -> np.ndarray:
    """A Haar-random ``(p, r)`` matrix with orthonormal columns."""
    Q, R = np.linalg.qr(rng.standard_normal((p, r)))
    return Q * np.sign(np.where(np.diag(R) == 0, 1.0, np.diag(R)))[None, :]


def _orthogonal_basis(rng: np.random.Generator, U: np.ndarray, r: int) -> np.ndarray:
    """A random ``(p, r)`` orthonormal basis orthogonal to ``U`` (needs ``p >= r + U.shape[1]``)."""
    Z = rng.standard_normal((U.shape[0], r))
    Z -= U @ (U.T @ Z)
    return np.linalg.qr(Z)[0]


def _check_common(n_clients, rank, dims, contamination, attack, attacks) -> int:
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"The 'n_clients' parameter must be a positive int. Got {n_clients!r}.")
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"The {name!r} parameter must be a positive int. Got {value!r}.")
    bad_int = isinstance(rank, bool) or not isinstance(rank, (int, np.integer))
    if bad_int or not 1 <= rank <= min(dims.values()):
        raise ValueError(f"The 'rank' parameter must be an int in [1, {min(dims.values())}]. Got {rank!r}.")
    if not 0.0 <= float(contamination) < 1.0:
        raise ValueError(f"The 'contamination' parameter must be in [0, 1). Got {contamination!r}.")
    if attack not in attacks:
        raise ValueError(f"Unknown attack {attack!r}; expected one of {list(attacks)}.")
    n_bad = int(round(float(contamination) * n_clients))
    if 2 * n_bad >= n_clients and n_bad > 0:
        raise ValueError(
            f"The 'contamination' parameter gives {n_bad} contaminated clients of {n_clients}; "
            "expected a benign majority."
        )
    return n_bad


@dataclass(frozen=True)
class RegressionClients:
    r"""A synthetic regression federation (see :func:`make_regression_clients`).

    Attributes
    ----------
    X, Y : list of ndarray
        Client data, shapes ``(n_k, p)`` and ``(n_k, q)``.
    Theta : list of ndarray, shape (p, q)
        The coefficient matrices that generated the data (attacked ones for contaminated clients).
    U : ndarray, shape (p, r)
        The shared subspace.
    W0 : ndarray, shape (p, q)
        The base (zeros when ``base_known``).
    Phi : list of ndarray, shape (r, q)
        Client-specific coefficients (benign clients' ``Theta_k = W0 + U Phi_k + H_k``).
    contaminated : ndarray of bool, shape (K,)
    attack : str
    noise, heterogeneity : float
    base_known : bool
    """

    X: list
    Y: list
    Theta: list
    U: np.ndarray
    W0: np.ndarray
    Phi: list
    contaminated: np.ndarray
    attack: str
    noise: float
    heterogeneity: float
    base_known: bool

    @property
    def n_clients(self) -> int:
        return len(self.X)

    @property
    def benign(self) -> np.ndarray:
        """Indices of the benign clients."""
        return np.flatnonzero(~self.contaminated)


def make_regression_clients(
    n_clients: int,
    p: int,
    q: int,
    rank: int,
    *,
    n_samples: int | Sequence[int] = 200,
    noise: float = 0.1,
    contamination: float = 0.0,
    attack: str = "random",
    seed=None,
    heterogeneity: float = 0.0,
    base_known: bool = False,
    attack_scale: float | None = None,
    signal: float = 1.0,
) -> RegressionClients:
    r"""A multi-response regression federation with a shared subspace and contaminated clients.

    See the module docstring for the model and the attacks.

    Parameters
    ----------
    n_clients : int
        ``K``.
    p, q : int
        Features and responses (``Theta_k`` is ``p x q``).
    rank : int
        ``r``, the dimension of the shared subspace.
    n_samples : int or sequence of int
        Samples per client ``n_k`` (OLS needs ``n_k >= p``).
    noise : float
        Standard deviation of the response noise ``E_k``.
    contamination : float, in [0, 1/2)
        Fraction of contaminated clients, ``round(contamination K)`` of them.
    attack : str
        One of :data:`ATTACKS`.
    seed : int or numpy Generator, optional
    heterogeneity : float
        Benign off-subspace heterogeneity relative to the signal norm.
    base_known : bool
        True: ``W0 = 0``. False: a random base shared by all clients.
    attack_scale : float, optional
        ``a`` in the attack table (defaults: 1, except ``scaled`` 5 and ``mean_flip`` 3).
    signal : float
        Standard deviation of the entries of ``Phi_k``.

    Returns
    -------
    RegressionClients

    Examples
    --------
    >>> fed = make_regression_clients(10, 8, 3, 2, n_samples=20, contamination=0.2, seed=0)
    >>> len(fed.X), fed.X[0].shape, fed.Y[0].shape, int(fed.contaminated.sum())
    (10, (20, 8), (20, 3), 2)
    """
    n_bad = _check_common(n_clients, rank, {"p": p, "q": q}, contamination, attack, ATTACKS)
    if attack == "coordinated" and n_bad and p < 2 * rank:
        raise ValueError(f"The 'coordinated' attack needs p >= 2 rank = {2 * rank}. Got p = {p}.")
    rng = np.random.default_rng(seed)
    K = int(n_clients)
    ns = [int(n_samples)] * K if isinstance(n_samples, (int, np.integer)) else [int(n) for n in n_samples]
    if len(ns) != K or min(ns) < 1:
        raise ValueError(
            f"The 'n_samples' parameter must be a positive int or one per client ({K}). Got {n_samples!r}."
        )
    a = _DEFAULT_SCALE[attack] if attack_scale is None else float(attack_scale)
    unit = signal * np.sqrt(rank / p)  # per-entry scale with ||.||_F ~ ||U Phi_k||_F
    # Every draw happens whatever the attack and the contamination, in one order, so that one seed
    # gives the same benign clients (data included) under every attack and contamination level.
    U = haar_basis(rng, p, rank)
    W0 = unit * rng.standard_normal((p, q))
    if base_known:
        W0 = np.zeros((p, q))
    Phi = [signal * rng.standard_normal((rank, q)) for _ in range(K)]
    H = [heterogeneity * unit * rng.standard_normal((p, q)) for _ in range(K)]
    order = rng.permutation(K)
    contaminated = np.zeros(K, dtype=bool)
    contaminated[order[:n_bad]] = True
    D = a * unit * rng.standard_normal((p, q))
    V = _orthogonal_basis(rng, U, rank) if p >= 2 * rank else None
    Z = [unit * rng.standard_normal((p, q)) for _ in range(K)]
    Psi = [signal * rng.standard_normal((rank, q)) for _ in range(K)]
    X = [rng.standard_normal((n, p)) for n in ns]
    E = [noise * rng.standard_normal((n, q)) for n in ns]
    Theta = [W0 + U @ Phi[k] + H[k] for k in range(K)]
    benign_mean = np.mean([U @ Phi[k] for k in range(K) if not contaminated[k]], axis=0)
    for k in np.flatnonzero(contaminated):
        if attack == "random":
            Theta[k] = W0 + a * Z[k]
        elif attack == "base_shift":
            Theta[k] = W0 + D + U @ Phi[k]
        elif attack == "coordinated":
            Theta[k] = W0 + a * V @ Psi[k]
        elif attack == "sign_flip":
            Theta[k] = W0 - a * U @ Phi[k]
        elif attack == "scaled":
            Theta[k] = W0 + a * U @ Phi[k]
        else:  # mean_flip
            Theta[k] = W0 - a * benign_mean
    Y = [X[k] @ Theta[k] + E[k] for k in range(K)]
    return RegressionClients(
        X, Y, Theta, U, W0, Phi, contaminated, attack, float(noise), float(heterogeneity), bool(base_known)
    )


def local_estimates(problem: RegressionClients) -> list[np.ndarray]:
    r"""Per-client OLS estimates ``Theta_hat_k = argmin ||Y_k - X_k Theta||_F`` (minimum norm if ``n_k < p``).

    Examples
    --------
    >>> fed = make_regression_clients(4, 5, 2, 1, n_samples=30, noise=0.0, seed=1)
    >>> import numpy as np
    >>> bool(np.allclose(local_estimates(fed)[0], fed.Theta[0]))
    True
    """
    return [np.linalg.lstsq(X, Y, rcond=None)[0] for X, Y in zip(problem.X, problem.Y, strict=True)]


@dataclass(frozen=True)
class LoraClients:
    r"""A synthetic LoRA federation (see :func:`make_lora_clients`).

    Attributes
    ----------
    pairs : list of FactorPair
        Client updates ``B_k A_k``, ``B_k`` shape ``(d_out, r_k)``, ``A_k`` shape ``(r_k, d_in)``.
    U : ndarray, shape (d_out, rank)
        The shared column subspace of the benign updates.
    contaminated : ndarray of bool, shape (K,)
    attack : str
    """

    pairs: list
    U: np.ndarray
    contaminated: np.ndarray
    attack: str

    @property
    def benign(self) -> np.ndarray:
        return np.flatnonzero(~self.contaminated)


def make_lora_clients(
    n_clients: int,
    d_out: int,
    d_in: int,
    rank: int,
    *,
    client_rank: int | Sequence[int] | None = None,
    contamination: float = 0.0,
    attack: str = "random",
    seed=None,
    noise: float = 0.0,
    attack_scale: float | None = None,
) -> LoraClients:
    r"""LoRA updates whose benign column spaces lie in one shared subspace.

    .. math::

        B_k = U C_k + N_k,\qquad A_k \sim N(0, 1/d_{in}),\qquad \Delta W_k = B_k A_k,

    where ``U`` (``d_out x rank``) is shared, ``C_k`` (``rank x r_k``) has N(0, 1) entries and ``N_k``
    is optional noise of per-entry size ``noise / sqrt(d_out)`` relative to ``U C_k``. Attacks:
    ``random`` (``B_k`` Gaussian, same norm), ``base_shift`` (``[U C_k, a D_B]``, ``[A_k; D_A]``: one
    shared rank-``r_k`` shift ``D_B D_A`` added by all attackers), ``coordinated`` (``B_k = V C_k``, one
    ``V`` orthogonal to ``U``), ``sign_flip`` (``-a U C_k``), ``scaled`` (``a U C_k``, default 5).

    Parameters
    ----------
    n_clients, d_out, d_in, rank : int
    client_rank : int or sequence of int, optional
        ``r_k`` (default ``rank``).
    contamination : float, in [0, 1/2)
    attack : str
        One of :data:`LORA_ATTACKS`.
    seed : int or numpy Generator, optional
    noise : float
        Benign off-subspace noise in ``B_k``, relative to its signal.
    attack_scale : float, optional

    Examples
    --------
    >>> fed = make_lora_clients(6, 20, 15, 2, client_rank=[2, 2, 3, 3, 4, 4], contamination=0.2, seed=0)
    >>> [p.rank for p in fed.pairs], int(fed.contaminated.sum())
    ([2, 2, 3, 3, 4, 4], 1)
    """
    dims = {"d_out": d_out, "d_in": d_in}
    n_bad = _check_common(n_clients, rank, dims, contamination, attack, LORA_ATTACKS)
    K = int(n_clients)
    if client_rank is None:
        ranks = [rank] * K
    elif isinstance(client_rank, (int, np.integer)):
        ranks = [int(client_rank)] * K
    else:
        ranks = [int(r) for r in client_rank]
    if len(ranks) != K or min(ranks) < 1:
        raise ValueError(
            f"The 'client_rank' parameter must be a positive int or one per client ({K}). "
            f"Got {client_rank!r}."
        )
    if attack == "coordinated" and n_bad and d_out < 2 * rank:
        raise ValueError(f"The 'coordinated' attack needs d_out >= 2 rank = {2 * rank}. Got d_out = {d_out}.")
    rng = np.random.default_rng(seed)
    a = _DEFAULT_SCALE[attack] if attack_scale is None else float(attack_scale)
    U = haar_basis(rng, d_out, rank)
    V = _orthogonal_basis(rng, U, rank) if d_out >= 2 * rank else None
    order = rng.permutation(K)
    contaminated = np.zeros(K, dtype=bool)
    contaminated[order[:n_bad]] = True
    r_shift = max(ranks)
    D_B = rng.standard_normal((d_out, r_shift)) * np.sqrt(rank / d_out)
    D_A = rng.standard_normal((r_shift, d_in)) / np.sqrt(d_in)
    pairs = []
    for k, r_k in enumerate(ranks):
        C = rng.standard_normal((rank, r_k))
        A = rng.standard_normal((r_k, d_in)) / np.sqrt(d_in)
        N = rng.standard_normal((d_out, r_k)) * np.sqrt(rank / d_out)
        Z = rng.standard_normal((d_out, r_k)) * np.sqrt(rank / d_out)
        B = U @ C + noise * N
        if contaminated[k]:
            if attack == "random":
                B = a * Z
            elif attack == "base_shift":
                B, A = np.hstack([B, a * D_B[:, :r_k]]), np.vstack([A, D_A[:r_k]])
            elif attack == "coordinated":
                B = a * V @ C
            elif attack == "sign_flip":
                B = -a * B
            else:  # scaled
                B = a * B
        pairs.append(FactorPair(B, A))
    return LoraClients(pairs, U, contaminated, attack)


def random_factor_pairs(
    ranks: Sequence[int], d_out: int, d_in: int, *, seed=None, scale: float = 1.0
) -> list:
    r"""Independent Gaussian factor pairs: ``B_k`` N(0, scale^2), ``A_k`` N(0, 1/d_in), ranks ``r_k``.

    Examples
    --------
    >>> [p.rank for p in random_factor_pairs([1, 3], 6, 5, seed=0)]
    [1, 3]
    """
    rng = np.random.default_rng(seed)
    return [
        FactorPair(scale * rng.standard_normal((d_out, r)), rng.standard_normal((r, d_in)) / np.sqrt(d_in))
        for r in ranks
    ]
