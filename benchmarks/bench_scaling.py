r"""How far one client's local round moves ``Delta W = s B A`` at each rank, under each scale convention.

For a rank ``r`` and a convention (``lora_scaling``), the client starts from a folded rank-``r_max`` adapter
truncated to rank ``r``, the same for every convention: ``--start init`` (default), the run's shared initial
adapter (``B = 0``, ``A`` = the first ``r`` rows of the shared ``A``: ``Delta W = 0`` at every rank, FedIT's
round-1 download); ``--start trained``, the FedIT global after one round in which every client trained at rank
``r_max`` under ``alpha_over_r`` (``B != 0``, so both factors move from the first step). The client trains
``local_steps`` AdamW steps at ``lr`` on its own batches through :func:`~lowrank_fed.llm.client.run_client`
(FedIT's client: ``A``, ``B`` and the head), and we report

.. math:: \delta(r) = \Big(\sum_m \big\|B'_m A'_m - B_m A_m\big\|_F^2\Big)^{1/2},

where ``(B_m, A_m)`` and ``(B'_m, A'_m)`` are the folded pairs (``B = s B_peft``) of module ``m`` before and after
the round, summed over every adapted module, averaged over the first ``clients`` clients (each its own data
and batches; the same batches for every rank and convention). ``constant`` uses ``r_ref = max(ranks)``, the
largest client rank of the run, as ``lowrank-fed run`` does.

Reading: AdamW's step on ``lora_B`` is about ``lr`` per entry whatever ``s`` is, so the step on ``s B A`` is
proportional to ``s`` and grows with the number of slots that move: ``alpha_over_r`` makes low ranks move
faster, ``constant`` (one ``s``) makes high ranks move faster, ``rslora`` sits between.

Usage: ``python -m benchmarks.bench_scaling [--quick] [--model minilm|tiny-bert] [--start init|trained]
[--out FILE.json]`` (``--quick``: tiny-bert on synthetic data, seconds). The numbers in docs/methods.md
("Scale convention") are its MiniLM output.
"""

from __future__ import annotations

from . import _threads  # noqa: F401  (before numpy)

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

CONVENTIONS = ("alpha_over_r", "rslora", "constant")


def step_sizes(model: str = "minilm", ranks=(4, 16, 32), conventions=CONVENTIONS, *, clients: int = 3,
               local_steps: int = 5, lr: float = 5e-3, lora_alpha: float = 16.0, seed: int = 0,
               start: str = "init") -> dict:
    r"""``{convention: {rank: delta(r)}}`` (module docstring), plus the set-up it was measured in.

    One :class:`~lowrank_fed.llm.runner.simulation.Simulation` per convention, its clients at rank ``max(ranks)``
    (so the shared initial adapter has that rank and ``constant``'s ``r_ref`` is it); each client is then run
    at every rank of ``ranks`` from that adapter's prefix.
    """
    import torch

    from lowrank_fed.llm.client import run_client
    from lowrank_fed.llm.config import RunConfig
    from lowrank_fed.llm.methods import make_method
    from lowrank_fed.llm.peft_bridge import convention_scale

    tiny = model == "tiny-bert"
    settings = dict(name="scale-step", model=model, dataset="synthetic" if tiny else "bbc_news", methods=["fedit"],
                    clients=clients, ranks=[max(ranks)] * clients, rounds=1,
                    local_steps=local_steps, lr=lr, optimizer="adamw", lora_alpha=lora_alpha, seed=seed,
                    eval_size=8, val_size=0, checkpoint=False, train_size=0 if tiny else 600,
                    max_length=32 if tiny else 64, workers=1)
    if start not in ("init", "trained"):
        raise ValueError(f"The 'start' parameter must be 'init' or 'trained'. Got {start!r}.")
    out: dict = {"setup": {**settings, "ranks": list(ranks), "r_ref": max(ranks), "start": start,
                           "measure": "||B'A' - BA||_F"}}
    from lowrank_fed.llm.runner.simulation import Simulation

    method = make_method("fedit")
    begin = None  # (pairs, extras) of the start, shared by every convention
    with tempfile.TemporaryDirectory() as tmp:
        for conv in conventions:
            sim = Simulation(RunConfig.from_dict({**settings, "lora_scaling": conv}), tmp, progress=False)
            sim.setup()
            if begin is None and start == "init":
                begin = (sim.init, sim.init_extras)
            elif begin is None:  # one FedIT round at r_max under alpha_over_r
                first = Simulation(RunConfig.from_dict({**settings, "lora_scaling": "alpha_over_r"}), tmp,
                                   progress=False)
                first.setup()
                round1, _, _, _ = first.run_round(method, method.init_server(
                    first.init, first.init_extras, dict(enumerate(first.ranks)), init_seed=first.init_seed), {}, 1)
                begin = (round1.pairs, round1.extras)
            row, scales = {}, {}
            for r in ranks:
                server = method.init_server(begin[0], begin[1], {k: r for k in range(clients)},
                                            init_seed=sim.init_seed)
                deltas = []
                for k in range(clients):
                    start = method.download_pairs(server, r)
                    run_client(method, method.configure(server, k), None, sim.contexts[k])
                    trained, _ = sim.ws.extract()
                    sq = sum(float(torch.linalg.matrix_norm(trained[m].B.double() @ trained[m].A.double()
                                                            - start[m].B.double() @ start[m].A.double()) ** 2)
                             for m in start)
                    deltas.append(math.sqrt(sq))
                row[r] = sum(deltas) / len(deltas)
                scales[r] = convention_scale(conv, lora_alpha, r, max(ranks))
            out[conv] = {"delta": row, "s": scales}
    return out


def _table(result: dict) -> str:
    ranks = list(next(v for k, v in result.items() if k != "setup")["delta"])
    lines = ["| convention | " + " | ".join(f"rank {r}: s, step" for r in ranks) + " | largest / smallest step |",
             "|---|" + "---|" * (len(ranks) + 1)]
    for conv, v in result.items():
        if conv == "setup":
            continue
        cells = [f"{v['s'][r]:.3g}, {v['delta'][r]:.3f}" for r in ranks]
        spread = max(v["delta"].values()) / min(v["delta"].values())
        lines.append(f"| `{conv}` | " + " | ".join(cells) + f" | {spread:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-bert on synthetic data (seconds)")
    parser.add_argument("--model", default="minilm", choices=["minilm", "tiny-bert"])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--start", default="init", choices=["init", "trained"],
                        help="B = 0 (init) or the FedIT global after one round at r_max (trained)")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = step_sizes("tiny-bert" if args.quick else args.model, clients=args.clients, start=args.start)
    s = result["setup"]
    begin = "B = 0 and a shared A" if s["start"] == "init" else "the FedIT global after one round at r_max"
    print(f"{s['model']} on {s['dataset']}: {s['local_steps']} AdamW steps at lr {s['lr']}, lora_alpha "
          f"{s['lora_alpha']}, from {begin}; ||B'A' - BA||_F over every module, mean of {s['clients']} "
          f"clients; constant: r_ref = {s['r_ref']}")
    print(_table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
