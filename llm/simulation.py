r"""The embedded in-process runner: rounds, client sampling, local training, checkpoints, resume.

For each method of the config, round ``t = 1..T``:

1. sample clients (all, or ``clients_per_round`` drawn from ``seed, t``);
2. each sampled client ``k`` gets ``method.download(server, r_k)``, builds its local plan, trains
   on the shared model's adapter for its rank (batches and dropout seeded from ``seed, t, k``, so
   every method sees the same batches), and returns ``method.client_finish(...)``;
3. each update is checked (:meth:`Method.check_upload`); a NaN/Inf or misshapen update is dropped
   with an :class:`UpdateDroppedWarning`, counted, and never aggregated;
4. the server applies ``method.aggregate`` (a core rule) with data weights ``n_k``;
5. the global (or personalised) model is evaluated; one JSON line goes to ``metrics.jsonl``;
6. the round is checkpointed (safetensors + JSON state).

All randomness is derived from ``(seed, round, client)``, so a run resumed from a checkpoint
(:func:`run_experiment` with ``resume=True``) reaches the same final adapters as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lowrank_fed import FactorPair

from .config import RunConfig
from .data import assign_ranks, encode_classification, encode_generation, load_dataset, make_batch, partition
from .evaluate import evaluate_classification, evaluate_lm, greedy_generate, rouge_l
from .methods import METHODS, ClientState, Method, ServerState, make_method, message_bytes
from .models import load_model
from .peft_bridge import AdapterWorkspace, init_pairs, pairs_to_state_dict
from .training import client_batches, train_local

__all__ = ["Simulation", "run_experiment", "UpdateDroppedWarning", "load_final", "summary_markdown", "summary_table", "write_plots"]

log = logging.getLogger("lowrank_fed.llm")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


class UpdateDroppedWarning(UserWarning):
    """A client update was rejected (NaN/Inf, wrong shape or rank) and left out of the aggregation."""


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def _pairs_to_flat(prefix: str, pairs: dict[str, FactorPair]) -> dict[str, torch.Tensor]:
    out = {}
    for m, p in pairs.items():
        out[f"{prefix}/{m}/B"], out[f"{prefix}/{m}/A"] = p.B, p.A
    return out


def _flat_to_pairs(prefix: str, flat: dict[str, torch.Tensor]) -> dict[str, FactorPair]:
    mods = sorted({k[len(prefix) + 1 : -2] for k in flat if k.startswith(prefix + "/")})
    return {m: FactorPair(flat[f"{prefix}/{m}/B"], flat[f"{prefix}/{m}/A"]) for m in mods}


def _flat_sub(prefix: str, flat: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in flat.items() if k.startswith(prefix + "/")}


def server_to_tensors(server: ServerState) -> dict[str, torch.Tensor]:
    out = _pairs_to_flat("pairs", server.pairs)
    out.update(_pairs_to_flat("merge", server.merge))
    out.update({f"extras/{n}": v for n, v in server.extras.items()})
    out.update({f"base/{m}": v for m, v in server.base.items()})
    return out


def server_from_tensors(flat, round_: int, shapes, info) -> ServerState:
    pairs = _flat_to_pairs("pairs", flat)
    order = [m for m in shapes if m in pairs]
    return ServerState(
        round_, {m: pairs[m] for m in order}, _flat_sub("extras", flat), dict(shapes),
        _flat_sub("base", flat), _flat_to_pairs("merge", flat), dict(info),
    )


def load_final(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a method's final global state (``adapters/<method>.safetensors``)."""
    return load_file(str(path))


class Simulation:
    r"""One run of ``lowrank-fed run``: data, model and clients set up once, methods run in turn.

    Parameters
    ----------
    config : RunConfig
    out_dir : path
        Where ``metrics.jsonl``, checkpoints, adapters, the summary and plots go.
    progress : bool
        Show progress bars (tqdm, on stderr).
    on_round_end : callable(method_name, round), optional
        Called after each round's checkpoint (tests use it to interrupt a run).
    """

    def __init__(self, config: RunConfig, out_dir: str | Path, *, progress: bool = True,
                 on_round_end: Callable[[str, int], None] | None = None):
        config.validate()
        self.cfg = config
        self.out = Path(out_dir)
        self.progress = progress
        self.on_round_end = on_round_end
        self._ready = False

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        if self._ready:
            return
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        train, test = load_dataset(cfg.dataset, seed=cfg.seed)
        if cfg.train_size and cfg.train_size < len(train):
            train = train.subset(np.sort(np.random.default_rng([cfg.seed, 3]).permutation(len(train))[: cfg.train_size]))
        if cfg.eval_size < len(test):
            test = test.subset(np.sort(np.random.default_rng([cfg.seed, 4]).permutation(len(test))[: cfg.eval_size]))
        self.train, self.test = train, test
        self.task = train.task
        self.client_idx = partition(cfg.partition, train.labels, cfg.clients, np.random.default_rng([cfg.seed, 2]),
                                    alpha=cfg.alpha, classes_per_client=cfg.classes_per_client)
        self.n_k = [int(len(idx)) for idx in self.client_idx]
        self.ranks = assign_ranks(cfg.ranks if not isinstance(cfg.ranks, list) else list(cfg.ranks), cfg.clients,
                                  rng=np.random.default_rng([cfg.seed, 6]), rank_set=cfg.rank_set, scores=self.n_k)
        model, tokenizer, spec = load_model(cfg.model, num_labels=len(train.label_names), texts=train.texts,
                                            seed=cfg.seed, dtype=DTYPES[cfg.dtype])
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        model = model.to(self.device)
        self.tokenizer = tokenizer
        self.ws = AdapterWorkspace(
            model, target_modules=cfg.target_modules or spec.target_modules, lora_alpha=cfg.lora_alpha,
            use_rslora=cfg.use_rslora, task_type="SEQ_CLS" if self.task == "classification" else "CAUSAL_LM",
        )
        if self.task == "classification":
            self.enc_train = encode_classification(tokenizer, train.texts, train.labels, cfg.max_length)
            self.enc_test = encode_classification(tokenizer, test.texts, test.labels, cfg.max_length)
        else:
            self.enc_train = encode_generation(tokenizer, train.texts, train.targets, cfg.max_length)
            self.enc_test = encode_generation(tokenizer, test.texts, test.targets, cfg.max_length)
        self.r_max = max(self.ranks)
        self.init = init_pairs(self.ws.shapes, self.r_max, torch.Generator().manual_seed(_seed(cfg.seed, 5)),
                               device=self.device)
        self.init_extras = self.ws.extras_template()
        self.metric = "accuracy" if self.task == "classification" else "perplexity"
        self._personal_sets: list[np.ndarray] | None = None
        self._ready = True

    def personal_sets(self) -> list[np.ndarray]:
        r"""Per-client test subsets with the client's label mix (for personalised methods)."""
        if self._personal_sets is None:
            rng = np.random.default_rng([self.cfg.seed, 8])
            labels = self.test.labels
            size = max(len(labels) // self.cfg.clients, 16)
            sets = []
            for idx in self.client_idx:
                hist = np.bincount(self.train.labels[idx], minlength=len(self.train.label_names)).astype(float)
                hist[[c for c in range(hist.size) if not np.any(labels == c)]] = 0
                draws = rng.choice(hist.size, size=size, p=hist / hist.sum())
                sets.append(np.array([rng.choice(np.flatnonzero(labels == c)) for c in draws], dtype=np.int64))
            self._personal_sets = sets
        return self._personal_sets

    # ------------------------------------------------------------------ evaluation
    def _evaluate_loaded(self, rows=None) -> dict:
        enc = self.enc_test if rows is None else {k: v[torch.as_tensor(rows)] for k, v in self.enc_test.items()}
        if self.task == "classification":
            return evaluate_classification(self.ws.peft, enc)
        return evaluate_lm(self.ws.peft, enc)

    def evaluate(self, method: Method, server: ServerState, clients: list[ClientState], *, rouge: bool = False) -> dict:
        if method.personalised:
            per, total, weighted = [], 0, {}
            for k, client in enumerate(clients):
                pairs, extras, base = method.personal_model(server, client)
                self.ws.set_base(base)
                self.ws.load(pairs, extras)
                res = self._evaluate_loaded(self.personal_sets()[k])
                per.append(res)
                n = len(self.personal_sets()[k])
                total += n
                for key, v in res.items():
                    weighted[key] = weighted.get(key, 0.0) + v * n
            out = {key: v / total for key, v in weighted.items()}
            if self.task != "classification":
                out["perplexity"] = math.exp(min(out["loss"], 50.0))
            out["per_client"] = [r[self.metric] for r in per]
            return out
        pairs, extras, base = method.global_model(server)
        self.ws.set_base(base)
        self.ws.load(pairs, extras)
        out = self._evaluate_loaded()
        if rouge and self.task == "generation" and self.cfg.rouge_size:
            n = min(self.cfg.rouge_size, len(self.test))
            preds = greedy_generate(self.ws.peft, self.tokenizer, self.enc_test["prompt_ids"][:n],
                                    self.enc_test["prompt_mask"][:n], max_new_tokens=self.cfg.max_new_tokens)
            out["rouge_l"] = rouge_l(preds, list(self.test.targets[:n]))
            out["samples"] = [{"prediction": p, "reference": r} for p, r in zip(preds[:3], self.test.targets[:3], strict=False)]
        return out

    # ------------------------------------------------------------------ one round
    def _fault(self, method: str, round_: int, k: int) -> str | None:
        for f in self.cfg.faults:
            if f.get("round") == round_ and f.get("client") == k and f.get("method", method) == method:
                return f.get("kind", "nan")
        return None

    @staticmethod
    def _corrupt(upload: dict, kind: str) -> dict:
        key = sorted(upload)[0]
        bad = dict(upload)
        if kind == "shape":
            t = upload[key]
            bad[key] = t[..., :-1].clone() if t.shape[-1] > 1 else torch.cat([t, t], dim=-1)
        else:
            t = upload[key].clone()
            t.view(-1)[0] = float("nan") if kind == "nan" else float("inf")
            bad[key] = t
        return bad

    def run_round(self, method: Method, server: ServerState, clients: list[ClientState], round_: int, bar=None):
        cfg = self.cfg
        if cfg.clients_per_round:
            sampled = np.sort(np.random.default_rng([cfg.seed, 11, round_]).choice(cfg.clients, cfg.clients_per_round,
                                                                                  replace=False)).tolist()
        else:
            sampled = list(range(cfg.clients))
        self.ws.set_base(server.base)
        uploads, weights, rows = [], [], []
        server_s, train_s = 0.0, 0.0
        for k in sampled:
            client = clients[k]
            t0 = time.perf_counter()
            message = method.download(server, client.rank)
            gen = torch.Generator().manual_seed(_seed(cfg.seed, 19, round_, k))
            plan = method.client_start(message, client, shapes=self.ws.shapes, generator=gen, device=self.device)
            self.ws.load(plan.pairs, plan.extras)
            params = self.ws.parameters(A=plan.train_A, B=plan.train_B, extras=plan.train_extras)
            server_s += time.perf_counter() - t0
            steps = cfg.local_steps if not cfg.local_epochs else cfg.local_epochs * math.ceil(self.n_k[k] / cfg.batch_size)
            idx = self.client_idx[k]
            batches = [make_batch(self.enc_train, idx[b], self.device) for b in
                       client_batches(len(idx), steps, cfg.batch_size, np.random.default_rng([cfg.seed, 13, round_, k]))]
            reg = plan.regularizer
            torch.manual_seed(_seed(cfg.seed, 17, round_, k))  # dropout (all devices)
            stats = train_local(self.ws.peft, batches, params, lr=cfg.lr, optimizer=cfg.optimizer,
                                weight_decay=cfg.weight_decay,
                                regularizer=None if reg is None else (lambda reg=reg: reg(self.ws.live_pairs())))
            train_s += stats.seconds
            t0 = time.perf_counter()
            pairs, extras = self.ws.extract()
            upload, clients[k] = method.client_finish(plan, pairs, extras, client)
            kind = self._fault(method.name, round_, k)
            if kind:
                upload = self._corrupt(upload, kind)
            row = {"client": k, "rank": client.rank, "n": self.n_k[k], "train_loss": stats.loss,
                   "train_accuracy": stats.accuracy, "bytes_down": message_bytes(message),
                   "bytes_up": message_bytes(upload), "dropped": False}
            try:
                method.check_upload(server, upload, client.rank)
            except ValueError as err:
                row["dropped"], row["reason"] = True, str(err)
                msg = f"{method.title}, round {round_}, client {k}: update dropped ({err})"
                warnings.warn(msg, UpdateDroppedWarning, stacklevel=2)
                log.warning(msg)
            else:
                uploads.append(upload)
                weights.append(self.n_k[k])
            if clients[k].rank != client.rank:
                row["new_rank"] = clients[k].rank
            server_s += time.perf_counter() - t0
            rows.append(row)
            if bar is not None:
                bar.update(1)
        t0 = time.perf_counter()
        if uploads:
            server = method.aggregate(server, uploads, weights)
        else:
            warnings.warn(f"{method.title}, round {round_}: every update was dropped; the global state is kept.",
                          UpdateDroppedWarning, stacklevel=2)
            server = ServerState(server.round + 1, server.pairs, server.extras, server.shapes, server.base,
                                 server.merge, server.info)
        aggregate_s = time.perf_counter() - t0
        return server, clients, rows, {"server_seconds": server_s + aggregate_s, "aggregate_seconds": aggregate_s,
                                       "train_seconds": train_s}

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_dir(self, method: str) -> Path:
        return self.out / "checkpoints" / method

    def save_checkpoint(self, method: Method, server: ServerState, clients: list[ClientState], history: list[dict]):
        base = self._ckpt_dir(method.name)
        target = base / f"round-{server.round}"
        tmp = base / f".tmp-round-{server.round}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _save_tensors(tmp / "server.safetensors", server_to_tensors(server), {"round": server.round})
        client_tensors = {f"{k}/{key}": v for k, c in enumerate(clients) for key, v in c.arrays.items()}
        _save_tensors(tmp / "clients.safetensors", client_tensors, {"round": server.round})
        state = {"method": method.name, "round": server.round, "server_info": server.info,
                 "clients": [{"rank": c.rank, "info": c.info} for c in clients], "history": history}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        pointer = base / "LATEST"
        (base / "LATEST.tmp").write_text(target.name)
        os.replace(base / "LATEST.tmp", pointer)
        for old in base.glob("round-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, method: Method):
        base = self._ckpt_dir(method.name)
        pointer = base / "LATEST"
        if not pointer.exists():
            return None
        folder = base / pointer.read_text().strip()
        state = json.loads((folder / "state.json").read_text())
        flat = load_file(str(folder / "server.safetensors"), device=str(self.device))
        server = server_from_tensors(flat, state["round"], self.ws.shapes, state["server_info"])
        cflat = load_file(str(folder / "clients.safetensors"), device=str(self.device))
        clients = []
        for k, c in enumerate(state["clients"]):
            clients.append(ClientState(c["rank"], _flat_sub(str(k), cflat), c["info"]))
        return server, clients, state["history"]

    # ------------------------------------------------------------------ outputs
    def _write_metrics(self, histories: dict[str, list[dict]]) -> None:
        with open(self.out / "metrics.jsonl", "w") as f:
            for name in self.cfg.methods:
                for row in histories.get(name, []):
                    f.write(json.dumps(row) + "\n")

    def _append_metrics(self, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _save_final(self, method: Method, server: ServerState) -> None:
        folder = self.out / "adapters"
        folder.mkdir(parents=True, exist_ok=True)
        _save_tensors(folder / f"{method.name}.safetensors", server_to_tensors(server),
                      {"method": method.name, "round": server.round, "convention": "folded: B @ A = Delta W"})
        if server.pairs and not method.personalised:
            peft_dir = folder / f"{method.name}-peft"
            peft_dir.mkdir(exist_ok=True)
            config = self.ws.config_for({m: p.rank for m, p in server.pairs.items()})
            config.save_pretrained(str(peft_dir))
            _save_tensors(peft_dir / "adapter_model.safetensors", pairs_to_state_dict(server.pairs, config, server.extras))

    # ------------------------------------------------------------------ the run
    def run_method(self, name: str, *, resume: bool, round0: dict | None) -> tuple[list[dict], dict]:
        cfg = self.cfg
        method = make_method(name, **cfg.method_options.get(name, {}))
        loaded = self.load_checkpoint(method) if resume else None
        if loaded is not None:
            server, clients, history = loaded
        else:
            server = method.init_server(self.init, self.init_extras)
            clients = [method.init_client(r, self.init_extras, self.ws.shapes) for r in self.ranks]
            if round0 is None or method.personalised:
                t0 = time.perf_counter()
                r0 = self.evaluate(method, server, clients, rouge=True)
                r0["eval_seconds"] = time.perf_counter() - t0
            else:
                r0 = dict(round0)
            history = [{"method": name, "round": 0, **r0, "bytes_up": 0, "bytes_down": 0, "dropped": 0,
                        "wall_seconds": 0.0}]
            self._append_metrics(history[0])
        total = (cfg.rounds - server.round) * (cfg.clients_per_round or cfg.clients)
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=f"{method.title:<18}", disable=not self.progress, file=sys.stderr,
                  unit="client", dynamic_ncols=True) as bar:
            while server.round < cfg.rounds:
                round_ = server.round + 1
                t_start = time.perf_counter()
                server, clients, rows, times = self.run_round(method, server, clients, round_, bar)
                row = {"method": name, "round": round_}
                t0 = time.perf_counter()
                if round_ % cfg.eval_every == 0 or round_ == cfg.rounds:
                    row.update(self.evaluate(method, server, clients, rouge=round_ == cfg.rounds))
                row["eval_seconds"] = time.perf_counter() - t0
                row.update(times)
                row["bytes_up"] = sum(r["bytes_up"] for r in rows)
                row["bytes_down"] = sum(r["bytes_down"] for r in rows)
                row["dropped"] = sum(r["dropped"] for r in rows)
                row["train_loss"] = float(np.mean([r["train_loss"] for r in rows]))
                row["ranks"] = [c.rank for c in clients]
                row["clients"] = rows
                row["wall_seconds"] = time.perf_counter() - t_start
                history.append(row)
                if self.metric in row:
                    bar.set_postfix({self.metric: f"{row[self.metric]:.3f}"})
                if cfg.checkpoint:
                    self.save_checkpoint(method, server, clients, history)
                self._append_metrics(row)
                if self.on_round_end is not None:
                    self.on_round_end(name, round_)
        self._save_final(method, server)
        return history, self.summary_row(method, history)

    def summary_row(self, method: Method, history: list[dict]) -> dict:
        evals = [h for h in history if self.metric in h]
        best = max if self.metric == "accuracy" else min
        final = history[-1]
        row = {
            "method": method.name, "title": method.title, "metric": self.metric,
            "initial": history[0].get(self.metric), "final": final.get(self.metric),
            "best": best(h[self.metric] for h in evals) if evals else None,
            "mb_up": sum(h["bytes_up"] for h in history) / 1e6, "mb_down": sum(h["bytes_down"] for h in history) / 1e6,
            "dropped": sum(h["dropped"] for h in history),
            "seconds": sum(h["wall_seconds"] for h in history),
            "train_seconds": sum(h.get("train_seconds", 0.0) for h in history),
            "server_seconds": sum(h.get("server_seconds", 0.0) for h in history),
            "rounds": final["round"],
        }
        if "rouge_l" in final:
            row["rouge_l"] = final["rouge_l"]
            row["rouge_l_initial"] = history[0].get("rouge_l")
        return row

    def run(self, *, resume: bool = False) -> list[dict]:
        """Run (or resume) every method; write outputs; return the summary rows."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not resume:
            for stale in ("metrics.jsonl", "summary.json", "summary.md"):
                (self.out / stale).unlink(missing_ok=True)
            shutil.rmtree(self.out / "checkpoints", ignore_errors=True)
            shutil.rmtree(self.out / "adapters", ignore_errors=True)
        (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        self.setup()
        (self.out / "setup.json").write_text(json.dumps({"ranks": self.ranks, "n_k": self.n_k, "task": self.task,
                                                         "label_names": self.train.label_names,
                                                         "modules": list(self.ws.shapes)}, indent=1))
        histories: dict[str, list[dict]] = {}
        if resume:
            for name in self.cfg.methods:
                loaded = self.load_checkpoint(make_method(name, **self.cfg.method_options.get(name, {})))
                if loaded is not None:
                    histories[name] = loaded[2]
            self._write_metrics(histories)
        summary, round0 = [], None
        for name in self.cfg.methods:
            hist = histories.get(name)
            if hist and not hist[0].get("per_client"):
                round0 = {k: v for k, v in hist[0].items() if k not in ("method", "round")}
            history, row = self.run_method(name, resume=resume, round0=round0)
            if round0 is None and not METHODS[name].personalised:
                round0 = {k: v for k, v in history[0].items() if k not in ("method", "round")}
            histories[name] = history
            summary.append(row)
        self.ws.set_base(None)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        (self.out / "summary.md").write_text(summary_markdown(summary))
        write_plots(histories, self.out, self.metric)
        return summary


def run_experiment(config: RunConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True,
                   on_round_end: Callable[[str, int], None] | None = None) -> list[dict]:
    """Set up and run a :class:`Simulation`; return its summary rows."""
    return Simulation(config, out_dir, progress=progress, on_round_end=on_round_end).run(resume=resume)


# ----------------------------------------------------------------------------- reports


def _columns(summary: list[dict]):
    metric = summary[0]["metric"] if summary else "accuracy"
    short = {"accuracy": "acc", "perplexity": "ppl"}.get(metric, metric)
    cols = [("Method", lambda r: r["title"]),
            (f"final {short}", lambda r: "-" if r["final"] is None else f"{r['final']:.4f}"),
            (f"best {short}", lambda r: "-" if r["best"] is None else f"{r['best']:.4f}")]
    if any("rouge_l" in r for r in summary):
        cols.append(("ROUGE-L", lambda r: f"{r['rouge_l']:.4f}" if r.get("rouge_l") is not None else "-"))
    cols += [("MB up", lambda r: f"{r['mb_up']:.2f}"), ("MB down", lambda r: f"{r['mb_down']:.2f}"),
             ("dropped", lambda r: str(r["dropped"])), ("time s", lambda r: f"{r['seconds']:.1f}"),
             ("server %", lambda r: f"{100 * r['server_seconds'] / max(r['train_seconds'], 1e-12):.2f}")]
    return cols


def summary_markdown(summary: list[dict]) -> str:
    """The comparison table as GitHub markdown."""
    cols = _columns(summary)
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r) for _, f in cols) + " |" for r in summary]
    if summary and summary[0].get("initial") is not None:
        lines.append("")
        extra = f", ROUGE-L {summary[0]['rouge_l_initial']:.4f}" if summary[0].get("rouge_l_initial") is not None else ""
        lines.append(f"Untrained model: {summary[0]['metric']} {summary[0]['initial']:.4f}{extra}.")
    return "\n".join(lines) + "\n"


def summary_table(summary: list[dict], title: str = "lowrank-fed run"):
    """The comparison table as a ``rich`` table."""
    from rich.table import Table

    table = Table(title=title)
    for i, (c, _) in enumerate(_columns(summary)):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in summary:
        table.add_row(*(f(r) for _, f in _columns(summary)))
    return table


def write_plots(histories: dict[str, list[dict]], out_dir: str | Path, metric: str) -> list[Path]:
    """PNG plots: ``metric`` vs round, train loss vs round, ``metric`` vs cumulative MB moved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir = Path(out_dir)
    paths = []
    specs = [
        (f"{metric}.png", metric, lambda h: [r["round"] for r in h if metric in r], "round"),
        ("train_loss.png", "train_loss", lambda h: [r["round"] for r in h if "train_loss" in r], "round"),
        ("communication.png", metric, None, "cumulative MB (up + down)"),
    ]
    for fname, key, xs, xlabel in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, hist in histories.items():
            rows = [r for r in hist if key in r]
            if xs is None:
                total, x = 0.0, []
                for r in hist:
                    total += (r.get("bytes_up", 0) + r.get("bytes_down", 0)) / 1e6
                    if key in r:
                        x.append(total)
            else:
                x = xs(hist)
            title = METHODS[name].title if name in METHODS else name
            ax.plot(x, [r[key] for r in rows], marker="o", label=title)
        if xs is not None:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
