r"""PreLort's prefix-nested training on a toy regression: how much of the update the low slots carry, per step count.

The toy: one LoRA layer (PEFT, through the project's :class:`~lowrank_fed.llm.peft_bridge.AdapterWorkspace`)
on a linear model ``y = (W_0 + W^*) x + \varepsilon``, ``x ~ N(0, I_d)``, ``\varepsilon ~ N(0, 0.1^2 I)``,
``d = 64``, with a target of rank 16 and decaying spectrum, ``W^* = U \operatorname{diag}(\sigma) V^T``,
``\sigma_i = 2 \cdot 0.8^i`` (``i = 0..15``, Haar ``U``, ``V``). A client of rank 16 in a federation with
ranks ``{4, 8, 16}`` (``T = {4, 8, 16}``) trains its adapter from ``B = 0`` (``A`` from the project's
``init_pairs``) on fresh batches of 32 with AdamW (``lr = 5e-3``, no weight decay; ``lora_alpha = 16``), mean
squared error, with the project's own loop and hooks:

- ``off``: plain training (:func:`~lowrank_fed.llm.training.train_local`, no hook);
- ``sample``: :class:`~lowrank_fed.llm.training.SampledTruncation`, one ``tau ~ Uniform(T)`` per batch, the
  step leaving the slots ``i >= tau`` untouched (the project's rule);
- ``sample-nohold``: the same draws, the optimiser's own step (momentum still moves the held slots: the
  rule before the hold);
- ``all``: :class:`~lowrank_fed.llm.training.AllTruncations`, the mean of the ``|T|`` truncated losses.

After 20, 50, 100 and 300 steps (one run per mode and seed, read at those steps; no learning-rate schedule,
so the state at step ``n`` is that of an ``n``-step round) it reports

- ``share4`` / ``share8``: the share of the update in slots ``0..3`` / ``0..7``,
  ``||Delta W_{:t}||_F^2 / ||Delta W||_F^2`` (:func:`lowrank_fed.linalg.prefix_update_energy`, the quantity
  ``metrics.jsonl`` reports per client as ``prefix_share``);
- ``err4`` / ``err16``: the relative error of the rank-4 prefix and of the whole adapter,
  ``||W^* - B_{:, :t} A_{:t, :}||_F^2 / ||W^*||_F^2`` (the expected excess squared error on a fresh ``x``,
  relative); ``err4`` of the best rank-4 matrix (Eckart-Young) is printed as ``opt4``;
- ``ms/step``: local training time per step (1 thread).

Means over seeds 0, 1, 2 (of the toy: it reads no real data). Usage: ``python benchmarks/bench_prelort.py [--quick]
[--out FILE.json]`` or ``python -m benchmarks --only prelort``; a few seconds of CPU (``--quick``: one seed).

``--real CONFIG.toml`` trains one client of a real run config instead and scores its truncated models on the
config's **validation** split (``--val-size``, default 200, held out of the training data), with ``--seed``
(default 100): a seed a reproduction reports (0..99) is refused, and the test split is never scored.
"""

from __future__ import annotations

from . import _threads  # noqa: F401  (before numpy)

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

D, RANK, LADDER, BATCH, LR, NOISE = 64, 16, (4, 8, 16), 32, 5e-3, 0.1
CHECKPOINTS = (20, 50, 100, 300)
MODES = ("off", "sample", "sample-nohold", "all")


def _toy(seed: int):
    """The target ``W^*`` (rank 16, ``sigma_i = 2 * 0.8^i``), the base ``W_0`` and the workspace on it."""
    import torch

    from lowrank_fed.llm.peft_bridge import AdapterWorkspace

    rng = np.random.default_rng([seed, 1])
    U = np.linalg.qr(rng.normal(size=(D, RANK)))[0]
    V = np.linalg.qr(rng.normal(size=(D, RANK)))[0]
    sigma = 2.0 * 0.8 ** np.arange(RANK)
    target = torch.tensor((U * sigma) @ V.T, dtype=torch.float32)

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, D, bias=False)
            with torch.no_grad():
                self.proj.weight.copy_(torch.tensor(rng.normal(size=(D, D)) / np.sqrt(D), dtype=torch.float32))

        def forward(self, x, labels):
            out = self.proj(x)
            return SimpleNamespace(loss=torch.nn.functional.mse_loss(out, labels), logits=out)

    model = Linear()
    W0 = model.proj.weight.detach().clone()
    ws = AdapterWorkspace(model, target_modules=["proj"], lora_alpha=16.0)
    return target, W0, ws


def _batches(seed: int, W: "torch.Tensor", steps: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(BATCH, D, generator=gen)
        out.append({"x": x, "labels": x @ W.T + NOISE * torch.randn(BATCH, D, generator=gen)})
    return out


def run_mode(mode: str, seed: int, checkpoints=CHECKPOINTS) -> dict[int, dict]:
    """One rank-16 client trained ``max(checkpoints)`` steps under ``mode``; the measures at each checkpoint."""
    import torch

    from lowrank_fed.linalg import prefix_update_energy
    from lowrank_fed.llm.peft_bridge import init_pairs
    from lowrank_fed.llm.training import AllTruncations, Hook, SampledTruncation, prefix_shares, train_local

    target, W0, ws = _toy(seed)
    start = init_pairs(ws.shapes, RANK, torch.Generator().manual_seed(seed))
    ws.load(start)
    groups = ws.param_groups({"A": LR, "B": LR})
    batches = _batches(seed + 100, W0 + target, max(checkpoints))
    hooks = []
    if mode in ("sample", "sample-nohold"):
        hooks = [SampledTruncation(ws, LADDER, torch.Generator().manual_seed(seed + 200), hold=mode == "sample")]
    elif mode == "all":
        hooks = [AllTruncations(ws, LADDER)]
    W = target.double()
    results: dict[int, dict] = {}

    class Measure(Hook):  # reads the adapter after the checkpoint steps (its time is not counted)
        def __init__(self):
            self.t0, self.excluded = time.perf_counter(), 0.0

        def after_step(self, step):
            n = step + 1
            if n not in checkpoints:
                return
            t = time.perf_counter()
            pair = ws.extract()[0]["proj"]
            e = prefix_update_energy(start["proj"], pair)
            B, A = pair.B.double(), pair.A.double()

            def err(k):
                return float(torch.linalg.matrix_norm(W - B[:, :k] @ A[:k]) ** 2 / torch.linalg.matrix_norm(W) ** 2)

            shares = prefix_shares(list(e), LADDER)
            results[n] = {"share4": shares["4"], "share8": shares["8"], "err4": err(4), "err16": err(16),
                          "ms_per_step": 1e3 * (t - self.t0 - self.excluded) / n}
            self.excluded += time.perf_counter() - t

    train_local(ws.peft, batches, groups, hooks=[*hooks, Measure()])
    return results


#: The seed of ``--real``: the first tuning seed; a seed a reproduction reports (0..MAX_SEEDS-1) is refused.
REAL_SEED = 100
#: Validation examples ``--real`` scores (held out of the training data; never the test split).
REAL_VAL_SIZE = 200


def check_real_seed(seed: int) -> int:
    """``seed`` if it is no seed a reproduction reports (``seed >= MAX_SEEDS``); else ``ValueError``, naming it."""
    from lowrank_fed.llm.reproduce.run import MAX_SEEDS

    if seed < MAX_SEEDS:
        raise ValueError(f"--seed {seed}: a reproduction reports seeds 0..{MAX_SEEDS - 1}, so a choice made with "
                         f"this benchmark must not read them; use a seed >= {MAX_SEEDS} (default {REAL_SEED}).")
    return seed


def run_real(config: Path, modes=("off", "sample", "all"), checkpoints=(5, 20, 50, 100), client: int = 0,
             seed: int = REAL_SEED, val_size: int = REAL_VAL_SIZE) -> dict:
    r"""One client of a real config, round 1, trained ``max(checkpoints)`` local steps under each ``nested`` mode.

    The config runs with ``seed`` (at least ``MAX_SEEDS`` = 100: never a seed a reproduction reports; a lower
    one is refused before anything is loaded) and ``val_size`` validation examples held out of its training
    data. The client (default 0, rank 16 in the PreLort MiniLM config) starts from the round-1 download and
    trains through :func:`~lowrank_fed.llm.client.run_client`, as in a run; a hook added to PreLort's plan
    reads the live adapter after each checkpoint step (the batches and the truncations of an ``n``-step round
    are the first ``n`` of the longer one, so this is an ``n``-step round): the prefix shares at the
    federation's ranks (:func:`~lowrank_fed.llm.training.prefix_shares`) and the **validation** accuracy of the
    client's model truncated to each federation rank up to its own, through a
    :class:`~lowrank_fed.llm.training.PrefixMask` of its own (no dropout in evaluation, so the training's
    random draws are unchanged; the evaluation time is not counted in ``seconds``). The test split is never
    scored.
    """
    from lowrank_fed.llm.client import run_client, update_prefix_energy
    from lowrank_fed.llm.config import RunConfig, load_config
    from lowrank_fed.llm.methods import make_method
    from lowrank_fed.llm.runner.simulation import Simulation
    from lowrank_fed.llm.training import Hook, PrefixMask, prefix_shares

    check_real_seed(seed)
    if val_size < 1:
        raise ValueError(f"val_size {val_size}: the benchmark scores the validation split; give at least 1.")
    cfg = RunConfig.from_dict({**load_config(config), "local_steps": max(checkpoints), "seed": seed,
                               "val_size": val_size, "eval_size": 1,  # the test split is never scored
                               "checkpoint": False, "methods": ["prelort"]})
    sim = Simulation(cfg, Path("bench-results") / "tmp", progress=False)
    sim.setup()
    ladder = sorted(set(sim.ranks))
    levels = [t for t in ladder if t <= sim.ranks[client]]
    out = {"config": str(config), "client": client, "rank": sim.ranks[client], "ladder": ladder, "seed": seed,
           "split": "validation", "val_size": len(sim.val), "examples": int(len(sim.client_idx[client])),
           "modes": {}}
    for mode in modes:
        method = make_method("prelort", nested=mode)
        server = method.init_server(sim.init, sim.init_extras, dict(enumerate(sim.ranks)), init_seed=sim.init_seed)
        rows: dict[int, dict] = {}
        plan_of = method.client_plan

        def client_plan(message, state, context, generator, plan_of=plan_of, rows=rows):
            plan, state = plan_of(message, state, context, generator)

            class Measure(Hook):
                def __init__(self, ws):
                    self.ws, self.t0, self.excluded = ws, time.perf_counter(), 0.0
                    self.mask = PrefixMask(ws, levels, hold=False)  # tau None: no effect on training

                def after_step(self, step):
                    if step + 1 not in checkpoints:
                        return
                    t0 = time.perf_counter()
                    energy = update_prefix_energy(plan.pairs, self.ws.extract()[0])
                    sampler = plan.info.get("hook")
                    held, accuracy = (sampler.tau if sampler is not None else None), {}
                    if sampler is not None:
                        sampler.tau = None
                    self.ws.peft.eval()
                    for t in levels:
                        self.mask.tau = t
                        accuracy[str(t)] = float(np.mean(sim._score("val")["correct"]))
                    self.mask.tau = None
                    self.ws.peft.train()
                    if sampler is not None:
                        sampler.tau = held
                    rows[step + 1] = {"prefix_share": prefix_shares(energy, ladder), "accuracy": accuracy,
                                      "seconds": t0 - self.t0 - self.excluded}
                    self.excluded += time.perf_counter() - t0

                def close(self):
                    self.mask.close()

            plan.hooks.append(Measure)
            return plan, state

        method.client_plan = client_plan
        _, _, stats = run_client(method, method.configure(server, client), None, sim.contexts[client])
        out["modes"][mode] = {"steps": rows, "train_loss": stats.loss}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_prelort", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--out", type=Path, help="write the table as JSON")
    parser.add_argument("--real", type=Path, metavar="CONFIG.toml",
                        help="instead: one client of this run config, round 1, up to 100 local steps per nested "
                             "mode (PreLort MiniLM, 1 thread: about 2 minutes for off or sample, 5 for all)")
    parser.add_argument("--modes", nargs="+", default=["off", "sample", "all"], choices=["off", "sample", "all"],
                        help="with --real: the nested modes")
    parser.add_argument("--steps", nargs="+", type=int, default=[5, 20, 50, 100], help="with --real: the checkpoints")
    parser.add_argument("--seed", type=int, default=REAL_SEED,
                        help=f"with --real: the config's seed, at least 100 (default {REAL_SEED}; reported seeds "
                             "0..99 are refused)")
    parser.add_argument("--val-size", type=int, default=REAL_VAL_SIZE,
                        help=f"with --real: validation examples scored (default {REAL_VAL_SIZE})")
    args = parser.parse_args(argv)
    if args.real:
        try:
            check_real_seed(args.seed)
        except ValueError as err:
            parser.error(str(err))
        real = run_real(args.real, modes=tuple(args.modes), checkpoints=tuple(args.steps), seed=args.seed,
                        val_size=args.val_size)
        print(f"{args.real}: seed {real['seed']}, client {real['client']} (rank {real['rank']}, {real['examples']} "
              f"examples), ladder {real['ladder']}, round 1; accuracy on {real['val_size']} validation examples")
        for mode, r in real["modes"].items():
            for n, row in sorted(r["steps"].items()):
                shares = " ".join(f"share{t}={v:.3f}" for t, v in row["prefix_share"].items())
                acc = " ".join(f"acc@{t}={v:.3f}" for t, v in row["accuracy"].items())
                print(f"{mode:<7} {n:>4} steps  {shares}  {acc}  ({row['seconds']:.1f} s training)")
        if args.out:
            args.out.write_text(json.dumps(real, indent=2, sort_keys=True))
        return 0
    seeds = (0,) if args.quick else (0, 1, 2)
    table = {}
    for mode in MODES:
        runs = [run_mode(mode, s) for s in seeds]
        table[mode] = {n: {k: float(np.mean([r[n][k] for r in runs])) for k in runs[0][n]} for n in CHECKPOINTS}
    sigma = 2.0 * 0.8 ** np.arange(RANK)
    opt4 = float((sigma[4:] ** 2).sum() / (sigma ** 2).sum())
    print(f"toy regression d={D}, target rank {RANK}, T={list(LADDER)}, AdamW lr {LR}, batch {BATCH}, "
          f"seeds {list(seeds)}; opt4 (Eckart-Young) = {opt4:.3f}")
    print(f"{'mode':<14} {'steps':>5} {'share4':>7} {'share8':>7} {'err4':>7} {'err16':>7} {'ms/step':>8}")
    for mode in MODES:
        for n in CHECKPOINTS:
            r = table[mode][n]
            print(f"{mode:<14} {n:>5} {r['share4']:>7.3f} {r['share8']:>7.3f} {r['err4']:>7.3f} {r['err16']:>7.3f} "
                  f"{r['ms_per_step']:>8.2f}")
    if args.out:
        args.out.write_text(json.dumps({"opt4": opt4, "seeds": list(seeds), "table": table}, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
