r"""The benchmarks that need a GPU, as one script that fits a short loan: ``python -m benchmarks.bench_gpu``.

On the device given (``--device cuda`` by default; ``--device cpu`` runs the same script here, as a smoke test and
a same-machine baseline), each part against its named baseline measured in the same run:

1. **Aggregation**, the 7B-shaped model (64 layers of 4096 x 4096, K = 10 clients, ranks 4..64, float32 torch
   tensors on the device): ``aggregate("svd")`` on one layer against the dense way (form, sum, full SVD on the
   device), and ``aggregate_modules`` over the whole model, with the float32 kernels a layer cannot avoid (two
   ``d x R`` Grams, the ``R x R`` SVD, two ``d x R x R`` products) as the floor;
2. **a training round of the demo's methods** (``configs/default.toml``, one round, every method): each method's
   training, server and evaluation seconds from the run's ``timings.jsonl``, and evaluation's share of the run;
3. **evaluation**: that share is the evaluation benchmark (issue target: at most 10% of a run).

Prints one table per part and writes ``bench_gpu.json`` under ``--out`` (default: a temporary folder) so the numbers
travel back from the device machine. ``--quick``: 1024 x 1024 and 8 layers, the tiny model for part 2.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def _layer(gen, d: int, k: int, device):
    import torch

    from lowrank_fed import FactorPair

    ranks = [(4, 8, 16, 32, 64)[i % 5] for i in range(k)]
    pairs = [FactorPair(torch.randn(d, r, generator=gen).div_(math.sqrt(d)).to(device),
                        torch.randn(r, d, generator=gen).to(device)) for r in ranks]
    weights = [float(w) for w in torch.randint(100, 1000, (k,), generator=gen).tolist()]
    return pairs, weights


def aggregation(device, quick: bool) -> dict:
    """Part 1: one layer against the dense way, the whole model against its float32 floor."""
    import torch

    from lowrank_fed import aggregate
    from lowrank_fed.aggregation import aggregate_modules

    d, n_layers, k = (1024, 8, 10) if quick else (4096, 64, 10)
    gen = torch.Generator().manual_seed(0)
    pairs, weights = _layer(gen, d, k, device)
    R = sum(p.rank for p in pairs)
    p = torch.tensor(weights, device=device) / sum(weights)

    def dense():
        total = sum(pk * (pair.B @ pair.A) for pk, pair in zip(p, pairs, strict=True))
        return torch.linalg.svd(total, full_matrices=False)

    t_dense, (U, S, Vh) = _timed(dense, device, repeats=1)
    t_fact, out = _timed(lambda: aggregate("svd", pairs, weights), device)
    ref = (U[:, :R] * S[:R]) @ Vh[:R]
    rel = float(torch.linalg.matrix_norm(out.B @ out.A - ref) / torch.linalg.matrix_norm(ref))

    layers = [_layer(gen, d, k, device) for _ in range(n_layers)]
    modules = {f"layer{i}": lp for i, (lp, _) in enumerate(layers)}
    module_weights = {f"layer{i}": lw for i, (_, lw) in enumerate(layers)}
    t_model, _ = _timed(lambda: aggregate_modules("svd", modules, module_weights, workers=1), device, repeats=2)

    X = torch.randn(d, R, generator=gen).to(device)
    T = torch.randn(R, R, generator=gen).to(device)
    G = X.T @ X
    kernels = {"2 float32 Grams (d x R)": 2 * _timed(lambda: X.T @ X, device, 5)[0],
               "SVD (R x R)": _timed(lambda: torch.linalg.svd(G), device, 5)[0],
               "2 float32 products (d x R x R)": 2 * _timed(lambda: X @ T, device, 5)[0]}
    floor = sum(kernels.values())
    return {"d": d, "layers": n_layers, "clients": k, "R": R, "dense_s": t_dense, "factored_s": t_fact,
            "speedup": t_dense / t_fact, "relative_difference": rel, "model_s": t_model,
            "floor_layer_s": floor, "floor_model_s": n_layers * floor, "model_over_floor": t_model / (n_layers * floor),
            "kernels_s": kernels}


def training_round(device, quick: bool, out: Path) -> dict:
    """Parts 2 and 3: the demo's methods for one round on ``device``; seconds per method from ``timings.jsonl``."""
    from lowrank_fed.llm.config import RunConfig, load_config
    from lowrank_fed.llm.runner.simulation import run_experiment

    root = Path(__file__).resolve().parents[1]
    raw = load_config(root / "configs" / "default.toml")
    changes = {"rounds": 1, "eval_every": 1, "device": str(device), "checkpoint": False}
    if quick:
        changes.update(model="tiny-bert", dataset="synthetic", clients=3, ranks=[2, 4, 8], local_steps=2,
                       eval_size=80, val_size=20, max_length=32)
    cfg = RunConfig.from_dict({**raw, **changes})
    folder = out / "round"
    t0 = time.perf_counter()
    run_experiment(cfg, folder, progress=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (folder / "timings.jsonl").read_text().splitlines()]
    per = {}
    for r in rows:
        m = per.setdefault(r["method"], {"train_s": 0.0, "server_s": 0.0, "eval_s": 0.0, "wall_s": 0.0})
        m["train_s"] += r.get("train_seconds", 0.0)
        m["server_s"] += r.get("server_seconds", 0.0)
        m["eval_s"] += r.get("eval_seconds", 0.0)
        m["wall_s"] += r.get("wall_seconds", 0.0) + (r.get("eval_seconds", 0.0) if r["round"] == 0 else 0.0)
    evals = sum(m["eval_s"] for m in per.values())
    return {"model": cfg.model, "methods": per, "wall_s": wall, "eval_share": evals / wall}


def main(argv=None) -> int:
    import torch

    from lowrank_fed.experiments.table import print_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="1024 x 1024, 8 layers; the tiny model for the round")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_gpu.json (default: temporary)")
    parser.add_argument("--skip-round", action="store_true", help="only the aggregation part")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; give --device cpu for a smoke run")
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"device": name}
    agg = results["aggregation"] = aggregation(device, args.quick)
    print_table(f"Aggregation on {name}: {agg['layers']} layers of {agg['d']} x {agg['d']}, K = {agg['clients']}, "
                f"R = {agg['R']}, float32",
                ["measure", "value"],
                [["dense (form, sum, full SVD) s / factored svd s", f"{agg['dense_s']:.3f} / {agg['factored_s']:.4f}"],
                 ["speed-up", f"{agg['speedup']:.0f}x"],
                 ["relative difference of B A (Frobenius)", f"{agg['relative_difference']:.1e}"],
                 ["whole model, aggregate_modules s", f"{agg['model_s']:.3f}"],
                 *[[f"  floor kernel: {k} ms", f"{1e3 * v:.3f}"] for k, v in agg["kernels_s"].items()],
                 ["whole model / float32 floor", f"{agg['model_over_floor']:.2f}x"]])
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if not args.skip_round:
            rnd = results["round"] = training_round(device, args.quick, out)
            print_table(f"One round of the demo's methods on {name} ({rnd['model']}): seconds",
                        ["method", "train", "server", "eval", "wall"],
                        [[m, f"{v['train_s']:.2f}", f"{v['server_s']:.3f}", f"{v['eval_s']:.2f}", f"{v['wall_s']:.2f}"]
                         for m, v in rnd["methods"].items()])
            print(f"evaluation's share of the run: {100 * rnd['eval_share']:.1f}% (target <= 10%); "
                  f"whole run {rnd['wall_s']:.1f} s")
        (out / "bench_gpu.json").write_text(json.dumps(results, indent=2))
        if args.out:
            print(f"results in {out / 'bench_gpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
