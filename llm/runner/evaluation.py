r"""The server's scoring of models: the global model, each rank's download, each client's model, the uploads.

:class:`Scoring` is the evaluation half of the runner (:class:`~.simulation.Simulation` inherits it);
:func:`score_detection` scores a robust method's flagged set against the truth (reporting only). Every score
is deterministic: a model's scores depend on its tensors and the examples only, so scoring on the worker
processes (``workers > 1``) or here gives the same numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

from ..attacks import attackers_at
from ..evaluate import eval_chunks, greedy_generate, rouge_l, score_encoded, summarise
from ..fedeval import SiteEvaluator, decode_answer, request, site_blocks
from ..fedeval import pool as pool_scores
from ..methods import ClientState, Method, Model, ServerState
from ..protocol import Message, decode_extras, decode_pairs
from .rounds import evaluated, mean

__all__ = ["Scoring", "score_encoded", "score_detection", "detection_auc", "model_key"]


def model_key(model: Model) -> str:
    r"""A digest of the function ``model`` computes: two models with one key give the same scores, bit for bit.

    Over the base deltas, the head (``extras``) and each module's factors, with one exception: a module whose
    ``B`` is all zero (and ``A`` finite) adds ``B A x = 0`` to its layer's output whatever ``A`` and the rank, so it
    counts as no adapter there (round 0's downloads of every rank, for example, are one model).
    """
    h = hashlib.sha256()

    def tensor(name: str, t) -> None:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")

    for name in sorted(model.base or {}):
        tensor(f"base/{name}", model.base[name])
    for name in sorted(model.extras or {}):
        tensor(f"extra/{name}", model.extras[name])
    for name in sorted(model.pairs or {}):
        pair = model.pairs[name]
        if not bool(torch.any(pair.B)) and bool(torch.isfinite(pair.A).all()):
            continue  # no adapter on this module, as when ``pairs`` is None (0 * A is 0 for a finite A)
        tensor(f"B/{name}", pair.B)
        tensor(f"A/{name}", pair.A)
    return h.hexdigest()


def _packed(scores: dict) -> str:
    """A scored pass's per-example correctness (0/1 per test example) as the hex of ``numpy.packbits``: what the
    verdicts' paired standard error over test examples reads (``test_correct``)."""
    return np.packbits(scores["correct"]).tobytes().hex()


def detection_auc(scores, contaminated, benign) -> float | None:
    r"""``P(s_i > s_j) + P(s_i = s_j) / 2`` over contaminated ``i`` and benign ``j`` (``scores`` keyed by client id).

    None when there are no scores or one of the two groups is empty.

    >>> detection_auc({"0": 0.1, "1": 2.0, "2": 0.1}, [1], [0, 2])
    1.0
    >>> detection_auc({"0": 0.1, "1": 0.1}, [1], [0])
    0.5
    """
    if not scores or not contaminated or not benign:
        return None
    bad = np.array([float(scores[str(k)]) for k in contaminated])
    good = np.array([float(scores[str(k)]) for k in benign])
    return float(np.mean((bad[:, None] > good[None, :]) + 0.5 * (bad[:, None] == good[None, :])))


def score_detection(detection: dict, participants: list[int], attackers: Mapping) -> dict:
    r"""A round's flagged set and scores against the truth among its participants (reporting only).

    With ``F`` the flagged, ``T`` the contaminated and ``N`` the benign participants:
    ``precision = |F & T| / |F|`` (None when nothing is flagged), ``recall = |F & T| / |T|`` (None
    when no participant is contaminated), ``false_flag_rate = |F & N| / |N|`` (None when every
    participant is contaminated) and, when the method reports per-client ``scores``,

    .. math:: \mathrm{AUC} = \frac{1}{|T| |N|} \sum_{i \in T} \sum_{j \in N}
              \big(1[s_i > s_j] + \tfrac12 1[s_i = s_j]\big)

    (None without scores or when ``T`` or ``N`` is empty). The truth is read here, after the
    method's decision, and never reaches the method. The method's other keys are kept.
    """
    flagged = {int(k) for k in detection["flagged"]}
    truth = {k for k in participants if k in attackers}
    benign = [k for k in participants if k not in attackers]
    hits = len(flagged & truth)
    out = {k: v for k, v in detection.items() if k != "round"}
    out.update(flagged=sorted(flagged), contaminated=sorted(truth),
               precision=hits / len(flagged) if flagged else None, recall=hits / len(truth) if truth else None,
               false_flag_rate=len(flagged - truth) / len(benign) if benign else None,
               auc=detection_auc(detection.get("scores"), truth, benign))
    return out


class Scoring:
    r"""Evaluation of a set-up run (mixin of :class:`~.simulation.Simulation`).

    Reads what :meth:`Simulation.setup` builds: ``cfg``, ``ws`` (the model's workspace), ``enc`` (the encoded
    validation and test sets), ``val``, ``test``, ``holdout`` (each client's held-out test rows), ``val_holdout``
    (its share of the validation rows), ``attackers``, ``task``, ``metric``, ``tokenizer``, ``workers`` and
    ``federation``.
    """

    _pool = None

    def _load(self, model: Model) -> None:
        self.ws.set_base(model.base)
        self.ws.load(model.pairs, model.extras)

    def _score(self, split: str, rows=None) -> dict[str, np.ndarray]:
        return score_encoded(self.ws.peft, self.enc[split], rows, self.task)

    def _score_models(self, jobs: list[tuple[Model, str, object]]) -> list[dict[str, np.ndarray]]:
        r"""The scores of each ``(model, split, rows)`` in ``jobs``, in that order.

        Jobs that compute the same function on the same rows (:func:`model_key`: equal tensors, or an adapter that
        adds nothing whatever its rank) are scored once. With several workers each pass is cut into its batches
        (:func:`~lowrank_fed.llm.evaluate.eval_chunks`), which the workers take as they come free, each loading
        the model into its own workspace; else here one pass after another. Either way the same numbers: a model's
        scores depend on its tensors and each batch's examples only. A run scored by its sites
        (:mod:`~lowrank_fed.llm.fedeval`): :meth:`_score_sites`."""
        if getattr(self, "federated", False):
            return self._score_sites(jobs)
        keys = [(model_key(model), split, None if rows is None else np.asarray(rows, dtype=np.int64).tobytes())
                for model, split, rows in jobs]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}  # the first job of each distinct key
        unique = sorted(set(first.values()))
        if self.workers > 1:
            scored = self._score_chunked([jobs[i] for i in unique])
        else:
            scored = []
            for i in unique:
                model, split, rows = jobs[i]
                self._load(model)
                scored.append(self._score(split, rows))
        by_job = dict(zip(unique, scored, strict=True))
        return [dict(by_job[first[key]]) for key in keys]

    def _score_chunked(self, jobs: list[tuple[Model, str, object]]) -> list[dict[str, np.ndarray]]:
        """:meth:`_score_models` on the workers: every job's batches as tasks, each put back at its positions."""
        tasks, owners = [], []
        for j, (model, split, rows) in enumerate(jobs):
            for positions, chunk in eval_chunks(self.enc[split], rows, self.task):
                tasks.append(("score", (model, split, chunk)))
                owners.append((j, positions))
        results = self.pool.run(tasks)
        out: list[dict] = [{} for _ in jobs]
        for (status, value), (j, positions) in zip(results, owners, strict=True):
            if status != "ok":  # evaluation is the server's: a failure there fails the run, as it does here
                raise RuntimeError(f"Scoring a model on the {jobs[j][1]} set in a worker failed: {value}")
            n = self._n(jobs[j][1]) if jobs[j][2] is None else len(jobs[j][2])
            for key, array in value.items():
                out[j].setdefault(key, np.zeros(n, dtype=array.dtype))[positions] = array
        return out

    # ------------------------------------------------------------------ federated evaluation (fedeval)
    def _blocks(self, split: str) -> list[np.ndarray]:
        """Each site's rows of the pooled ``split`` (``"val"`` or ``"test"``), from the sites' sizes."""
        return site_blocks([v if split == "val" else t for v, t in self.site_sizes])

    def _n(self, split: str) -> int:
        """Rows of the pooled validation or test set."""
        if getattr(self, "federated", False):
            return int(sum(v if split == "val" else t for v, t in self.site_sizes))
        return len(self.val if split == "val" else self.test)

    def _ask_sites(self, jobs: dict[int, list[tuple[Model, str, int]]]) -> dict[int, list[dict[str, np.ndarray]]]:
        r"""Each site's per-example scores of its ``jobs[k]`` (:func:`~lowrank_fed.llm.fedeval.request`): on its
        node (the transport's ``evaluate_sites``, Flower) or here (:meth:`site_evaluators`), the one request and
        answer encoding either way."""
        requests = {k: request(js) for k, js in jobs.items()}
        ask = getattr(self.transport, "evaluate_sites", None) if getattr(self, "transport", None) else None
        if ask is not None:
            answers = ask(requests)
        else:
            evaluators = self.site_evaluators()
            answers = {k: evaluators[k].answer(msg) for k, msg in requests.items()}
        return {k: decode_answer(answers[k], len(jobs[k])) for k in jobs}

    def _score_sites(self, jobs: list[tuple[Model, str, object]]) -> list[dict[str, np.ndarray]]:
        r""":meth:`_score_models` of a run scored by its sites: each job's per-example arrays are the sites'
        arrays concatenated in client order (only the sites that hold some of the job's ``rows``), then cut to
        ``rows``."""
        per_site: dict[int, list] = {}
        plans = []
        for model, split, rows in jobs:
            blocks = self._blocks(split)
            if rows is None:
                sites = [k for k, b in enumerate(blocks) if len(b)]
            else:
                origin = np.concatenate([np.full(len(b), k, dtype=np.int64) for k, b in enumerate(blocks)])
                sites = sorted({int(k) for k in origin[np.asarray(rows, dtype=np.int64)]})
            plans.append((sites, [(k, len(per_site.setdefault(k, []))) for k in sites], rows, blocks))
            for k in sites:
                per_site[k].append((model, split, 0))
        answers = self._ask_sites(dict(sorted(per_site.items())))
        out = []
        for sites, slots, rows, blocks in plans:
            scores = pool_scores([answers[k][j] for k, j in slots])
            if rows is not None:
                held = np.concatenate([blocks[k] for k in sites])
                scores = {key: v[np.searchsorted(held, rows)] for key, v in scores.items()}
            out.append(scores)
        return out

    def _rouge_sites(self, model: Model) -> np.ndarray:
        """The per-example ROUGE-L of ``model`` on the first ``rouge_size`` pooled test rows, each site's computed
        at the site (its first rows; no prediction or reference leaves it)."""
        need = {}
        for k, block in enumerate(self._blocks("test")):
            n = int(np.clip(self.cfg.rouge_size - (block[0] if len(block) else 0), 0, len(block)))
            if n:
                need[k] = [(model, "rouge", n)]
        answers = self._ask_sites(need)
        return np.concatenate([answers[k][0]["rouge_l"] for k in need])

    def site_evaluators(self):
        """Each site's :class:`~lowrank_fed.llm.fedeval.SiteEvaluator` in this process (built on first use)."""
        if getattr(self, "_site_evaluators", None) is None:
            sites = self.federation.source.sites
            self._site_evaluators = [SiteEvaluator(self.cfg, self.model, s.val, s.test) for s in sites]
        return self._site_evaluators

    @property
    def pool(self):
        """The worker processes (:class:`~.pool.ClientPool`), started on first use; :meth:`close` stops them."""
        if self._pool is None:
            from .pool import ClientPool

            self._pool = ClientPool(self.cfg, self.federation.shared, self.workers, max(self.ranks))
        return self._pool

    def close(self) -> None:
        """Stop the worker processes, if any were started (:meth:`run` does so when it ends)."""
        if getattr(self, "_pool", None) is not None:
            self._pool.close()
            self._pool = None

    def evaluate(self, method: Method, server: ServerState, clients: dict[int, ClientState], *,
                 by_rank: bool = True, rouge: bool = False) -> dict:
        r"""Scores of a round (deterministic; no timings).

        - ``<metric>``, ``loss`` (and ``macro_f1`` for classification): the global model on the test set;
          ``val_<metric>`` (``val_loss``, ``val_macro_f1``): on the validation set;
        - ``by_rank``: ``{rank: {<metric>, loss, macro_f1}}`` for the model each distinct client rank downloads;
        - ``local_<metric>``: the mean over clients of each client's model on its own held-out set
          (``per_client`` lists them, None for a client whose held-out set is empty): its download, or
          its personalised model (``personal`` methods); ``local_macro_f1`` (classification) likewise, the mean
          over clients of each one's macro-F1 on its own held-out set;
        - ``val_local_<metric>``, ``val_local_loss`` (personalised methods, with a validation split; the others
          too with ``val_downloads``): the mean over clients of each client's own model, or its download, on its
          share of the validation set (``val_holdout``), what ``lowrank-fed tune`` scores a personalised method on
          (any method with ``--score-on downloads``); ``val_benign_local_*`` the same over the benign clients
          (with attackers); ``val_local_n`` / ``val_benign_local_n``: ``K^2 / sum_k 1/n_k``, the number of
          examples whose binomial error the mean of ``K`` per-client accuracies has;
        - ``per_client_global`` (methods that are not personalised): the global model on each client's own
          held-out set, so ``per_client_global[k] - per_client[k]`` is client ``k``'s drop at distribution.
        """
        glob = method.global_model(server)
        jobs = [(glob, "test", None)] + ([(glob, "val", None)] if self._n("val") else [])
        ranks = personal = val_own = []
        scored_on_shares = self._n("val") and self.val_holdout is not None
        shares = self.val_holdout if scored_on_shares else [[]] * self.cfg.clients
        val_downloads = by_rank and scored_on_shares and self.cfg.val_downloads and not method.personalised
        if by_rank and method.personalised:  # each client's own model on its held-out rows and validation share
            # what tune scores a personalised method on (the global model's validation score is computed above)
            models = {k: method.personal_model(method.configure(server, k), clients.get(k, ClientState()),
                                               self.ws.shapes)
                      for k in range(self.cfg.clients) if len(self.holdout[k]) or len(shares[k])}
            personal = [k for k in models if len(self.holdout[k])]
            val_own = [k for k in models if len(shares[k])]
            jobs += [(models[k], "test", self.holdout[k]) for k in personal]
            jobs += [(models[k], "val", shares[k]) for k in val_own]
        elif by_rank:  # the model each distinct rank downloads, where it is not the global one
            ranks = [r for r in sorted(set(server.ranks.values())) if not method.download_is_global(server, r)]
            splits = ("test", "val") if val_downloads else ("test",)  # val: scored on each client's share below
            jobs += [(method.downloaded_model(server, r), split, None) for split in splits for r in ranks]
        scored = self._score_models(jobs)
        global_scores = scored.pop(0)
        out = summarise(global_scores)
        if "correct" in global_scores:  # per test example, for the verdict's paired standard error (report.py)
            out["test_correct"] = _packed(global_scores)
        if self._n("val"):
            val_global = scored.pop(0)
            out.update({f"val_{k}": v for k, v in summarise(val_global).items()})
        if rouge and self.task == "generation" and self.cfg.rouge_size and getattr(self, "federated", False):
            out["rouge_l"] = float(np.mean(self._rouge_sites(glob)))  # no samples: they are the sites' examples
        elif rouge and self.task == "generation" and self.cfg.rouge_size:
            self._load(glob)
            n = min(self.cfg.rouge_size, len(self.test))
            preds = greedy_generate(self.ws.peft, self.tokenizer, self.enc["test"]["prompt_ids"][:n],
                                    self.enc["test"]["prompt_mask"][:n], max_new_tokens=self.cfg.max_new_tokens)
            out["rouge_l"] = rouge_l(preds, list(self.test.targets[:n]))
            out["samples"] = [{"prediction": p, "reference": r} for p, r in zip(preds[:3], self.test.targets[:3], strict=False)]
        if not by_rank:
            return out
        sums: list[dict | None]  # per client; None: the client's held-out set is empty
        if method.personalised:
            own = dict(zip(personal, scored[:len(personal)], strict=True))
            self._val_local(out, {k: summarise(v) for k, v in zip(val_own, scored[len(personal):], strict=True)},
                            shares)
            sums = [summarise(own[k]) if k in own else None for k in range(self.cfg.clients)]
        else:
            downloads = dict(zip(ranks, scored[:len(ranks)], strict=True))
            scores = {r: downloads.get(r, global_scores) for r in sorted(set(server.ranks.values()))}
            if val_downloads:  # each client's download on its validation share: the global model's where it is one
                val_scores = dict(zip(ranks, scored[len(ranks):], strict=True))
                self._val_local(out, {k: summarise(val_scores.get(server.ranks[k], val_global), shares[k])
                                      for k in range(self.cfg.clients) if len(shares[k])}, shares)
            out["by_rank"] = {str(r): {**summarise(s), **({"test_correct": _packed(s)} if "correct" in s else {})}
                              for r, s in scores.items()}
            sums = [summarise(scores[server.ranks[k]], self.holdout[k]) if len(self.holdout[k]) else None
                    for k in range(self.cfg.clients)]
            # the global model on each client's own held-out set: minus per_client, the drop at distribution
            out["per_client_global"] = [summarise(global_scores, self.holdout[k])[self.metric]
                                        if len(self.holdout[k]) else None for k in range(self.cfg.clients)]
        out["per_client"] = [s[self.metric] if s else None for s in sums]
        extra = ("token_accuracy", "exact_match") if self.task == "generation" else ("macro_f1",)
        for key in (self.metric, *extra):
            values = [s[key] if s else None for s in sums]
            out[f"local_{key}"] = mean(values)
            if self.attackers:  # what the benign clients get: the contaminated ones' scores are not their goal
                out[f"benign_local_{key}"] = mean(v for k, v in enumerate(values) if k not in self.attackers)
        return out

    def _val_local(self, out: dict, val_sums: dict[int, dict], shares) -> None:
        """``val_local_*`` (every client in ``val_sums``) and ``val_benign_local_*`` (its benign ones, with
        attacks) into ``out``: the mean of the clients' validation scores, and its effective number of examples
        ``K^2 / sum_k 1/n_k`` (the binomial error of a mean of ``K`` per-client accuracies)."""
        groups = {"val_local": list(val_sums)}
        if self.cfg.attacks:  # what the benign clients get, as benign_local_<metric> on the test side
            groups["val_benign_local"] = [k for k in val_sums if k not in self.attackers]
        for name, ks in groups.items():
            if not ks:
                continue
            for key in (self.metric, "loss"):
                out[f"{name}_{key}"] = mean(val_sums[k][key] for k in ks)
            out[f"{name}_n"] = len(ks) ** 2 / sum(1.0 / len(shares[k]) for k in ks)

    def _evaluated(self, round_: int) -> bool:
        """Whether round ``round_`` is scored (every ``eval_every`` rounds and the last)."""
        return evaluated(self.cfg, round_)

    def score_upload(self, method: Method, server: ServerState, k: int, reply: Message) -> dict:
        r"""Client ``k``'s own trained model, what it uploads before any aggregation (option ``score_uploads``).

        ``upload_<metric>`` on the test set and ``upload_local_<metric>`` on the client's held-out set, for
        methods whose reply is the client's whole model (``Method.upload_is_model``: both factors of every
        module and the shared head, or the frozen one); ``{}`` for the others (FFA, FedSA, LoRA-A2, FLoRA,
        HAFL freezing, local).
        Byun & Lee's diagnostic compares it with the model the client gets back after one aggregation.
        """
        if not method.upload_is_model:
            return {}
        pairs = decode_pairs(reply.arrays)
        extras = decode_extras(reply.arrays) if method.head_shared else server.extras
        upload = Model(pairs, dict(extras), None)
        if getattr(self, "federated", False):
            scores = self._score_models([(upload, "test", None)])[0]
        else:
            self._load(upload)
            scores = self._score("test")  # one pass: the held-out rows are rows of the test set (as in evaluate)
        out = {f"upload_{self.metric}": summarise(scores)[self.metric]}
        if len(self.holdout[k]):
            out[f"upload_local_{self.metric}"] = summarise(scores, self.holdout[k])[self.metric]
        return out
    def score_detection(self, detection: dict, participants: list[int], round_: int) -> dict:
        """:func:`score_detection` against this run's clients contaminated in ``round_`` (reporting only)."""
        return score_detection(detection, participants, attackers_at(self.attackers, round_))
