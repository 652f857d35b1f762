r"""Clients in parallel: the demo's round wall time on ``workers = 2`` against ``workers = 1``, in one run.

The demo config (``configs/default.toml``: MiniLM, BBC News, 10 clients, its methods) for ``rounds`` rounds: each
method is run into fresh folders with ``workers = 1`` (one client after another) and right after with
``workers = 2`` (two worker processes, one torch thread each), so that both settings of a method see about the same
load on a shared machine. Reported per setting, summed over the methods: the rounds' wall time
(``timings.jsonl``'s ``wall_seconds`` of rounds >= 1: training, aggregation and the round's evaluation), the
whole runs' wall time (set-up, the workers' start, round 0's evaluation, outputs), and whether ``metrics.jsonl``
and the adapters are byte-identical. Target: round wall time ratio <= 0.6x (two workers on two cores; the ideal
is 0.5x). On a machine shared with other work the ratio is noisy: run it twice. Beside it, what the machine gave two
processes at that time: the wall time of a fixed pure-Python loop run in two processes at once over its wall time
alone, before and after (1.0x: two free cores; 2.0x: the two processes shared one core's worth).

Usage: ``python -m benchmarks --only workers [--quick]`` (``--quick``: FedIT alone, one round).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

TARGET = 0.6
EVAL_SHARE_TARGET = 0.10  # evaluation's share of a demo run


def _digest(folder: Path) -> str:
    """sha256 over metrics.jsonl and every adapter file (what must not depend on the workers)."""
    h = hashlib.sha256()
    for p in [folder / "metrics.jsonl", *sorted((folder / "adapters").rglob("*"))]:
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _spin(_=None) -> float:
    """Seconds of wall time for a fixed CPU-bound loop (no memory traffic, no BLAS)."""
    start, x = time.perf_counter(), 0
    for i in range(20_000_000):
        x += i
    return time.perf_counter() - start


def machine_share() -> float:
    """Wall time of :func:`_spin` in two processes at once over its wall time alone (1.0: two free cores)."""
    import multiprocessing

    alone = _spin()
    with multiprocessing.get_context("forkserver").Pool(2) as pool:
        both = max(pool.map(_spin, [0, 1]))
    return both / alone


def _run(workers: int, methods, rounds: int) -> dict:
    """One run of the demo's ``methods`` with ``workers``: its seconds and the digest of its outputs."""
    from lowrank_fed.llm.config import RunConfig, load_config
    from lowrank_fed.llm.runner.simulation import run_experiment

    data = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.toml")
    data.update(rounds=rounds, workers=workers, methods=list(methods), checkpoint=False)
    cfg = RunConfig.from_dict(data)
    folder = Path("bench-results") / "tmp" / f"workers-{workers}" / "-".join(methods)
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    run_experiment(cfg, folder, progress=False)
    total = time.perf_counter() - t0
    times = [json.loads(x) for x in (folder / "timings.jsonl").read_text().splitlines()]
    rounds_s = sum(t["wall_seconds"] for t in times if t["round"] > 0)
    eval_s = sum(t["eval_seconds"] for t in times if t["round"] > 0)
    return {"workers": workers, "total_s": total, "rounds_s": rounds_s, "rounds_eval_s": eval_s,
            "round0_eval_s": sum(t["eval_seconds"] for t in times if t["round"] == 0), "digest": _digest(folder)}


def demo_eval_share(runs: list[dict], rounds: int, scored: int) -> float:
    r"""Evaluation's share of the demo's wall time, from one measured round per method.

    ``share = E / (E + rounds sum_m t_m)`` with ``E = e_0 + (scored - 1) sum_m e_m``: ``t_m`` is method ``m``'s
    round without its evaluation, ``e_m`` that round's evaluation, and ``e_0`` the first method's round 0 (the
    workers' start included), which the demo scores once and its other methods reuse. The demo trains
    ``rounds`` rounds and scores ``scored`` of them, round 0 included (4 and 3: rounds 0, 2 and 4 with
    ``eval_every = 2``).
    """
    ev = runs[0]["round0_eval_s"] + (scored - 1) * sum(r["rounds_eval_s"] for r in runs)
    train = rounds * sum(r["rounds_s"] - r["rounds_eval_s"] for r in runs)
    return ev / (ev + train)


def main(argv=None) -> int:
    """Run the comparison and print its table; returns 0 (1 if the outputs differ)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="FedIT alone, one round")
    parser.add_argument("--out", default="bench-results/workers.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from lowrank_fed.llm.config import RunConfig, available_cores, load_config
    from lowrank_fed.llm.runner.rounds import evaluated

    methods = ["fedit"] if args.quick else load_config(
        Path(__file__).resolve().parents[1] / "configs" / "default.toml")["methods"]
    rounds = 1
    console = Console(width=110)
    if available_cores() < 2:
        console.print(f"workers row skipped: this process may use {available_cores()} CPU core (2 needed)")
        return 0
    share_before = machine_share()
    runs = {1: [], 2: []}
    for name in methods:  # both settings of a method one after the other: about the same load on a shared machine
        for workers in (1, 2):
            runs[workers].append(_run(workers, [name], rounds))
    one, two = ({"workers": w, **{k: sum(r[k] for r in runs[w]) for k in ("total_s", "rounds_s", "rounds_eval_s")},
                 "digest": [r["digest"] for r in runs[w]], "per_method": runs[w]} for w in (1, 2))
    share_after = machine_share()
    ratio = two["rounds_s"] / one["rounds_s"]
    same = one["digest"] == two["digest"]
    table = Table(title=f"Clients in parallel: the demo (MiniLM, BBC News, 10 clients), {len(methods)} method(s), "
                        f"{rounds} round(s), {available_cores()} cores")
    for col in ("workers", "rounds' wall s", "of which evaluation s", "whole run s", "ratio", "target"):
        table.add_column(col, justify="right")
    for r in (one, two):
        table.add_row(str(r["workers"]), f"{r['rounds_s']:.1f}", f"{r['rounds_eval_s']:.1f}", f"{r['total_s']:.1f}",
                      "1.00x" if r is one else f"{ratio:.2f}x",
                      "" if r is one else f"<= {TARGET}x " + ("pass" if ratio <= TARGET else "FAIL"))
    console.print(table)
    demo = RunConfig.from_dict(load_config(Path(__file__).resolve().parents[1] / "configs" / "default.toml"))
    scored = 1 + sum(evaluated(demo, r) for r in range(1, demo.rounds + 1))  # round 0 and the runner's schedule
    share = demo_eval_share(runs[2], demo.rounds, scored)
    console.print(f"evaluation's share of a demo run ({demo.rounds} rounds, {scored} scored, 2 workers), from "
                  f"these rounds: {100 * share:.1f}% (target <= {100 * EVAL_SHARE_TARGET:.0f}%: "
                  + ("pass" if share <= EVAL_SHARE_TARGET else "FAIL") + ")")
    console.print(f"metrics.jsonl and adapters byte-identical across workers: {'yes' if same else 'NO'}")
    console.print(f"two CPU-bound processes at once took {share_before:.2f}x / {share_after:.2f}x the time of one "
                  "(before / after; 1.0x: two free cores, 2.0x: one core's worth for both)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"methods": methods, "rounds": rounds, "runs": [one, two], "ratio": ratio,
                               "demo_eval_share": share,
                               "identical": same, "two_process_slowdown": [share_before, share_after]}, indent=1))
    sys.stdout.flush()
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
