r"""CLAIR in the federated loop: robust subspace recovery per module, one decision per client, refined downloads.

Each round, for each adapted module ``m``, the participants' adapters ``Theta_k = B_k A_k`` (folded,
ranks may differ, never densified) go through :func:`lowrank_fed.robust.clair` (base known):

.. math:: \min_{L, S}\ \|L\|_* + \lambda \sum_k \|S_k\|_F \quad\text{s.t.}\quad [\Theta_1 .. \Theta_K] = L + S,

giving the shared subspace ``U_m`` (rank ``r``) and, per client, the robust z-score ``z_{k,m}`` of its
off-subspace residual. A client is contaminated or not as a whole, so the decision combines modules
[ours]:

.. math:: \bar z_k = \frac{1}{M} \sum_m z_{k,m},\qquad \hat O = \mathrm{decide}(\bar z),\qquad \hat G = \{k \notin \hat O\},

with the decision ``threshold`` (:func:`lowrank_fed.robust.threshold_flags`): ``"gap"`` (the default) flags
the clients above the largest gap of the sorted scores when that gap, relative to the spread of the
rest, is beyond what ``K`` benign (i.i.d. Gaussian) scores give in all but ``gap_level`` (5%) of rounds;
a number ``z*`` flags ``zbar_k > z*``: a threshold calibrated on uncontaminated validation runs, or the
former fixed cut 3 (``z_threshold``, still accepted). A mean over ``M`` modules of robust z-scores is not
itself a z-score: averaging shrinks the benign spread (MiniLM, 12 modules: benign scores within about
+-1.4), so the fixed cut 3 was out of reach for attackers that rank first. Flagged clients are left out of
everything shared: the subspace, the benign mean, the refinement and the head. The subspace is then refitted on ``G`` alone: ``U_m`` = the
top-``r`` left singular vectors of the benign stack ``[Theta_j]_{j in G}``, which is the subspace of
CLAIR's ``L`` on that stack (with no outlier left, ``S = 0`` and ``L`` is a singular value threshold of
the stack, which keeps its singular vectors) [ours: one decision for all modules, then the refit].
Benign client ``k`` downloads its refined adapter re-factored to its rank by the factored SVD (exact
when the rank allows, else the best rank-``r_k`` approximation):

.. math:: \tilde\Theta_k = P_m \Theta_k + (I - P_m) \textstyle\sum_{j \in \hat G} \pi_j \Theta_j,
          \qquad P_m = U_m U_m^\top,\quad \pi_j \propto n_j,

and a flagged client (not told it was flagged) or a new one the benign mean ``sum_G pi_j Theta_j`` at its
rank; the global model is that mean at rank ``r_max``. The head (``extras``, when shared) is averaged over
``G`` only, so nothing a flagged client uploads enters the global state. ``refine = false`` sends everyone the benign mean
(robust FedAvg). ``rank``: the shared subspace's rank per module, by default the smallest participant
rank (a subspace every benign client can hold) [ours]. ``lam``: by default the formula
``2 sqrt(r / ((1 - gamma_bar) K))`` with ``gamma_bar = 0.3``, one solve per module. CLAIR's data-driven
path (``lam = "path"``) is exact on noiseless updates, but on real LoRA updates (noisy, with no exact shared
subspace) it was measured to end where ``S = 0``: the top of its grid, where nobody leaves ``L`` and the
residual z-scores of planted attackers stay near 2 (a tiny-BERT merge with 2 random attackers of 8:
2.5 and 2.05 at the path's lam 1.41, over 4000 at the formula's 1.12); it also costs 16 solves per module.

:class:`Oracle` is the upper bound the comparison needs: the server is told which clients are
contaminated (by the runner, from the attack truth) and averages the others; it is not a method a
real server could run. :class:`ClairNoDetect` is CLAIR's refinement with nobody flagged (``G`` = every
participant): the reference that separates what detection buys (robustness) from what the refinement
buys (personalisation).

The server mathematics (the per-module scores, the one decision, the benign subspace) is the core's
:mod:`lowrank_fed.robust.federated` (:func:`flag_clients`, :func:`stack_subspace`, re-exported here); this
module holds the method's options and its round.

Source: CLAIR (paper abstract) [formulation ours, docs/methods.md#clair-in-a-federated-run].
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np

from lowrank_fed import FactorPair, aggregate, redistribute
from lowrank_fed.aggregation import weighted_average
from lowrank_fed.factors import difference
from lowrank_fed.robust.federated import ClientFlags as Flags  # noqa: F401  (the former name, re-exported)
from lowrank_fed.robust.federated import flag_clients, stack_subspace
from lowrank_fed.robust.refinement import collaborative_weights, refine_pairs

from ..protocol import decode_extras, decode_pairs
from .base import Method, Model, Options, reply_weight, weights_of
from .options import CLAIROptions, ClairNoDetectOptions

__all__ = ["CLAIR", "Oracle", "ClairNoDetect", "CLAIROptions", "flag_clients", "stack_subspace"]


def _client_key(client: int, module: str, factor: str) -> str:
    return f"client/{client}/{module}/{factor}"


def _per_client(ids: list[int], rows: np.ndarray) -> dict[str, list[float]]:
    """``{client id: its row}`` of a ``(K, M)`` array, rounded to 6 decimals for metrics.jsonl."""
    return {str(k): [round(float(v), 6) for v in row] for k, row in zip(ids, rows, strict=True)}


class CLAIR(Method):
    """CLAIR: per-module robust recovery, one flag per client, refined personal downloads."""

    name, title, rule = "clair", "CLAIR", "clair"
    personalised = True
    Options = CLAIROptions
    needs_truth: ClassVar[bool] = False

    @property
    def refines(self) -> bool:
        return self.options.refine

    # ------------------------------------------------------------------ server
    def _detect(self, server, decoded: list[dict[str, FactorPair]], ids: list[int], weights: list[float]):
        """``(benign mask, subspaces {module: U}, detection info)`` from CLAIR on every module.

        ``keep_flags``: the clients flagged in any earlier round (``flagged_so_far``, absent clients included) stay
        flagged; ``kept`` names this round's participants among them.

        ``score = "update"`` scores each client's round update ``Theta_k - D_k`` (:meth:`round_updates`) instead
        of its whole adapter ``Theta_k``; the subspace is refitted on the benign clients' whole adapters either way
        (``fit_on``).
        """
        opts = self.options
        rank = opts.rank or min(server.ranks[k] for k in ids)
        scored = decoded if opts.score == "adapter" else self.round_updates(server, decoded, ids)
        before = set(server.info.get("detection", {}).get("flagged_so_far", [])) if opts.keep_flags else set()
        found = flag_clients(scored, rank=rank, lam=opts.lam, gamma_bar=opts.gamma_bar, threshold=opts.decision,
                             gap_level=opts.gap_level, weights=weights, fit_on=decoded,
                             flagged_before=[k in before for k in ids])
        flagged = [ids[i] for i in np.flatnonzero(~found.benign)]
        kept = {"kept": sorted(before & set(ids)), "flagged_so_far": sorted(before | set(flagged))} \
            if opts.keep_flags else {}
        info = {"flagged": flagged, **kept, "threshold": found.threshold,
                "scores": {str(k): round(float(s), 6) for k, s in zip(ids, found.scores, strict=True)},
                "lam": [round(float(min(found.lams)), 6), round(float(max(found.lams)), 6)], "rank": int(rank),
                "max_relative_gap": float(max(found.gaps)), "converged": bool(found.converged),
                "modules": list(scored[0]),  # the order of each client's per-module scores and residuals
                "module_scores": _per_client(ids, found.module_scores),
                "module_residuals": _per_client(ids, found.module_residuals)}
        return found.benign, found.subspaces, info

    def round_updates(self, server, decoded: list[dict[str, FactorPair]], ids: list[int]) -> list[dict[str, FactorPair]]:
        r"""Each client's change this round, ``Theta_k - D_k`` with ``D_k`` what it downloaded (:meth:`client_pairs`,
        read before the server state moves on), as one pair of rank ``r_k + r_D`` (:func:`lowrank_fed.factors.difference`)."""
        updates = []
        for k, pairs in zip(ids, decoded, strict=True):
            sent = self.client_pairs(server, k)
            updates.append({m: difference(p, sent[m]) for m, p in pairs.items()})
        return updates

    def _truth(self, server, decoded, ids, weights):
        known = set(server.info.get("contaminated", []))
        benign = np.array([k not in known for k in ids])
        return benign, {}, {"flagged": [k for k in ids if k in known]}

    def aggregate(self, server, replies):
        ids = list(replies)
        decoded = [decode_pairs(r.arrays) for r in replies.values()]
        weights = weights_of(replies)
        t0 = time.perf_counter()
        benign, subspaces, info = (self._truth if self.needs_truth else self._detect)(server, decoded, ids, weights)
        seconds = time.perf_counter() - t0
        if not benign.any():  # nobody to trust: keep the adapters and the head, report the round
            state = self.next_state(server, replies, info={"detection": {**info, "round": server.round + 1}})
            state.extras = server.extras
            state.cache["detection_seconds"] = seconds
            return state
        pi = collaborative_weights(np.asarray(weights), benign)
        members = np.flatnonzero(benign)
        r_max = max(server.ranks.values())
        pairs, arrays = {}, {k: v for k, v in server.arrays.items()}
        for m in server.shapes:
            mine = [d[m] for d in decoded]
            mean = aggregate("svd", [mine[i] for i in members], [pi[i] for i in members])  # exact benign mean
            pairs[m] = redistribute(mean, r_max, method="svd")
            refined = refine_pairs(mine, subspaces[m], pi) if m in subspaces and self.refines else None
            for i, k in enumerate(ids):
                source = refined[i] if (refined is not None and benign[i]) else mean
                down = redistribute(source, server.ranks[k], method="svd")
                arrays[_client_key(k, m, "B")], arrays[_client_key(k, m, "A")] = down.B, down.A
        good = {k: replies[k] for i, k in enumerate(ids) if benign[i]}
        extras = server.extras
        if self.head_shared and server.extras:
            heads = [decode_extras(r.arrays) for r in good.values()]
            extras = {e: weighted_average([h[e] for h in heads], weights_of(good)) for e in server.extras}
        state = self.next_state(server, replies, pairs=pairs, arrays=arrays,
                                info={"detection": {**info, "round": server.round + 1}})
        state.extras = extras
        state.cache["detection_seconds"] = seconds  # a timing: never in the checkpointed state
        return state

    def aggregation_target(self, server, replies, new):
        """The kept (not flagged) clients' pairs with their weights ``pi``; None when every client was flagged."""
        flagged = set(new.info.get("detection", {}).get("flagged", []))
        kept = [r for k, r in replies.items() if k not in flagged]
        if not kept:
            return None
        return [decode_pairs(r.arrays) for r in kept], [reply_weight(r) for r in kept]

    def download_pairs(self, server, rank):
        """The benign mean at ``rank`` (a new or flagged client); the shared initial prefix before round 1."""
        if not server.info.get("aggregated"):
            return super().download_pairs(server, rank)
        return {m: redistribute(p, rank, method="svd") for m, p in server.pairs.items()}

    def client_pairs(self, server, client):
        """The client's own refined download, kept by the server since its last aggregation."""
        keys = {m: (_client_key(client, m, "B"), _client_key(client, m, "A")) for m in server.shapes}
        if all(b in server.arrays for b, _ in keys.values()):
            return {m: FactorPair(server.arrays[b], server.arrays[a]) for m, (b, a) in keys.items()}
        return self.download_pairs(server, server.ranks[client])

    def download_is_global(self, server, rank):
        return False

    def personal_model(self, message, state, shapes):
        return Model(decode_pairs(message.arrays), decode_extras(message.arrays), None)


class Oracle(CLAIR):
    """FedAvg of the benign clients only: the server is told the truth (an upper bound, not a method)."""

    name, title, rule = "oracle", "Oracle (benign FedAvg)", "clair"
    Options = Options
    needs_truth = True

    @property
    def refines(self) -> bool:
        return False


class ClairNoDetect(CLAIR):
    """CLAIR's refinement with nobody flagged: the reference that separates detection from personalisation.

    Every participant is in ``G``: ``U_m`` = the top-``r`` left singular vectors of the whole stack
    (:func:`lowrank_fed.robust.stack_subspace`), the global is everyone's mean, and each client downloads
    ``P_m Theta_k + (I - P_m) sum_j pi_j Theta_j`` at its rank (no CLAIR program is solved, so it has
    only CLAIR's ``rank`` and ``refine`` options).
    """

    name, title, rule = "clair_nodetect", "CLAIR refinement, no detection", "clair"
    Options = ClairNoDetectOptions

    def _detect(self, server, decoded, ids, weights):
        rank = self.options.rank or min(server.ranks[k] for k in ids)
        subspaces = {}
        for m in decoded[0]:
            pairs = [d[m] for d in decoded]
            subspaces[m] = stack_subspace(pairs, min(rank, sum(p.rank for p in pairs), *pairs[0].shape))
        return np.ones(len(ids), dtype=bool), subspaces, {"flagged": [], "rank": int(rank)}
