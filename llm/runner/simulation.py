r"""The runner: set-up, the round loop over a transport, evaluation, checkpoints, resume, reports.

For each method of the config, round ``t = 1..T``:

1-4. :func:`~.rounds.run_round`: sample clients (all, or ``clients_per_round`` drawn from ``(seed, t)``), each
   one's download ``method.configure(server, k)``, the transport (:mod:`.transports`: one after another, or on
   the worker pool; Flower's, :mod:`~lowrank_fed.llm.flower.engine`) runs
   :func:`~lowrank_fed.llm.client.run_client` on each; each reply is checked (:meth:`Method.check_reply`): a
   NaN/Inf or misshapen reply, or a client that raised, is dropped with an :class:`UpdateDroppedWarning`,
   counted, and never aggregated (a client that raised keeps its previous state); then
   ``server = method.aggregate(server, replies)`` (a core rule, data weights from the replies);
5. evaluation on one forward pass per distinct model: the global model on the test and validation sets,
   the model each distinct rank downloads, and each client's model (the one it downloads, or its
   personalised one) on its own held-out set; one JSON line goes to ``metrics.jsonl``, timings to
   ``timings.jsonl`` (the row: :func:`~.rounds.round_row`);
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
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..client import ClientContext
from ..config import RunConfig
from ..federation import (build_client, build_federation, build_model, encode_examples, sample_clients,
                          is_user_data, truncation_counts)
from ..federation import config_key as _config_key
from ..fedeval import federated, site_blocks, site_facts
from ..sites import site_federation
from ..methods import ClientState, Method, ServerState, make_method
from ..peft_bridge import init_pairs
from ..protocol import Message
from ..streams import ADAPTER_INIT
from . import rounds
from .artifacts import check_resume, save_final
from .checkpoint import CheckpointCorruptWarning, CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from .evaluation import Scoring, detection_auc, score_encoded
from .limits import check_limits
from .report import add_verdict, summary_markdown, summary_row, write_plots
from .rounds import UpdateDroppedWarning
from .start import describe_start, start_adapter
from .state import load_final, state_from_flat, state_to_flat
from .transports import Pooled, Sequential

__all__ = ["Simulation", "run_experiment", "UpdateDroppedWarning", "load_final", "score_encoded", "detection_auc",
           "state_to_flat", "state_from_flat"]

log = logging.getLogger("lowrank_fed.llm")


def _json(obj) -> str:
    return json.dumps(obj, sort_keys=True)


class Simulation(Scoring):
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
    transport : Transport, optional
        What carries each round's downloads to the clients (:class:`~.rounds.Transport`). None: in this process,
        one after another (:class:`~.transports.Sequential`), or on the worker pool (:class:`~.transports.Pooled`)
        when ``workers`` > 1 and the round has several clients. A run with its own transport (Flower) uses no
        workers, and builds no client's context unless the transport asks for :attr:`contexts`.
    """

    def __init__(self, config: RunConfig, out_dir: str | Path, *, progress: bool = True,
                 on_round_end: Callable[[str, int], None] | None = None, transport=None):
        self.cfg = config
        self.out = Path(out_dir)
        self.progress = progress
        self.on_round_end = on_round_end
        self.transport = transport
        self._ready = False
        self._pool = None

    @property
    def parallel(self) -> bool:
        """Whether ``workers`` applies: the clients and scores may go to worker processes (:mod:`.pool`); a run
        with its own transport (its clients live elsewhere) has one worker."""
        return self.transport is None

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
        # ConfigError: val_size, clients, attacks, ranks; [[clients]] on Flower: the server opens no site's file
        fed = site_federation(cfg, open_sites=self.transport is None) if cfg.sites else build_federation(cfg)
        self.federation = fed
        self.task = fed.task
        labelled = self.task == "classification"
        self.val, self.test = fed.source.examples(fed.val_rows), fed.source.test
        self.client_idx, self.n_k, self.attackers, self.ranks = fed.client_idx, fed.n_k, fed.attackers, fed.ranks
        for name in cfg.methods:
            with _config_key("ranks", self.ranks):
                make_method(name, **cfg.method_options.get(name, {})).check_ranks(self.ranks)
        self.holdout, self.val_holdout = fed.holdout, fed.val_holdout
        # federated evaluation (fedeval): the sites score the models on their own rows; sizes None until known
        self.federated, self.site_sizes = federated(cfg), getattr(fed.source, "site_sizes", None)
        self._site_evaluators, self.label_counts = None, None
        if self.federated and self.site_sizes is not None and labelled:
            self.label_counts = np.bincount(self.test.labels, minlength=len(fed.source.label_names)).tolist()
        with _config_key("target_modules", cfg.target_modules):
            self.model = build_model(cfg, fed.shared, len(fed.source.label_names), max(self.ranks))
        self.device, self.tokenizer, self.ws = self.model.device, self.model.tokenizer, self.model.workspace
        held = {f"{name}.global_rank": make_method(name, **cfg.method_options.get(name, {})).options
                for name in cfg.methods}  # ranks that every client holds (LoRA-A2's r_G)
        workers = cfg.worker_count(self.device.type) if self.parallel else 1
        self.workers = check_limits(
            cfg, ranks=self.ranks, shapes=self.ws.shapes, model_config=self.model.model_config, task=self.task,
            n_k=[n for n in self.n_k if n is not None], device=self.device, workers=workers, chosen=cfg.workers_chosen(),
            model_bytes=self.model.model_params * torch.finfo(getattr(torch, cfg.dtype)).bits // 8,
            global_ranks={k: o.global_rank for k, o in held.items() if hasattr(o, "global_rank")})
        # validation and test are the server's, clean (an empty split, val_size = 0, is never scored, so it is not
        # encoded: tokenizers reject empty lists); each client encodes its own training rows (build_client)
        self.enc = {name: encode_examples(self.tokenizer, d, cfg.max_length)
                    for name, d in (("val", self.val), ("test", self.test)) if len(d) and not self.federated}
        self.r_max = max(self.ranks)
        self.init_seed = ADAPTER_INIT.seed(cfg.seed)
        self.init = init_pairs(self.ws.shapes, self.r_max, torch.Generator().manual_seed(self.init_seed),
                               device=self.device)
        self.init_extras = self.ws.extras_template()
        self.start, self.start_errors = None, {}
        if cfg.init_adapter is not None:  # ConfigError naming init_adapter: module, shape, head (start.py)
            self.start, self.start_errors = start_adapter(self, cfg.init_adapter)
        self.metric = "accuracy" if labelled else "perplexity"
        self._contexts = None
        self._train = None
        splits = {"val": self.val, "test": self.test} if cfg.sites else {"train": self.train, "val": self.val,
                                                                          "test": self.test}  # sites: their own
        self.truncated = (truncation_counts(self.tokenizer, splits, cfg.max_length)
                          if self.task == "generation" and len(self.test) and is_user_data(self.test) else None)
        self._ready = True

    def learn_sites(self, answers: dict) -> None:
        r"""Federated evaluation on Flower: ``site_sizes``, ``holdout`` and ``val_holdout`` (each site's blocks of
        the pooled test and validation sets), ``truncated`` and ``label_counts`` from the sites' answers to an
        evaluate request without jobs (:func:`~lowrank_fed.llm.fedeval.site_facts`; ``ValueError``: an answer
        without its sizes)."""
        self.site_sizes, truncated, self.label_counts = site_facts(answers, self.cfg.clients)
        self.holdout = self.federation.holdout = site_blocks([t for _, t in self.site_sizes])
        self.val_holdout = self.federation.val_holdout = site_blocks([v for v, _ in self.site_sizes])
        self.truncated = truncated if truncated is not None else self.truncated

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
                "label_names": list(self.federation.source.label_names), "eval_size": self._n("test"),
                "val_size": self._n("val"),
                "holdout_sizes": [int(len(h)) for h in self.holdout], "metric": self.metric,
                "adapted_params": int(sum(d_out * d_in for d_out, d_in in self.ws.shapes.values())),
                "model_params": self.model.model_params}
        if getattr(self, "start", None) is not None:
            info["init_adapter"] = describe_start(self.start, self.start_errors)
        if self.truncated is not None:  # a user's instructions cut to max_length (llm/data/instructions.py)
            info["truncated_examples"] = self.truncated
        if self.attackers:
            info["attackers"] = {str(k): a.kind for k, a in self.attackers.items()}
        if self.task == "classification":
            counts = (np.asarray(self.label_counts) if self.federated else
                      np.bincount(self.test.labels, minlength=len(self.federation.source.label_names)))
            info["majority_accuracy"] = float(counts.max() / counts.sum())
        return info

    # ------------------------------------------------------------------ one round
    def sampled(self, round_: int) -> list[int]:
        """The clients of round ``round_`` (:func:`~lowrank_fed.llm.federation.sample_clients`)."""
        return sample_clients(self.cfg, round_)

    def transport_for(self, round_: int):
        """The transport of round ``round_``: the run's own, else the worker pool when there are several workers and
        several clients in the round, else one client after another."""
        if self.transport is not None:
            return self.transport
        if self.workers > 1 and len(self.sampled(round_)) > 1:
            return Pooled(lambda: self.pool)
        return Sequential(lambda: self.contexts)

    def run_round(self, method: Method, server: ServerState, clients: dict[int, ClientState], round_: int, bar=None):
        """One round (:func:`~.rounds.run_round` over :meth:`transport_for`). Returns ``(server, clients, rows,
        times)``; the same results on every transport."""
        return rounds.run_round(method, server, clients, round_, self.transport_for(round_), cfg=self.cfg,
                                attackers=self.attackers, ranks=self.ranks, score_upload=self.score_upload,
                                tick=None if bar is None else bar.update)

    def accept_reply(self, method: Method, server: ServerState, round_: int, k: int, reply: Message | None,
                     error: str | None, row: dict) -> tuple[Message | None, float]:
        """:func:`~.rounds.accept_reply` with this run's config, attackers, ranks and upload scoring."""
        return rounds.accept_reply(method, server, round_, k, reply, error, row, cfg=self.cfg,
                                   attackers=self.attackers, ranks=self.ranks, score_upload=self.score_upload)

    aggregate_round = staticmethod(rounds.aggregate_round)

    # ------------------------------------------------------------------ the run
    def _start(self, method: Method):
        server = method.init_server(self.init, self.init_extras, dict(enumerate(self.ranks)), init_seed=self.init_seed)
        if getattr(self, "start", None) is not None:  # init_adapter: the adapter's Delta W_0 (Method.start_from)
            server = method.start_from(server, self.start)
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
                t0 = time.perf_counter()
                scores = (self.evaluate(method, server, clients, rouge=round_ == cfg.rounds)
                          if self._evaluated(round_) else None)
                times["eval_seconds"] = time.perf_counter() - t0
                row = rounds.round_row(name, round_, server, rows, clients=cfg.clients, scores=scores)
                detection = server.info.get("detection")
                if detection is not None and detection.get("round") == round_:
                    row["detection"] = self.score_detection(detection, [r["client"] for r in rows if not r["dropped"]],
                                                            round_)
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
    def _save_final(self, method: Method, server: ServerState) -> None:
        """The method's final state and PEFT export in ``adapters/`` (:func:`~.artifacts.save_final`)."""
        save_final(self.out, method, server, self.ws, self.cfg.model)

    def check_resume(self) -> None:
        """Refuse to resume a run whose config differs from its checkpoints' (:func:`~.artifacts.check_resume`;
        ``ConfigError``, nothing written)."""
        check_resume(self.out, self._config_json())

    def _write_logs(self) -> None:
        names = [m for m in self.cfg.methods if m in self._histories]
        atomic_write_text(self.out / "metrics.jsonl", "".join(_json(r) + "\n" for m in names for r in self._histories[m]))
        atomic_write_text(self.out / "timings.jsonl",
                          "".join(_json(t) + "\n" for m in names for t in self._timings_by.get(m, [])))

    def run(self, *, resume: bool = False, round0: dict | None = None) -> list[dict]:
        """Run (or resume) every method; write outputs; return the summary rows.

        ``round0``: the round-0 scores of the same config and seed from an earlier run (its ``metrics.jsonl`` row of
        round 0, any method that is not personalised), used instead of scoring the untrained start again. Every
        such method starts from the same model (``B = 0``: the base model and the seed's head), scored before any
        step, so the row does not depend on the method or on a training-only key such as ``lr``; this run already
        reuses its first method's row for the others (tests/llm/test_tune.py checks both).
        """
        if resume:
            self.check_resume()  # a config edited since the checkpoints: ConfigError, nothing written
        self.setup()  # raises ConfigError before anything is written
        try:
            return self._run(resume=resume, round0=round0)
        finally:
            self.close()

    def _run(self, *, resume: bool, round0: dict | None = None) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        self._timings = []
        if resume and (self.out / "timings.jsonl").exists():
            self._timings = [json.loads(x) for x in (self.out / "timings.jsonl").read_text().splitlines() if x.strip()]
        atomic_write_text(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=1, sort_keys=True))
        atomic_write_text(self.out / "setup.json", json.dumps(self.describe(), indent=1, sort_keys=True))
        self._histories, self._timings_by = {}, {}
        summary = []
        round0 = None if round0 is None else {k: v for k, v in round0.items() if k not in ("method", "round")}
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
                   on_round_end: Callable[[str, int], None] | None = None, round0: dict | None = None) -> list[dict]:
    """Set up and run a :class:`Simulation`; return its summary rows (``round0``: :meth:`Simulation.run`)."""
    return Simulation(config, out_dir, progress=progress, on_round_end=on_round_end).run(resume=resume, round0=round0)
