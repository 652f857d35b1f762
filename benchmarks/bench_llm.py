r"""Torch-layer benchmark: server overhead per round and local-training throughput (MiniLM, 1 thread).

1. **Server overhead.** Federated rounds of the demo set-up (MiniLM, BBC News, 10 clients with the
   demo's ranks, 5 local steps of batch 8 x 64 tokens). Server work per round = building the
   downloads (``configure``), checking the replies and the core aggregation (for CLAIR: the robust
   program on every module, the decision, the refit and the refined downloads); reported as a share
   of the round's local training time. The clients' conversion (folding the download into the PEFT
   adapter, the plan, reading the upload out) is reported beside it.
   Targets: <= 2%, CLAIR <= 10% (README, benchmarks).
2. **Throughput.** The whole client step, ``run_client`` (download folded into the workspace adapter,
   the method's plan, ``train_local``'s plain path, extraction of the upload), against
   a plain PEFT loop (``get_peft_model`` + AdamW + forward/backward/step) on the same batches, same
   rank and learning rate; runs alternate and the median of the repeats is kept. Target: >= 0.95x.
3. **Seed methods.** PreLort's nested "sample" training, HAFL's importance hook and LoRA-A2's probe,
   each against its baseline on the same client and batches (see ``_seed_methods``).
4. **Flower.** The same MiniLM config through Flower's Simulation Runtime and through the in-process runner:
   seconds per round (ratio) and Flower's fixed start-up cost (``_flower_vs_inprocess``; skipped without flwr).

Usage: ``python benchmarks/bench_llm.py [--quick] [--out FILE.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


#: The server's share of the local training time a round may take: 2%, and 10% for CLAIR (a robust
#: program per module every round).
SERVER_SHARE = {"clair": 0.10}


def _server_overhead(methods, rounds, clients, local_steps):
    from lowrank_fed.llm.config import RunConfig
    from lowrank_fed.llm.methods import make_method
    from lowrank_fed.llm.runner.simulation import Simulation

    cfg = RunConfig.from_dict(dict(name="bench", methods=list(methods), clients=clients, rounds=rounds,
                                   local_steps=local_steps, eval_size=8, checkpoint=False, workers=1))
    sim = Simulation(cfg, Path("bench-results") / "tmp", progress=False)
    sim.setup()
    rows = []
    for name in methods:
        method = make_method(name)
        server = method.init_server(sim.init, sim.init_extras, dict(enumerate(sim.ranks)), init_seed=sim.init_seed)
        states = {}
        train, srv, agg, conv = [], [], [], []
        for t in range(1, rounds + 1):
            server, states, _, times = sim.run_round(method, server, states, t)
            train.append(times["train_seconds"])
            srv.append(times["server_seconds"])
            agg.append(times["aggregate_seconds"])
            conv.append(times["client_overhead_seconds"])
        sim.ws.set_base(None)
        rows.append({"method": name, "rounds": rounds, "train_s_per_round": statistics.mean(train),
                     "server_s_per_round": statistics.mean(srv), "aggregate_s_per_round": statistics.mean(agg),
                     "client_overhead_s_per_round": statistics.mean(conv),
                     "share": sum(srv) / sum(train)})
    return rows, sim


def _throughput(sim, steps, repeats, rank=8):
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    from lowrank_fed.llm.data import make_batch
    from lowrank_fed.llm.methods import make_method
    from lowrank_fed.llm.models import load_minilm
    from lowrank_fed.llm.training import client_batches

    import dataclasses

    from lowrank_fed.llm.client import run_client
    from lowrank_fed.llm.streams import BATCHES

    cfg = sim.cfg
    k = int(np.argmax(sim.n_k))
    own = sim.contexts[k]  # client k's own rows
    idx = own.indices
    # run_client draws the batches of (seed, round 1, client k); the plain loop gets the very same ones
    batches = [make_batch(own.data, idx[b]) for b in
               client_batches(len(idx), steps, cfg.batch_size, BATCHES.rng(cfg.seed, 1, k))]
    context = dataclasses.replace(sim.contexts[k], settings=dataclasses.replace(sim.contexts[k].settings,
                                                                                 local_steps=steps, local_epochs=0))

    torch.manual_seed(0)
    base, _ = load_minilm(len(sim.train.label_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notice, raised inside PEFT
        plain = get_peft_model(base, LoraConfig(r=rank, lora_alpha=cfg.lora_alpha, target_modules=["query", "value"],
                                                task_type="SEQ_CLS"))

    def run_plain():
        params = [p for p in plain.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        plain.train()
        t0 = time.perf_counter()
        for batch in batches:
            out = plain(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    method = make_method("fedit")
    server = method.init_server(sim.init, sim.init_extras, {k: rank}, init_seed=sim.init_seed)

    def run_ours():
        t0 = time.perf_counter()
        run_client(method, method.configure(server, k), None, context)
        return time.perf_counter() - t0

    run_plain(), run_ours()  # warm-up
    plain_t, ours_t = [], []
    for _ in range(repeats):
        plain_t.append(run_plain())
        ours_t.append(run_ours())
    p, o = statistics.median(plain_t), statistics.median(ours_t)
    return {"steps": steps, "repeats": repeats, "plain_steps_per_s": steps / p, "ours_steps_per_s": steps / o,
            "ratio": p / o}


def _seed_methods(sim, epochs, repeats):
    r"""The seed methods' local compute against the plain path, same client, same batches, alternating order.

    One client (the smallest, so that whole epochs stay short) runs ``local_epochs = epochs`` through
    ``run_client`` for each entry; the median over ``repeats`` of the client's reported local compute
    (``train_seconds``: training plus any probe) is compared with its baseline:

    - PreLort (``nested = "sample"``, rank ``r_k`` with the federation's ladder) vs FedIT at the same rank;
    - HAFL freezing with the importance hook (``scorer = "client"``) vs the same without it
      (``scorer = "server"``: the same slot mask, no hook): the hook's own cost;
    - LoRA-A2 (budget 8 of ``r_G = 16``, B-round, one probe epoch) vs FedIT at rank 16 (the adapter a
      LoRA-A2 client holds), the same local steps.
    """
    import dataclasses

    import numpy as np

    from lowrank_fed.llm.client import run_client
    from lowrank_fed.llm.methods import make_method

    k = int(np.argmin(sim.n_k))
    ctx = sim.contexts[k]
    ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, local_steps=0, local_epochs=epochs))
    ranks = dict(enumerate(sim.ranks))
    r_k = ranks[k]
    entries = {
        "fedit": ("fedit", {}, ranks),
        "prelort": ("prelort", {"nested": "sample"}, ranks),
        "hafl_hook": ("hafl", {"variant": "freezing", "scorer": "client"}, ranks),
        "hafl_nohook": ("hafl", {"variant": "freezing", "scorer": "server"}, ranks),
        "fedit_r16": ("fedit", {}, {**ranks, k: 16}),
        "lora_a2": ("lora_a2", {"probe": "epoch"}, {**{c: min(r, 16) for c, r in ranks.items()}, k: 8}),
    }
    jobs = {}
    for key, (name, options, server_ranks) in entries.items():
        method = make_method(name, **options)
        server = method.init_server(sim.init, sim.init_extras, server_ranks, init_seed=sim.init_seed)
        jobs[key] = (method, method.configure(server, k))
    times = {key: [] for key in jobs}
    for key, (method, message) in jobs.items():  # warm-up
        run_client(method, message, None, ctx)
    for rep in range(repeats):
        for key in (list(jobs) if rep % 2 == 0 else list(jobs)[::-1]):
            method, message = jobs[key]
            reply, _, _ = run_client(method, message, None, ctx)
            times[key].append(reply.metrics["train_seconds"])
    med = {key: statistics.median(v) for key, v in times.items()}
    return {"client": k, "rank": r_k, "epochs": epochs, "repeats": repeats, "seconds": med,
            "prelort_vs_plain": med["fedit"] / med["prelort"],
            "hafl_hook_overhead": med["hafl_hook"] / med["hafl_nohook"] - 1,
            "lora_a2_vs_fedit": med["lora_a2"] / med["fedit_r16"]}


def _flower_vs_inprocess(rounds, clients=10, local_steps=5, method="fedit"):
    r"""Flower's Simulation Runtime against the in-process runner: wall seconds per round and the fixed cost.

    One MiniLM config (the demo's data and ranks, ``method``, ``rounds`` rounds, no checkpoints), run by
    :func:`run_experiment` and by :class:`~lowrank_fed.llm.flower.engine.FlowerSimulation` (Ray: ``clients``
    virtual SuperNodes, one CPU each). Per round: the mean ``wall_seconds`` of rounds ``2..rounds`` (round 1 also
    pays each Ray worker's model and data set-up). Fixed cost: Flower's whole run minus ``rounds`` steady rounds,
    less the same for the in-process run (Ray's start, the workers' set-up, the node discovery).
    """
    import shutil

    from lowrank_fed.llm.config import RunConfig
    from lowrank_fed.llm.flower.engine import FlowerSimulation
    from lowrank_fed.llm.runner.simulation import Simulation

    cfg = RunConfig.from_dict(dict(name="bench-flower", methods=[method], clients=clients, rounds=rounds,
                                   local_steps=local_steps, eval_size=8, val_size=0, checkpoint=False, workers=1,
                                   eval_every=rounds))
    out = {}
    for engine, cls in (("inprocess", Simulation), ("flower", FlowerSimulation)):
        folder = Path("bench-results") / "tmp" / f"flower-{engine}"
        shutil.rmtree(folder, ignore_errors=True)
        sim = cls(cfg, folder, progress=False)
        sim.setup()
        t0 = time.perf_counter()
        sim.run()
        total = time.perf_counter() - t0
        walls = [json.loads(x)["wall_seconds"] for x in (folder / "timings.jsonl").read_text().splitlines()
                 if json.loads(x)["round"] > 0]
        steady = statistics.mean(walls[1:]) if len(walls) > 1 else walls[0]
        out[engine] = {"total_s": total, "round_s": walls, "steady_round_s": steady,
                       "outside_rounds_s": total - rounds * steady}
    out["ratio"] = out["flower"]["steady_round_s"] / out["inprocess"]["steady_round_s"]
    out["startup_s"] = out["flower"]["outside_rounds_s"] - out["inprocess"]["outside_rounds_s"]
    out.update(method=method, clients=clients, rounds=rounds, local_steps=local_steps)
    return out


def main(argv=None) -> int:
    """Run the benchmark and print its table; returns 0."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer methods, rounds and repeats (about 1 minute)")
    parser.add_argument("--out", default="bench-results/llm.json", help="where to write the JSON results")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from rich.console import Console
    from rich.table import Table

    if args.quick:
        methods, rounds, steps, repeats = ["fedit", "flexlora", "clair"], 1, 12, 2
    else:
        methods, rounds, steps, repeats = ["fedit", "hetlora", "flora", "flexlora", "clair"], 2, 25, 3
    start = time.perf_counter()
    overhead, sim = _server_overhead(methods, rounds, clients=10, local_steps=5)
    thr = _throughput(sim, steps, repeats)
    seed = _seed_methods(sim, epochs=1 if args.quick else 5, repeats=1 if args.quick else 3)

    console = Console(width=110)
    ranks = sorted(set(sim.ranks), reverse=True)
    table = Table(title=f"Server overhead per round (MiniLM, 10 clients, ranks {ranks}, 5 steps x batch 8 x 64 tokens)")
    for col in ("method", "train s/round", "server s/round", "of which aggregation s", "server share", "target",
                "client conversion s/round"):
        table.add_column(col, justify="right")
    for r in overhead:
        target = SERVER_SHARE.get(r["method"], 0.02)
        table.add_row(r["method"], f"{r['train_s_per_round']:.2f}", f"{r['server_s_per_round']:.4f}",
                      f"{r['aggregate_s_per_round']:.4f}", f"{100 * r['share']:.2f}%",
                      f"<= {100 * target:.0f}% " + ("pass" if r["share"] <= target else "FAIL"),
                      f"{r['client_overhead_s_per_round']:.4f}")
    console.print(table)
    t2 = Table(title=f"Local training throughput, rank 8, {thr['steps']} steps, median of {thr['repeats']}")
    for col in ("plain PEFT loop steps/s", "lowrank-fed trainer steps/s", "ratio", ">= 0.95x"):
        t2.add_column(col, justify="right")
    t2.add_row(f"{thr['plain_steps_per_s']:.3f}", f"{thr['ours_steps_per_s']:.3f}", f"{thr['ratio']:.3f}",
               "pass" if thr["ratio"] >= 0.95 else "FAIL")
    console.print(t2)
    t3 = Table(title=f"Seed methods' local compute, client {seed['client']} (rank {seed['rank']}), {seed['epochs']} "
                     f"local epochs, median of {seed['repeats']}")
    for col in ("comparison", "seconds", "baseline seconds", "ratio", "target"):
        t3.add_column(col, justify="right")
    sec = seed["seconds"]
    t3.add_row("PreLort sample vs FedIT (plain path), same rank", f"{sec['prelort']:.2f}", f"{sec['fedit']:.2f}",
               f"{seed['prelort_vs_plain']:.3f}x", ">= 0.95x " + ("pass" if seed["prelort_vs_plain"] >= 0.95 else "FAIL"))
    t3.add_row("HAFL freezing: importance hook on vs off", f"{sec['hafl_hook']:.2f}", f"{sec['hafl_nohook']:.2f}",
               f"{100 * seed['hafl_hook_overhead']:+.1f}%",
               "<= 5% " + ("pass" if seed["hafl_hook_overhead"] <= 0.05 else "FAIL"))
    t3.add_row("LoRA-A2 (probe + masked round) vs FedIT rank 16", f"{sec['lora_a2']:.2f}", f"{sec['fedit_r16']:.2f}",
               f"{seed['lora_a2_vs_fedit']:.3f}x", "<= 1.25x " + ("pass" if seed["lora_a2_vs_fedit"] <= 1.25 else "FAIL"))
    console.print(t3)
    flower = None
    try:
        import flwr  # noqa: F401
    except ModuleNotFoundError:
        console.print("Flower row skipped: flwr is not installed (pip install 'lowrank-fed[flower]')")
    else:
        flower = _flower_vs_inprocess(rounds=2 if args.quick else 3)
        t4 = Table(title=f"Flower simulation vs in-process runner, MiniLM, {flower['clients']} clients, "
                         f"{flower['method']}, {flower['local_steps']} local steps, {flower['rounds']} rounds")
        for col in ("engine", "s/round (rounds 2..)", "whole run s", "ratio", "Flower fixed start-up s"):
            t4.add_column(col, justify="right")
        for engine in ("inprocess", "flower"):
            r = flower[engine]
            t4.add_row(engine, f"{r['steady_round_s']:.2f}", f"{r['total_s']:.1f}",
                       f"{flower['ratio']:.2f}x" if engine == "flower" else "1.00x",
                       f"{flower['startup_s']:.1f}" if engine == "flower" else "")
        console.print(t4)
    console.print(f"benchmark wall time {time.perf_counter() - start:.0f} s, torch threads {torch.get_num_threads()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"server_overhead": overhead, "throughput": thr, "seed_methods": seed,
                               "flower": flower}, indent=1))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
