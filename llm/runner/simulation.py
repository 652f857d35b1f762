r"""The embedded in-process runner: rounds, client sampling, evaluation, checkpoints, resume.

For each method of the config, round ``t = 1..T``:

1. sample clients (all, or ``clients_per_round`` drawn from ``(seed, t)``);
2. for each sampled client ``k``: ``message = method.configure(server, k)``, then
   :func:`~lowrank_fed.llm.client.run_client` (the same function a Flower ``ClientApp`` calls) returns
   the reply and the client's new state;
3. each reply is checked (:meth:`Method.check_reply`); a NaN/Inf or misshapen reply, or a client that
   raised, is dropped with an :class:`UpdateDroppedWarning`, counted, and never aggregated (a client that
   raised keeps its previous state);
4. ``server = method.aggregate(server, replies)`` (a core rule, data weights from the replies);
5. evaluation on one forward pass per distinct model: the global model on the test and validation sets,
   the model each distinct rank downloads, and each client's model (the one it downloads, or its
   personalised one) on its own held-out set; one JSON line goes to ``metrics.jsonl``, timings to
   ``timings.jsonl``;
6. a checkpoint (:mod:`.checkpoint`: atomic, checksummed, the previous round kept; its ``state.json``
   holds the run config, so a resume can refuse a config that changed, :meth:`Simulation.check_resume`).

All randomness is derived from ``(seed, purpose, round, client)`` (the named streams of
:mod:`~lowrank_fed.llm.streams`), so a resumed run writes the same
bytes as an uninterrupted one (``metrics.jsonl``, ``adapters/``, checkpoints, plots); only ``timings.jsonl``
and the time columns of ``summary.*`` differ.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lowrank_fed import FactorPair

from ..attacks import attack_reply
from ..client import ClientContext, run_client
from ..config import WORKERS_ENV, ConfigError, RunConfig, same_run_keys
from ..evaluate import greedy_generate, rouge_l, score_classification, score_lm, summarise
from ..federation import build_client, build_federation, build_model, encode_examples, sample_clients
from ..federation import config_key as _config_key
from ..methods import ClientState, Method, Model, ServerState, make_method
from ..methods.exactness import aggregation_errors, error_fields
from ..models import MODELS
from ..peft_bridge import init_pairs, pairs_to_state_dict
from ..protocol import Message, decode_extras, decode_pairs, encode_extras, encode_pairs, from_flat, to_flat
from ..streams import ADAPTER_INIT
from ..training import prefix_shares
from .checkpoint import (CheckpointCorruptWarning, CheckpointError, atomic_write_text, load_checkpoint, peek_state,
                         save_checkpoint, save_tensors)
from .limits import check_limits
from .report import add_verdict, summary_markdown, summary_row, write_plots

__all__ = ["Simulation", "run_experiment", "UpdateDroppedWarning", "load_final", "score_encoded"]

log = logging.getLogger("lowrank_fed.llm")

class UpdateDroppedWarning(UserWarning):
    """A client reply was rejected (NaN/Inf, wrong shape or rank) and left out of the aggregation."""


def _warn_dropped(msg: str) -> None:
    """Say ``msg`` once: an :class:`UpdateDroppedWarning`, and the same line in the log only where a handler shows
    it (Flower's log stream in the ServerApp); without one, logging's last-resort handler would print it again."""
    warnings.warn(msg, UpdateDroppedWarning, stacklevel=4)
    if log.hasHandlers():
        log.warning(msg)


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def _shown(value) -> str:
    """A config value as it reads in TOML / JSON (``(absent)`` for a missing key), at most 100 characters."""
    text = "(absent)" if not isinstance(value, (dict, list, str, int, float, bool, type(None))) else json.dumps(value)
    return text if len(text) <= 100 else text[:97] + "..."


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


def _mean(values) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def score_encoded(model, enc: dict[str, torch.Tensor], rows, task: str) -> dict[str, np.ndarray]:
    """Per-example scores of ``model`` on the encoded examples ``enc`` (only ``rows`` of them, if given)."""
    if rows is not None:
        enc = {k: v[torch.as_tensor(rows, dtype=torch.long)] for k, v in enc.items()}
    score = score_classification if task == "classification" else score_lm
    return score(model, enc)


def _mean_shares(shares) -> dict[str, float | None]:
    """Per level ``t``: the mean of the clients' prefix shares at ``t`` (those that have the level and a share)."""
    by_level: dict[str, list] = {}
    for share in shares:
        for t, value in (share or {}).items():
            by_level.setdefault(t, []).append(value)
    return {t: _mean(by_level[t]) for t in sorted(by_level, key=int)}


# ----------------------------------------------------------------------------- state <-> flat tensors


def state_to_flat(server: ServerState, clients: dict[int, ClientState]) -> tuple[dict, dict]:
    r"""Server and client states as flat tensors plus JSON (a checkpoint's content).

    Each state is written as a :class:`Message` and encoded by :func:`~lowrank_fed.llm.protocol.to_flat`,
    the one encoding that the Flower apps use too: ``server/`` (the global pairs, the head, the method's
    arrays; config: round, ranks, info) and ``client/<k>/`` (a client's arrays; config: its info).
    """
    arrays = {**encode_pairs(server.pairs), **encode_extras(server.extras),
              **{f"arrays/{n}": v for n, v in server.arrays.items()}}
    config = {"round": server.round, "ranks": {str(k): r for k, r in server.ranks.items()}, "info": server.info}
    tensors, meta = to_flat(Message(arrays, config), "server/")
    metas = {"server": meta, "clients": {}}
    for k, c in clients.items():
        t, metas["clients"][str(k)] = to_flat(Message(c.arrays, c.info), f"client/{k}/")
        tensors.update(t)
    return tensors, metas


def state_from_flat(tensors: dict, metas: dict, shapes: dict) -> tuple[ServerState, dict[int, ClientState]]:
    """Inverse of :func:`state_to_flat`."""
    msg = from_flat(tensors, metas["server"], "server/")
    pairs, cfg = decode_pairs(msg.arrays), msg.config
    arrays = {k[len("arrays/"):]: v for k, v in msg.arrays.items() if k.startswith("arrays/")}
    server = ServerState(cfg["round"], {m: pairs[m] for m in shapes if m in pairs}, decode_extras(msg.arrays),
                         dict(shapes), {int(k): int(r) for k, r in cfg["ranks"].items()}, arrays, cfg["info"])
    clients = {}
    for k, meta in metas["clients"].items():
        c = from_flat(tensors, meta, f"client/{k}/")
        clients[int(k)] = ClientState(c.arrays, c.config)
    return server, clients


def load_final(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a method's final server state (``adapters/<method>.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(path))


class Simulation:
    r"""One run of ``lowrank-fed run``: data, model and clients set up once, methods run in turn.

    Parameters
    ----------
    config : RunConfig
    out_dir : path
        Where outputs go. The runner adds and replaces its own files; it never deletes a folder.
    progress : bool
        Show progress bars (tqdm, on stderr).
    on_round_end : callable(method_name, round), optional
        Called after each round's checkpoint (tests use it to interrupt a run).
    """

    #: Whether ``workers`` applies: the in-process runner's clients and scores may go to worker processes
    #: (:mod:`.pool`); a runner whose clients live elsewhere (Flower) sets it False.
    parallel = True

    def __init__(self, config: RunConfig, out_dir: str | Path, *, progress: bool = True,
                 on_round_end: Callable[[str, int], None] | None = None):
        self.cfg = config
        self.out = Path(out_dir)
        self.progress = progress
        self.on_round_end = on_round_end
        self._ready = False
        self._pool = None

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        r"""The federation (:func:`~lowrank_fed.llm.federation.build_federation`: rows, ranks, attackers, held-out
        sets), the model, the server's validation and test sets. Each client's context is built from its own rows
        on first use (:attr:`contexts`).

        Writes nothing. A setting that the data or the model cannot satisfy (``val_size`` above the
        training examples, more clients than examples, ``target_modules`` the model lacks, a bound of
        :mod:`.limits`: ranks, ``max_length``, ``batch_size``, a local round's memory, ...) raises
        :class:`~lowrank_fed.llm.config.ConfigError` naming the key, so ``lowrank-fed run`` can refuse it
        with exit status 2 before anything is written.
        """
        if self._ready:
            return
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        fed = build_federation(cfg)  # ConfigError: val_size, clients, attacks, ranks
        self.federation = fed
        self.task = fed.task
        labelled = self.task == "classification"
        self.val, self.test = fed.source.examples(fed.val_rows), fed.source.test
        self.client_idx, self.n_k, self.attackers, self.ranks = fed.client_idx, fed.n_k, fed.attackers, fed.ranks
        for name in cfg.methods:
            with _config_key("ranks", self.ranks):
                make_method(name, **cfg.method_options.get(name, {})).check_ranks(self.ranks)
        self.holdout = fed.holdout
        with _config_key("target_modules", cfg.target_modules):
            self.model = build_model(cfg, fed.shared, len(fed.source.label_names), max(self.ranks))
        self.device, self.tokenizer, self.ws = self.model.device, self.model.tokenizer, self.model.workspace
        held = {f"{name}.global_rank": make_method(name, **cfg.method_options.get(name, {})).options
                for name in cfg.methods}  # ranks that every client holds (LoRA-A2's r_G)
        workers = cfg.worker_count(self.device.type) if self.parallel else 1
        self.workers = check_limits(
            cfg, ranks=self.ranks, shapes=self.ws.shapes, model_config=self.model.model_config, task=self.task,
            n_k=self.n_k, device=self.device, workers=workers, chosen=bool(cfg.workers or os.environ.get(WORKERS_ENV)),
            model_bytes=self.model.model_params * torch.finfo(getattr(torch, cfg.dtype)).bits // 8,
            global_ranks={k: o.global_rank for k, o in held.items() if hasattr(o, "global_rank")})
        # validation and test are the server's, clean (an empty split, val_size = 0, is never scored, so it is not
        # encoded: tokenizers reject empty lists); each client encodes its own training rows (build_client)
        self.enc = {name: encode_examples(self.tokenizer, d, cfg.max_length)
                    for name, d in (("val", self.val), ("test", self.test)) if len(d)}
        self.r_max = max(self.ranks)
        self.init_seed = ADAPTER_INIT.seed(cfg.seed)
        self.init = init_pairs(self.ws.shapes, self.r_max, torch.Generator().manual_seed(self.init_seed),
                               device=self.device)
        self.init_extras = self.ws.extras_template()
        self.metric = "accuracy" if labelled else "perplexity"
        self._contexts = None
        self._train = None
        self._ready = True

    @property
    def contexts(self) -> list[ClientContext]:
        r"""Each client's context, built on first use by :func:`~lowrank_fed.llm.federation.build_client` from that
        client's own rows (all sharing the one workspace: in-process clients train one at a time). A run on Flower
        never builds them: its clients are built on their nodes."""
        if self._contexts is None:
            fed = self.federation
            self._contexts = [build_client(self.cfg, k, shared=fed.shared, source=fed.source, model=self.model)
                              for k in range(self.cfg.clients)]
        return self._contexts

    @property
    def train(self):
        """The training examples (without the validation rows), as the data source holds them (read on first use)."""
        if self._train is None:
            self._train = self.federation.source.examples(self.federation.train_rows)
        return self._train

    def describe(self) -> dict:
        """The run's set-up facts (``setup.json``; the plots' titles)."""
        info = {"ranks": self.ranks, "n_k": self.n_k, "task": self.task, "modules": list(self.ws.shapes),
                "label_names": list(self.federation.source.label_names), "eval_size": len(self.test),
                "val_size": len(self.val),
                "holdout_sizes": [int(len(h)) for h in self.holdout], "metric": self.metric,
                "adapted_params": int(sum(d_out * d_in for d_out, d_in in self.ws.shapes.values())),
                "model_params": self.model.model_params}
        if self.attackers:
            info["attackers"] = {str(k): a.kind for k, a in self.attackers.items()}
        if self.task == "classification":
            counts = np.bincount(self.test.labels, minlength=len(self.federation.source.label_names))
            info["majority_accuracy"] = float(counts.max() / counts.sum())
        return info

    # ------------------------------------------------------------------ evaluation
    def _load(self, model: Model) -> None:
        self.ws.set_base(model.base)
        self.ws.load(model.pairs, model.extras)

    def _score(self, split: str, rows=None) -> dict[str, np.ndarray]:
        return score_encoded(self.ws.peft, self.enc[split], rows, self.task)

    def _score_models(self, jobs: list[tuple[Model, str, object]]) -> list[dict[str, np.ndarray]]:
        r"""The scores of each ``(model, split, rows)`` in ``jobs``, in that order: on the workers when there are
        several (each loads the model into its own workspace), else here one after another. Either way the same
        numbers: a model's scores depend on its tensors and the examples only."""
        if self.workers > 1 and len(jobs) > 1:
            results = self.pool.run([("score", job) for job in jobs])
            for (status, value), (_, split, _) in zip(results, jobs, strict=True):
                if status != "ok":  # evaluation is the server's: a failure there fails the run, as it does here
                    raise RuntimeError(f"Scoring a model on the {split} set in a worker failed: {value}")
            return [value for _, value in results]
        out = []
        for model, split, rows in jobs:
            self._load(model)
            out.append(self._score(split, rows))
        return out

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

        - ``<metric>``, ``loss``: the global model on the test set; ``val_<metric>``: on the validation set;
        - ``by_rank``: ``{rank: {<metric>, loss}}`` for the model each distinct client rank downloads;
        - ``local_<metric>``: the mean over clients of each client's model on its own held-out set
          (``per_client`` lists them, None for a client whose held-out set is empty): its download, or
          its personalised model (``personal`` methods);
        - ``per_client_global`` (methods that are not personalised): the global model on each client's own
          held-out set, so ``per_client_global[k] - per_client[k]`` is client ``k``'s drop at distribution.
        """
        glob = method.global_model(server)
        jobs = [(glob, "test", None)] + ([(glob, "val", None)] if len(self.val) else [])
        ranks = personal = []
        if by_rank and method.personalised:  # each client's own model on its held-out rows
            personal = [k for k in range(self.cfg.clients) if len(self.holdout[k])]
            jobs += [(method.personal_model(method.configure(server, k), clients.get(k, ClientState()), self.ws.shapes),
                      "test", self.holdout[k]) for k in personal]
        elif by_rank:  # the model each distinct rank downloads, where it is not the global one
            ranks = [r for r in sorted(set(server.ranks.values())) if not method.download_is_global(server, r)]
            jobs += [(method.downloaded_model(server, r), "test", None) for r in ranks]
        scored = self._score_models(jobs)
        global_scores = scored.pop(0)
        out = summarise(global_scores)
        if "correct" in global_scores:  # per test example, for the verdict's paired standard error (report.py)
            out["test_correct"] = np.packbits(global_scores["correct"]).tobytes().hex()
        if len(self.val):
            out.update({f"val_{k}": v for k, v in summarise(scored.pop(0)).items()})
        if rouge and self.task == "generation" and self.cfg.rouge_size:
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
            own = dict(zip(personal, scored, strict=True))
            sums = [summarise(own[k]) if k in own else None for k in range(self.cfg.clients)]
        else:
            downloads = dict(zip(ranks, scored, strict=True))
            scores = {r: downloads.get(r, global_scores) for r in sorted(set(server.ranks.values()))}
            out["by_rank"] = {str(r): summarise(s) for r, s in scores.items()}
            sums = [summarise(scores[server.ranks[k]], self.holdout[k]) if len(self.holdout[k]) else None
                    for k in range(self.cfg.clients)]
            # the global model on each client's own held-out set: minus per_client, the drop at distribution
            out["per_client_global"] = [summarise(global_scores, self.holdout[k])[self.metric]
                                        if len(self.holdout[k]) else None for k in range(self.cfg.clients)]
        out["per_client"] = [s[self.metric] if s else None for s in sums]
        for key in (self.metric, *(("token_accuracy", "exact_match") if self.task == "generation" else ())):
            values = [s[key] if s else None for s in sums]
            out[f"local_{key}"] = _mean(values)
            if self.attackers:  # what the benign clients get: the contaminated ones' scores are not their goal
                out[f"benign_local_{key}"] = _mean(v for k, v in enumerate(values) if k not in self.attackers)
        return out

    def _evaluated(self, round_: int) -> bool:
        """Whether round ``round_`` is scored (every ``eval_every`` rounds and the last)."""
        return round_ % self.cfg.eval_every == 0 or round_ == self.cfg.rounds

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
        self._load(Model(pairs, dict(extras), None))
        scores = self._score("test")  # one pass: the held-out rows are rows of the test set (as in evaluate)
        out = {f"upload_{self.metric}": summarise(scores)[self.metric]}
        if len(self.holdout[k]):
            out[f"upload_local_{self.metric}"] = summarise(scores, self.holdout[k])[self.metric]
        return out

    def score_detection(self, detection: dict, participants: list[int]) -> dict:
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
        truth = {k for k in participants if k in self.attackers}
        benign = [k for k in participants if k not in self.attackers]
        hits = len(flagged & truth)
        out = {k: v for k, v in detection.items() if k != "round"}
        out.update(flagged=sorted(flagged), contaminated=sorted(truth),
                   precision=hits / len(flagged) if flagged else None, recall=hits / len(truth) if truth else None,
                   false_flag_rate=len(flagged - truth) / len(benign) if benign else None,
                   auc=detection_auc(detection.get("scores"), truth, benign))
        return out

    # ------------------------------------------------------------------ one round
    def _fault(self, method: str, round_: int, k: int) -> str | None:
        for f in self.cfg.faults:
            if f.round == round_ and f.client == k and (f.method is None or f.method == method):
                return f.kind
        return None

    @staticmethod
    def _corrupt(reply: Message, kind: str) -> Message:
        """The reply with one entry made NaN/Inf, or one tensor a column short; unchanged if it uploads nothing (``local``)."""
        if not reply.arrays:
            return reply
        key = sorted(reply.arrays)[0]
        arrays = dict(reply.arrays)
        t = arrays[key]
        if kind == "shape":
            arrays[key] = t[..., :-1].clone() if t.shape[-1] > 1 else torch.cat([t, t], dim=-1)
        else:
            t = t.clone()
            t.view(-1)[0] = float("nan") if kind == "nan" else float("inf")
            arrays[key] = t
        return Message(arrays, dict(reply.config), dict(reply.metrics))

    def sampled(self, round_: int) -> list[int]:
        """The clients of round ``round_`` (:func:`~lowrank_fed.llm.federation.sample_clients`)."""
        return sample_clients(self.cfg, round_)

    def run_round(self, method: Method, server: ServerState, clients: dict[int, ClientState], round_: int, bar=None):
        """One round: configure, run_client, check, aggregate. Returns ``(server, clients, rows, times)``.

        With several workers (``workers``) and several clients in the round, the clients train at once on the
        worker processes (:meth:`_run_round_parallel`), with the same results."""
        if self.workers > 1 and len(self.sampled(round_)) > 1:
            return self._run_round_parallel(method, server, clients, round_, bar)
        replies: dict[int, Message] = {}
        rows, server_s, client_s, train_s, probe_s = [], 0.0, 0.0, 0.0, 0.0  # timings; rows hold what replies carry
        for k in self.sampled(round_):
            t0 = time.perf_counter()
            message = method.configure(server, k)
            t1 = time.perf_counter()
            row = {"client": k, "rank": int(message.config["rank"]), "bytes_down": message.nbytes, "dropped": False}
            try:
                reply, state, _ = run_client(method, message, clients.get(k), self.contexts[k])
                error = None
            except Exception as err:  # a failing client is a dropped update, not a failed run
                reply, state, error = None, clients.get(k), f"client failed: {type(err).__name__}: {err}"
            t2 = time.perf_counter()
            if reply is not None:
                clients[k] = state
                m = reply.metrics
                probe_s += m.get("probe_seconds", 0.0)
                train_s += m.get("train_seconds", 0.0)
                client_s += t2 - t1 - m.get("train_seconds", 0.0)
            accepted, eval_s = self.accept_reply(method, server, round_, k, reply, error, row)
            if accepted is not None:
                replies[k] = accepted
            # scoring the upload (option score_uploads) is evaluation, not server work
            server_s += (t1 - t0) + (time.perf_counter() - t2) - eval_s
            rows.append(row)
            if bar is not None:
                bar.update(1)
        server, times = self._aggregate_timed(method, server, replies, round_, server_s, client_s, train_s, probe_s)
        return server, clients, rows, times

    def _run_round_parallel(self, method: Method, server: ServerState, clients: dict[int, ClientState],
                            round_: int, bar=None):
        r""":meth:`run_round` with the clients on the workers (:class:`~.pool.ClientPool`).

        Every download is configured here first, in client order; the pool trains the clients at once (each
        worker with its own model and each client's own context) and hands their replies back in client order;
        then each reply is checked, attacked and faulted (:meth:`accept_reply`) in client order, and aggregated,
        exactly as one after another. A client whose worker raised, or died, sent no reply: it keeps its state and
        its update is dropped (``client failed: ...``).
        """
        replies: dict[int, Message] = {}
        rows, server_s, client_s, train_s, probe_s = [], 0.0, 0.0, 0.0, 0.0
        sampled, messages = self.sampled(round_), []
        t0 = time.perf_counter()
        for k in sampled:
            message = method.configure(server, k)
            messages.append(message)
            rows.append({"client": k, "rank": int(message.config["rank"]), "bytes_down": message.nbytes,
                         "dropped": False})
        server_s += time.perf_counter() - t0
        tasks = [("train", (method.name, message, clients.get(k), k)) for k, message in zip(sampled, messages, strict=True)]
        results = self.pool.run(tasks, on_result=None if bar is None else lambda _: bar.update(1))
        for k, row, (status, value) in zip(sampled, rows, results, strict=True):
            t2 = time.perf_counter()
            if status == "ok":
                reply, state, seconds = value
                clients[k] = state
                m = reply.metrics
                probe_s += m.get("probe_seconds", 0.0)
                train_s += m.get("train_seconds", 0.0)
                client_s += seconds - m.get("train_seconds", 0.0)
                error = None
            else:
                reply, error = None, f"client failed: {value}"
            accepted, eval_s = self.accept_reply(method, server, round_, k, reply, error, row)
            if accepted is not None:
                replies[k] = accepted
            server_s += time.perf_counter() - t2 - eval_s
        server, times = self._aggregate_timed(method, server, replies, round_, server_s, client_s, train_s, probe_s)
        return server, clients, rows, times

    def _aggregate_timed(self, method: Method, server: ServerState, replies: dict[int, Message], round_: int,
                         server_s: float, client_s: float, train_s: float, probe_s: float):
        """:meth:`aggregate_round`, and the round's seconds: server work (the aggregation included), client
        overhead, training and probing."""
        t0 = time.perf_counter()
        server = self.aggregate_round(method, server, replies, round_)
        aggregate_s = time.perf_counter() - t0
        return server, {"server_seconds": server_s + aggregate_s, "aggregate_seconds": aggregate_s,
                        "client_overhead_seconds": client_s, "train_seconds": train_s, "probe_seconds": probe_s}

    def accept_reply(self, method: Method, server: ServerState, round_: int, k: int, reply: Message | None,
                     error: str | None, row: dict) -> tuple[Message | None, float]:
        r"""Check client ``k``'s reply; return ``(reply to aggregate or None, seconds spent scoring the upload)``.

        The reply as the client sent it must pass :meth:`Method.check_reply`; only then is it scored (option
        ``score_uploads``, :meth:`score_upload`: the client's own model, before any attack), given the configured
        attack and fault (:func:`~lowrank_fed.llm.attacks.attack_reply`, ``[[faults]]``) and, if they changed it,
        checked again. A reply that fails a check, or no reply at all (``reply`` None: the client raised, or on
        Flower its node did not answer or sent a reply that cannot be decoded; ``error`` says why), sets
        ``row["dropped"]`` and ``row["reason"]`` and gives an :class:`UpdateDroppedWarning`; the first value
        returned is then None. ``row`` also gets what the reply carries (examples, loss, bytes up, ...). The
        second value is the time spent scoring the upload: evaluation, not server work (callers subtract it).
        The in-process runner and the Flower strategy both call this, so a reply is dropped and counted the same
        way on either.
        """

        def complaint(reply: Message) -> str | None:
            try:
                method.check_reply(server, k, reply)
            except ValueError as err:
                return str(err)
            except TypeError as err:  # a value of the wrong type (a reply off the wire)
                return f"{type(err).__name__}: {err}"
            return None

        eval_s = 0.0
        if reply is not None:
            error = complaint(reply)  # the reply as sent: nothing malformed is scored, attacked or aggregated
            if error is None and self.cfg.score_uploads and self._evaluated(round_):
                start = time.perf_counter()
                row.update(self.score_upload(method, server, k, reply))  # the client's own model, before any attack
                eval_s = time.perf_counter() - start
            sent = reply
            if k in self.attackers:
                row["attack"] = self.attackers[k].kind
                if error is None:
                    reply = attack_reply(reply, self.attackers[k], seed=self.cfg.seed, round_=round_, client=k)
            kind = self._fault(method.name, round_, k)
            if kind and error is None:
                reply = self._corrupt(reply, kind)
            m = reply.metrics
            row.update(n=reply.config.get("num_examples"), train_loss=m.get("train_loss"),
                       train_accuracy=m.get("train_accuracy"), bytes_up=reply.nbytes,
                       params_up=m.get("params_up"), steps=m.get("steps"),
                       prefix_share=prefix_shares(m.get("prefix_energy"), self.ranks))
            if error is None and reply is not sent:
                error = complaint(reply)
        else:
            row.update(n=None, train_loss=None, train_accuracy=None, bytes_up=0, params_up=0, steps=0,
                       prefix_share=None)
        if error is None:
            if reply.config["rank"] != row["rank"]:
                row["new_rank"] = int(reply.config["rank"])
            return reply, eval_s
        row["dropped"], row["reason"] = True, error
        msg = f"{method.title}, round {round_}, client {k}: update dropped ({error})"
        _warn_dropped(msg)
        return None, eval_s

    def aggregate_round(self, method: Method, server: ServerState, replies: dict[int, Message], round_: int,
                        *, min_replies: int = 1) -> ServerState:
        r"""``method.aggregate(server, replies)``; with fewer than ``min_replies`` replies, the global state kept.

        The new state's ``cache["aggregation_error"]`` holds the round's exactness per module
        (:func:`~lowrank_fed.llm.methods.exactness.aggregation_errors`; None for a method without a global adapter).

        In the runner ``min_replies`` is 1 (a round with no reply left); the Flower strategy passes its own. A
        round that keeps the global state is counted and gives an :class:`UpdateDroppedWarning` saying why: every
        update was dropped, or too few were kept.
        """
        if replies and len(replies) >= min_replies:
            new = method.aggregate(server, replies)
            # how far the global adapter is from the exact weighted mean of what the clients trained
            new.cache["aggregation_error"] = aggregation_errors(method, server, replies, new)
            return new
        why = ("every update was dropped" if not replies else
               f"{len(replies)} update{'s' if len(replies) > 1 else ''} kept, fewer than min_replies = {min_replies}")
        msg = f"{method.title}, round {round_}: {why}; the global state is kept."
        _warn_dropped(msg)
        return ServerState(server.round + 1, server.pairs, server.extras, server.shapes, server.ranks,
                           server.arrays, server.info)

    # ------------------------------------------------------------------ outputs
    def _append(self, name: str, row: dict) -> None:
        with open(self.out / name, "a") as f:
            f.write(_json(row) + "\n")

    def _save_final(self, method: Method, server: ServerState) -> None:
        folder = self.out / "adapters"
        folder.mkdir(parents=True, exist_ok=True)
        tensors, meta = state_to_flat(server, {})
        save_tensors(folder / f"{method.name}.safetensors", tensors,
                     {"method": method.name, "round": server.round, "convention": "folded: B @ A = Delta W",
                      "state": meta["server"]})
        pairs = method.export_pairs(server)
        if pairs:  # the global adapter in PEFT format (FLoRA: its merges, compressed to their numerical rank)
            peft_dir = folder / f"{method.name}-peft"
            peft_dir.mkdir(exist_ok=True)
            config = self.ws.config_for({m: p.rank for m, p in pairs.items()})
            config.base_model_name_or_path = MODELS[self.cfg.model].hub or f"lowrank-fed:{self.cfg.model}"
            config_dict = config.to_dict()
            config_dict["target_modules"] = sorted(config_dict["target_modules"])
            atomic_write_text(peft_dir / "adapter_config.json", json.dumps(config_dict, indent=2, sort_keys=True))
            save_tensors(peft_dir / "adapter_model.safetensors", pairs_to_state_dict(pairs, config, server.extras))

    # ------------------------------------------------------------------ the run
    def _start(self, method: Method):
        server = method.init_server(self.init, self.init_extras, dict(enumerate(self.ranks)), init_seed=self.init_seed)
        if getattr(method, "needs_truth", False):  # the oracle is told who is contaminated
            server.info["contaminated"] = sorted(self.attackers)
        return server, {}

    def run_method(self, name: str, *, resume: bool, round0: dict | None) -> tuple[Method, list[dict], list[dict]]:
        r"""Run (or resume from its last good checkpoint) one method; returns it, its history and timings.

        On resume, a bad ``LATEST`` is rewritten to the round loaded; when no checkpoint round of the method
        verifies, a :class:`~.checkpoint.CheckpointCorruptWarning` names the corrupt files and the method starts
        again from round 0 (to the same final state: all randomness comes from the seed, the round and the
        client). Its history and timings then start afresh, so no row of the lost rounds stays in the logs.
        """
        cfg = self.cfg
        method = make_method(name, **cfg.method_options.get(name, {}))
        folder = self.out / "checkpoints" / name
        try:
            loaded = load_checkpoint(folder, device=self.device, repair=True) if resume else None
        except CheckpointError as err:  # every round is corrupt: redo the method from round 0
            warnings.warn(CheckpointCorruptWarning(f"{err}; restarting {method.title} from round 0"), stacklevel=2)
            loaded = None
        timings = [t for t in self._timings if t["method"] == name]
        if loaded is not None:
            server, clients = state_from_flat(loaded.tensors, loaded.state["state"], self.ws.shapes)
            history = loaded.state["history"]
            timings = [t for t in timings if t["round"] <= server.round]
        else:
            server, clients = self._start(method)
            if round0 is None or method.personalised:
                t0 = time.perf_counter()
                r0 = self.evaluate(method, server, clients, by_rank=method.personalised, rouge=True)
                timings = [{"method": name, "round": 0, "eval_seconds": time.perf_counter() - t0}]
            else:
                r0, timings = dict(round0), [{"method": name, "round": 0, "eval_seconds": 0.0}]
            history = [{"method": name, "round": 0, **r0, "bytes_up": 0, "bytes_down": 0, "dropped": 0}]
        from tqdm.auto import tqdm

        total = (cfg.rounds - server.round) * (cfg.clients_per_round or cfg.clients)
        with tqdm(total=total, desc=f"{method.title:<18}", disable=not self.progress, file=sys.stderr,
                  unit="client", dynamic_ncols=True) as bar:
            while server.round < cfg.rounds:
                round_ = server.round + 1
                t_start = time.perf_counter()
                server, clients, rows, times = self.run_round(method, server, clients, round_, bar)
                row = {"method": name, "round": round_}
                t0 = time.perf_counter()
                if self._evaluated(round_):
                    row.update(self.evaluate(method, server, clients, rouge=round_ == cfg.rounds))
                times["eval_seconds"] = time.perf_counter() - t0
                row.update(bytes_up=sum(r["bytes_up"] for r in rows), bytes_down=sum(r["bytes_down"] for r in rows),
                           params_up=sum(r["params_up"] or 0 for r in rows),
                           dropped=sum(r["dropped"] for r in rows),
                           train_loss=_mean(r["train_loss"] for r in rows),
                           prefix_share=_mean_shares(r["prefix_share"] for r in rows),
                           ranks=[server.ranks[k] for k in range(cfg.clients)], clients=rows)
                row.update(error_fields(server.cache.get("aggregation_error")))
                detection = server.info.get("detection")
                if detection is not None and detection.get("round") == round_:
                    row["detection"] = self.score_detection(detection, [r["client"] for r in rows if not r["dropped"]])
                    times["detection_seconds"] = server.cache.get("detection_seconds", 0.0)
                history.append(row)
                times.update(method=name, round=round_, wall_seconds=time.perf_counter() - t_start)
                timings.append(times)
                if self.metric in row:
                    bar.set_postfix({self.metric: f"{row[self.metric]:.3f}"})
                if cfg.checkpoint:
                    tensors, meta = state_to_flat(server, clients)
                    save_checkpoint(folder, server.round, tensors,
                                    {"state": meta, "history": history, "config": self._config_json()})
                self._histories[name], self._timings_by[name] = history, timings
                self._write_logs()
                if self.on_round_end is not None:
                    self.on_round_end(name, round_)
        self._save_final(method, server)
        return method, history, timings

    def _config_json(self) -> dict:
        """The run config as stored in every checkpoint (JSON values): ``config.json``'s keys but
        :data:`~lowrank_fed.llm.config.EXECUTION_KEYS`, which change how the run is computed, never what."""
        return self.cfg.definition()

    def check_resume(self) -> None:
        r"""Refuse to resume a run whose config differs from the one its checkpoints were written with.

        Every checkpoint stores the whole run config (``state.json``, key ``"config"``). Each method's
        newest verified ``state.json`` (:func:`~.checkpoint.peek_state`) is compared with this run's config,
        key by key. No key may differ: every one of them (ranks, rounds, seeds, data sizes, even ``threads``,
        ``device`` and ``dtype``, which can change the floating-point results) is part of what the checkpoints
        hold, and a resumed run must reach the bytes an uninterrupted run of one config reaches. Progress
        bars are a command-line flag, not a config key; ``workers`` (:data:`~lowrank_fed.llm.config.EXECUTION_KEYS`)
        is neither stored in checkpoints nor compared: any number of workers gives the same bytes. Checkpoints
        written before the config was stored in them, and methods with no verified ``state.json``, are not
        checked. A key a checkpoint does not hold (added to the config since it was written, such as
        ``lora_scaling``) counts as its default, the behaviour from before the key existed. Reads only; writes
        nothing.

        Raises
        ------
        ConfigError
            One line naming the checkpoint, each key that differs, its checkpointed and its present value.
        """
        folder = self.out / "checkpoints"
        if not folder.is_dir():
            return
        now = self._config_json()
        defaults = RunConfig().definition()
        for path in sorted(p for p in folder.iterdir() if p.is_dir()):
            found = peek_state(path)
            if found is None or not isinstance(found[1], dict) or not isinstance(found[1].get("config"), dict):
                continue
            where, stored = found[0], same_run_keys(found[1]["config"])
            stored = {**{k: v for k, v in defaults.items() if k not in stored}, **stored}
            if stored == now:
                continue
            missing = object()
            diffs = [f"{key} checkpointed {_shown(stored.get(key, missing))}, now {_shown(now.get(key, missing))}"
                     for key in sorted(set(stored) | set(now)) if stored.get(key, missing) != now.get(key, missing)]
            raise ConfigError(f"Cannot resume the run in '{self.out}': its config ('{self.out / 'config.json'}') "
                              f"differs from the one its checkpoints were written with ('{where / 'state.json'}'): "
                              f"{'; '.join(diffs)}. Put the checkpointed values back, or start a new run in "
                              f"another folder; nothing was changed.")

    def _write_logs(self) -> None:
        names = [m for m in self.cfg.methods if m in self._histories]
        atomic_write_text(self.out / "metrics.jsonl", "".join(_json(r) + "\n" for m in names for r in self._histories[m]))
        atomic_write_text(self.out / "timings.jsonl",
                          "".join(_json(t) + "\n" for m in names for t in self._timings_by.get(m, [])))

    def run(self, *, resume: bool = False) -> list[dict]:
        """Run (or resume) every method; write outputs; return the summary rows."""
        if resume:
            self.check_resume()  # a config edited since the checkpoints: ConfigError, nothing written
        self.setup()  # raises ConfigError before anything is written
        try:
            return self._run(resume=resume)
        finally:
            self.close()

    def _run(self, *, resume: bool) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._timings = []
        if resume and (self.out / "timings.jsonl").exists():
            self._timings = [json.loads(x) for x in (self.out / "timings.jsonl").read_text().splitlines() if x.strip()]
        atomic_write_text(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=1, sort_keys=True))
        atomic_write_text(self.out / "setup.json", json.dumps(self.describe(), indent=1, sort_keys=True))
        self._histories, self._timings_by = {}, {}
        summary, round0 = [], None
        for name in self.cfg.methods:
            method, history, timings = self.run_method(name, resume=resume, round0=round0)
            if round0 is None and not method.personalised:
                round0 = {k: v for k, v in history[0].items() if k not in ("method", "round")}
            self._histories[name], self._timings_by[name] = history, timings
            summary.append(summary_row(method, history, timings, self.metric, adapted_params=self.describe()["adapted_params"]))
        self._write_logs()
        self.ws.set_base(None)
        add_verdict(summary, self.describe()["eval_size"])
        atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=1, sort_keys=True))
        atomic_write_text(self.out / "summary.md", summary_markdown(summary, self.describe()))
        facts = self.describe()
        write_plots(self._histories, self.out, self.metric, title=self.plot_title(),
                    titles={r["method"]: r["title"] for r in summary}, majority=facts.get("majority_accuracy"),
                    personalised={r["method"] for r in summary if r["personalised"]})
        return summary

    def plot_title(self) -> str:
        cfg, d = self.cfg, self.describe()
        ranks = sorted(set(self.ranks))
        return (f"{cfg.model} / {cfg.dataset}: {cfg.clients} clients, ranks {ranks}, seed {cfg.seed}, "
                f"eval {d['eval_size']}")


def run_experiment(config: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                   on_round_end: Callable[[str, int], None] | None = None) -> list[dict]:
    """Set up and run a :class:`Simulation`; return its summary rows."""
    return Simulation(config, out_dir, progress=progress, on_round_end=on_round_end).run(resume=resume)
