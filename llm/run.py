r"""``lowrank-fed run``: federated heterogeneous-rank LoRA fine-tuning of a real model, methods side by side.

Usage::

    lowrank-fed run [CONFIG.toml] [--set key=value ...] [--out DIR] [--resume DIR] [--no-progress]

With no config it runs the embedded default (:class:`~lowrank_fed.llm.config.RunConfig`): FedIT with
zero-padding, HetLoRA, FLoRA and FlexLoRA on MiniLM / BBC News, 10 non-IID clients with FLoRA's
ranks. Outputs go to ``runs/<name>/`` (or ``--out``): ``metrics.jsonl``, ``summary.md`` /
``summary.json``, PNG plots, ``checkpoints/`` (every round) and ``adapters/`` (final states).
``--resume DIR`` continues an interrupted run from its last checkpoints, with the configuration
stored in ``DIR``, to the same final adapters.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``run`` command's arguments to ``parser``."""
    parser.add_argument("config", nargs="?", default=None, metavar="CONFIG.toml",
                        help="TOML config (default: the embedded demo; see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (TOML value; dotted keys for method tables, e.g. hetlora.lam=0.05)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/<name>)")
    parser.add_argument("--resume", default=None, metavar="DIR", help="resume the interrupted run in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    """Run the job described by ``args``; print the comparison table. Returns the exit status."""
    from rich.console import Console

    from .config import RunConfig, apply_overrides, load_config

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    try:
        if args.resume:
            if args.config or args.overrides or args.out:
                raise ValueError("--resume takes the configuration and the folder stored in DIR; drop CONFIG, --set and --out.")
            out = Path(args.resume)
            stored = out / "config.json"
            if not stored.exists():
                raise FileNotFoundError(f"--resume: {stored} not found; is {out} a lowrank-fed run folder?")
            cfg = RunConfig.from_dict(json.loads(stored.read_text()))
        else:
            cfg = RunConfig.from_dict(apply_overrides(load_config(args.config), args.overrides))
            out = Path(args.out) if args.out else Path("runs") / cfg.name
    except (ValueError, FileNotFoundError, OSError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 2

    from .models import PackageMissingError
    from .runner.report import summary_table
    from .runner.simulation import Simulation

    console.print(f"lowrank-fed run [bold]{cfg.name}[/bold]: {cfg.model} on {cfg.dataset}, methods {cfg.methods}, "
                  f"{cfg.clients} clients, {cfg.rounds} rounds -> {out}")
    sim = Simulation(cfg, out, progress=not args.no_progress)
    try:
        summary = sim.run(resume=bool(args.resume))
    except PackageMissingError as err:
        console.print(f"[red]error:[/red] {err}")
        return 3
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/yellow]; continue with: lowrank-fed run --resume {out}")
        return 130
    console.print(f"clients' ranks {sim.ranks}, examples {sim.n_k}")
    console.print(summary_table(summary, title=f"{cfg.name}: {cfg.model} / {cfg.dataset}"))
    console.print(f"metrics, plots and adapters in {out}/")
    sys.stdout.flush()
    return 0
