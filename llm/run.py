r"""``lowrank-fed run``: federated heterogeneous-rank LoRA fine-tuning of a real model, methods side by side.

Usage::

    lowrank-fed run [CONFIG.toml] [--set key=value ...] [--out DIR] [--overwrite] [--no-progress] [--engine flower]
    lowrank-fed run --resume DIR [--no-progress] [--engine flower]

With no config it runs the embedded default (:class:`~lowrank_fed.llm.config.RunConfig`, spelled out in
``configs/default.toml``): the three seed methods (PreLort, HAFL, LoRA-A2) beside FedIT (zero-padding),
FLoRA and FlexLoRA on MiniLM / BBC News, 10 non-IID clients (Dirichlet 0.5) with ranks 16, 8 and 4, 4 rounds.
Outputs go to ``runs/<name>/`` (or ``--out``): ``metrics.jsonl``, ``summary.md`` / ``summary.json`` (the
table and a verdict with its standard error), PNG plots, ``checkpoints/`` (per method the latest round and
the previous one, the fallback) and ``adapters/`` (final states). Every config key is listed in
``docs/config.md``.

Runs never lose data:

- the whole config (keys, method tables, faults, the device; for ``--resume`` the stored
  ``config.json``) is validated before anything is written; an error is reported on stderr with
  exit status 2 and leaves the disk as it was;
- a run into a folder that already holds anything is refused (exit status 2) unless
  ``--overwrite`` is given, which empties the folder only after the config was validated (and never
  the current folder, one of its parents or the home folder);
- ``--resume DIR`` continues an interrupted run from its last checkpoints, with the configuration
  stored in ``DIR``, to the same final adapters. A ``config.json`` edited since the checkpoints were
  written is refused (exit status 2, naming each key that differs); a method whose every checkpoint is
  corrupt starts again from round 0 (a warning names the files); a bad ``LATEST`` is rewritten.

Exit status: 0 done, 2 invalid config or output folder, 3 a packaged model or dataset is not
installed, 130 interrupted (resume with ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .flower.processes import signals_raise
from .outputs import OutputFolderError, clear_folder, hold_lock, lock_holder, output_path, plan_output
from .packages import PackageMissingError, cache_dir, check_model_package

__all__ = ["add_arguments", "main", "check_output_folder"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``run`` command's arguments to ``parser``."""
    parser.add_argument("config", nargs="?", default=None, metavar="CONFIG.toml",
                        help="TOML config (default: the embedded demo; see configs/ and docs/config.md)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (a TOML value; dotted keys for method tables, "
                             "e.g. hetlora.lam=0.05)")
    parser.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/<name>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what the output folder holds (after the config is validated)")
    parser.add_argument("--resume", default=None, metavar="DIR", help="resume the interrupted run in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess",
                        help="inprocess (default) or flower: the same rounds on Flower's Simulation Runtime, one "
                             "virtual SuperNode per client (needs lowrank-fed[flower]; docs/flower.md)")


def _error(message: object) -> None:
    # Plain text on stderr: rich markup would eat "[hetlora]" and wrap long keys.
    for line in str(message).splitlines():
        print(f"error: {line}", file=sys.stderr, flush=True)


#: The names that mark a folder as a run's (``--overwrite`` replaces only such a folder).
RUN_SIGNATURE = ("config.json",)
#: Everything else a run writes at the top of its folder (a folder holding anything more is no earlier run).
RUN_LAYOUT = ("setup.json", "metrics.jsonl", "timings.jsonl", "summary.md", "summary.json", "*.png", "checkpoints",
              "adapters")


def _stored_config(folder: Path) -> dict | None:
    """The run config stored in ``folder`` (``config.json``) as a dict; None if it has none."""
    from .config import ConfigError

    stored = folder / "config.json"
    if not stored.is_file():
        return None
    try:
        return json.loads(stored.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"'{stored}' cannot be read as JSON: {err}.") from None


def _resumed_config(folder: Path):
    """The config stored in a run folder, validated."""
    from .config import ConfigError, RunConfig

    if not folder.is_dir():
        raise ConfigError(f"--resume: '{folder}' is not a folder; expected the folder of an earlier run.")
    try:
        data = _stored_config(folder)
    except ConfigError as err:
        raise ConfigError(f"--resume: {err}") from None
    if data is None:
        raise ConfigError(f"--resume: '{folder}' has no config.json, so it holds no run to resume; "
                          f"start a new run instead (with --out NEW_FOLDER).")
    try:
        return RunConfig.from_dict(data)
    except ConfigError as err:
        problems = "; ".join(str(err).splitlines())
        raise ConfigError(f"--resume: the stored config '{folder / 'config.json'}' is invalid here: {problems}",
                          err.errors) from None


def check_output_folder(folder: Path, cfg=None, *, overwrite: bool = False, hint: str, inputs=()) -> str:
    r"""What a run of ``cfg`` must do with its output folder before it writes: ``"new"``, ``"clear"`` or ``"resume"``.

    The one rule of every entry point (``lowrank-fed run``, ``lowrank-fed flower up``, the Flower ServerApp), on
    top of the guard every writing command shares (:func:`~lowrank_fed.llm.outputs.plan_output`: never the
    current folder, its parents, home, a folder holding ``inputs``, an unwritable one):

    - ``"new"``: the folder is absent, or holds nothing but Flower's scratch folder
      (:data:`~lowrank_fed.llm.outputs.SCRATCH`);
    - ``"clear"``: ``overwrite`` is given and the folder holds an earlier run (its ``config.json``): replace it by
      an empty folder (:func:`_clear`) first, then start afresh (even over a run of the same config). A folder
      holding anything else is refused;
    - ``"resume"``: ``cfg`` is given and the folder's ``config.json`` is ``cfg``'s: continue that run from its
      checkpoints. ``lowrank-fed run`` passes no ``cfg``: it resumes only when told to (``--resume DIR``).

    Parameters
    ----------
    folder : Path
    cfg : RunConfig, optional
        The run about to start; given, a folder holding a run of the same config is resumed.
    overwrite : bool
        Replace a folder that holds an earlier run (``--overwrite``).
    hint : str
        How the user goes on when the folder is refused (ends the error message).
    inputs : iterable of paths
        What the run reads (its config file, the model cache): the folder may not hold them.

    Raises
    ------
    ConfigError
        The guard refuses the folder; it holds files and ``overwrite`` is not given (naming them, or the other
        config it holds); ``overwrite`` of a folder that holds no run.
    """
    from .config import ConfigError

    try:
        plan = plan_output(folder, signature=RUN_SIGNATURE, layout=RUN_LAYOUT, overwrite=overwrite,
                           inputs=[*inputs, cache_dir()], hint=hint)
    except OutputFolderError as err:
        raise ConfigError(str(err)) from None
    if plan != "existing":
        return plan
    stored = _stored_config(folder) if cfg is not None else None
    if stored is not None:
        if isinstance(stored, dict) and cfg.same_run(stored):  # workers may differ
            return "resume"
        raise ConfigError(f"Output folder '{folder}' holds a run of another config ({folder / 'config.json'}); "
                          f"nothing was changed. {hint}")
    names = sorted(p.name for p in folder.iterdir())
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise ConfigError(f"Output folder '{folder}' already holds files of a run ({shown}); nothing was changed. {hint}")


#: Replace a run folder by an empty one (the old one moved aside, then deleted; Flower's scratch kept).
_clear = clear_folder


def _check_packages(cfg) -> None:
    """Raise PackageMissingError before anything is written if the packaged model is not installed."""
    check_model_package(cfg.model)


def main(args: argparse.Namespace) -> int:
    """Run the job described by ``args``; print the comparison table. Returns the exit status."""
    from .config import ConfigError, RunConfig, apply_overrides, load_config

    # 1. Validate everything; nothing is written before this block succeeds.
    try:
        if args.resume:
            if args.config or args.overrides or args.out or args.overwrite:
                raise ConfigError("--resume DIR takes the configuration and the folder stored in DIR; "
                                  "drop CONFIG, --set, --out and --overwrite.")
            out = Path(args.resume)
            cfg = _resumed_config(out)
            if (holder := lock_holder(out)) is not None:
                raise ConfigError(f"--resume: '{out}' is in use: process {holder} is writing into it; nothing was "
                                  "changed. Wait for it to end.")
            clear = False
        else:
            cfg = RunConfig.from_dict(apply_overrides(load_config(args.config), args.overrides))
            try:
                out = output_path(args.out, Path("runs") / cfg.name)
            except OutputFolderError as err:
                raise ConfigError(str(err)) from None
            clear = check_output_folder(
                out, overwrite=args.overwrite, inputs=[args.config] if args.config else [],
                hint=f"Use --overwrite to replace it, --resume {out} to continue the run in it, or --out to "
                     f"choose another folder.") == "clear"
    except ConfigError as err:
        _error(err)
        return 2
    if getattr(args, "engine", "inprocess") == "flower":  # the same Simulation, its rounds on Flower
        try:
            from .flower.engine import FlowerSimulation as Simulation
        except ModuleNotFoundError as err:
            _error(f"--engine flower needs Flower: pip install 'lowrank-fed[flower]' (missing module {err.name!r}).")
            return 3
    else:
        from .runner.simulation import Simulation

    sim = Simulation(cfg, out, progress=not args.no_progress)
    try:  # the data and the model: settings they cannot satisfy are config errors, found before any write
        if args.resume:
            sim.check_resume()  # config.json edited since the checkpoints were written
        _check_packages(cfg)
        sim.setup()
    except ConfigError as err:
        _error(err)
        return 2
    except PackageMissingError as err:
        _error(err)
        return 3

    # 2. Only now touch the disk.
    from rich.console import Console
    from rich.markup import escape

    from .runner.report import summary_table, verdict_lines

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 160))
    if clear:
        _clear(out)
        console.print(f"--overwrite: replaced the earlier run in {escape(str(out))}")
    console.print(f"lowrank-fed run [bold]{cfg.name}[/bold]: {cfg.model} on {cfg.dataset}, "
                  f"methods {cfg.methods}, {cfg.clients} clients, {cfg.rounds} rounds -> {escape(str(out))}")
    try:  # the folder locked while the run writes (a second command refuses it); SIGTERM/SIGHUP as Ctrl-C
        with hold_lock(out), signals_raise():
            summary = sim.run(resume=bool(args.resume))
    except BlockingIOError:
        _error(f"'{out}' is in use: another process started writing into it; nothing more was written here.")
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C; with --engine flower also SIGTERM/SIGHUP (flower.processes.Terminated)
        status = getattr(err, "status", 130)
        print(f"{'interrupted' if status == 130 else f'stopped by signal {status - 128}'}; continue with: "
              f"lowrank-fed run --resume {out}", file=sys.stderr, flush=True)
        if getattr(err, "hard_exit", False):  # every process stopped, every file closed; see flower/engine.py
            sys.stdout.flush()
            os._exit(status)
        return status
    console.print(f"clients' ranks {sim.ranks}, examples {sim.n_k}")
    console.print(summary_table(summary, title=f"{cfg.name}: {cfg.model} / {cfg.dataset}"))
    if any(row["by_rank"] for row in summary):
        console.print(summary_table(summary, title="the model each client rank downloads (test set, final round)",
                                    by_rank=True))
    for line in verdict_lines(summary):
        console.print(escape(line))
    console.print(f"metrics, plots and adapters in {out}/")
    sys.stdout.flush()
    return 0
