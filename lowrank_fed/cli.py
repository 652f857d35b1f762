r"""The ``lowrank-fed`` command.

Subcommands:

- ``run``: the main job, federated heterogeneous-rank LoRA fine-tuning of a packaged real model
  (torch layer, :mod:`lowrank_fed.llm`; imported only when used).
- ``merge``: aggregate PEFT LoRA adapter folders trained anywhere (any ranks, alphas, rsLoRA) with a
  core rule, optionally leaving out the clients CLAIR flags (:mod:`lowrank_fed.llm.merge`).
- ``reproduce``: the seed papers' claims (LoRA-A2, Byun & Lee, HAFL, PreLort, CLAIR) as experiments over
  several seeds, with a report of what holds (:mod:`lowrank_fed.llm.reproduce`).
- ``tune``: choose each method's learning rate (or any option) per setting on the validation split only, on
  seeds disjoint from the reported ones; writes ``tuned.toml`` that a config's ``tuned`` key reads
  (:mod:`lowrank_fed.llm.tune`).
- ``compare``: every aggregation rule side by side on synthetic heterogeneous clients.
- ``recover``: one synthetic CLAIR recovery experiment.
- ``bench``: the performance ratios of ``benchmarks/``.
- ``flower``: ``flower up --supernodes N CONFIG``, a SuperLink and N SuperNodes on this machine running the
  config (:mod:`lowrank_fed.llm.flower.deploy`; needs ``lowrank-fed[flower]``).

BLAS runs on one thread (``LOWRANK_FED_THREADS=N`` to change it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from threadpoolctl import threadpool_limits

from .aggregation import available_cores  # the cores this process may use (its affinity), not the machine's

__all__ = ["main", "build_parser"]

# subcommand -> (module with add_arguments(parser) and main(args) -> int, help)
SUBCOMMANDS = {
    "run": ("lowrank_fed.llm.run", "federated heterogeneous-rank LoRA fine-tuning of a real model (main job)"),
    "merge": ("lowrank_fed.llm.merge", "aggregate PEFT LoRA adapter folders into one global adapter"),
    "reproduce": ("lowrank_fed.llm.reproduce", "the seed papers' claims as experiments over several seeds"),
    "tune": ("lowrank_fed.llm.tune", "choose each method's hyper-parameter (lr, an option) on validation data only"),
    "compare": ("lowrank_fed.experiments.compare_cli", "compare the aggregation rules on synthetic clients"),
    "recover": ("lowrank_fed.experiments.recover", "one synthetic CLAIR recovery experiment"),
    "bench": ("lowrank_fed.experiments.bench_cli", "run the benchmarks (ratios against named baselines)"),
    "flower": ("lowrank_fed.llm.flower.deploy", "run on Flower: 'flower up --supernodes N CONFIG' starts a "
               "SuperLink and N SuperNodes on localhost, runs the config, shuts them down"),
}

#: What ``lowrank-fed --help`` says above the list of commands (plain text: argparse prints it as is).
DESCRIPTION = """\
Federated LoRA fine-tuning with heterogeneous client ranks: train and compare
the methods on a real model (run), merge PEFT adapters trained anywhere
(merge), test the seed papers' claims over several seeds (reproduce), choose
hyper-parameters on validation data only (tune), run on
Flower (flower), and synthetic checks of the aggregation rules (compare,
recover, bench). 'lowrank-fed COMMAND --help' gives a command's options.

BLAS runs on one thread (LOWRANK_FED_THREADS=N to change it)."""


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"torch", "transformers", "peft"}:
            raise SystemExit(
                f"lowrank-fed: this command needs the torch layer; install it with "
                f"`pip install 'lowrank-fed[llm]'` (missing module {exc.name!r})."
            ) from None
        if exc.name and exc.name.split(".")[0] in {"rich", "matplotlib"}:
            raise SystemExit(
                f"lowrank-fed: this command prints tables; install them with `pip install 'lowrank-fed[cli]'` "
                f"(missing module {exc.name!r})."
            ) from None
        raise


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (``lowrank-fed merge: error: ... (see ... --help)``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="lowrank-fed", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Only the chosen subcommand's module is imported, so `compare` never pulls in torch.
    chosen = next((a for a in (argv or []) if a in SUBCOMMANDS), None)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            mod = _load(module)
            mod.add_arguments(p)
            p.set_defaults(_main=mod.main)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as the user reads it: ``warning: <message>``, one line, without our file name and source line."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, one line on stderr): a status, as for any command
        if isinstance(stop.code, str):  # a missing extra (_load): its one line, a user error
            print(stop.code, file=sys.stderr)
            return 2
        return int(stop.code or 0)
    threads, cores = os.environ.get("LOWRANK_FED_THREADS", "1"), available_cores()
    if not threads.isdigit() or not 1 <= int(threads) <= cores:
        print(f"lowrank-fed: LOWRANK_FED_THREADS must be a whole number from 1 to the {cores} cores this process may "
              f"use. Got {threads!r}.", file=sys.stderr)
        return 2
    previous, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        # One BLAS thread unless asked otherwise: the core's matrices are small or tall-skinny, and
        # two BLAS threads on a busy 2-core machine were measured up to 25x slower.
        with threadpool_limits(limits=int(threads)):
            return int(args._main(args) or 0)
    except OSError as err:  # the disk or the system refused (full, read-only, permissions): no traceback
        where = f" ({err.filename})" if err.filename else ""
        print(f"lowrank-fed {args.command}: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    raise SystemExit(main())

