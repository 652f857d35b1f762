r"""``lowrank-fed merge``: aggregate PEFT LoRA adapters trained anywhere into one global adapter.

.. code-block:: text

    lowrank-fed merge CLIENT_DIR... --rule RULE --out DIR [--weights W...] [--rank N] [--per-client DIR]
                      [--robust] [--lora-alpha A] [--overwrite]

Each ``CLIENT_DIR`` is a PEFT adapter folder (any ranks, alphas, rsLoRA, ``rank_pattern``); the scale is
folded in on reading (:mod:`~lowrank_fed.llm.adapters`), so every rule acts on ``Delta W_k = s_k B_k A_k``:
``svd`` and ``stack`` give ``sum_k p_k Delta W_k`` exactly, ``svd --rank N`` its best rank-``N``
approximation, ``zero_pad``, ``replication``, ``segment``, ``fedavg`` the papers' rules. ``p_k`` are
``--weights`` (for example example counts), normalised; uniform without them.

``--robust`` first runs CLAIR on the clients' deltas of every module and leaves out the clients it
flags (:func:`~lowrank_fed.llm.methods.clair.flag_clients`: the mean over modules of the robust
z-scores of the off-subspace residuals above 3), printing each client's score. ``--per-client DIR``
writes each (kept) client's share, the global redistributed to its own per-module ranks by SVD, in its
own config (alpha, rsLoRA), as ``DIR/<client folder name>/``.

Everything is read and checked before anything is written; a bad folder, weight or option is an error
(exit status 2) naming it. An existing non-empty ``--out`` is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``merge`` subcommand's arguments."""
    from lowrank_fed import AGGREGATORS

    parser.add_argument("clients", nargs="+", metavar="CLIENT_DIR", help="PEFT adapter folders, one per client")
    parser.add_argument("--rule", required=True, help="a core rule: " + ", ".join(sorted(AGGREGATORS)))
    parser.add_argument("--out", required=True, metavar="DIR", help="folder of the global PEFT adapter")
    parser.add_argument("--weights", nargs="+", type=float, default=None, metavar="W",
                        help="one weight per client (e.g. example counts); uniform if absent")
    parser.add_argument("--rank", type=int, default=None, metavar="N", help="svd: truncate to rank N (Eckart-Young)")
    parser.add_argument("--per-client", default=None, metavar="DIR",
                        help="also write each client's share at its own ranks under DIR/<client>/")
    parser.add_argument("--robust", action="store_true", help="flag contaminated clients with CLAIR and leave them out")
    parser.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                        help="alpha of the written global adapter (default: the first client's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fail(message: str) -> int:
    print(f"lowrank-fed merge: {message}", file=sys.stderr)
    return 2


def _check_out(folder: Path, overwrite: bool, flag: str) -> str | None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        return f"{flag} {folder} exists and is not empty; give --overwrite to replace it."
    return None


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from tqdm.auto import tqdm

    from lowrank_fed import AGGREGATORS, aggregate

    from .adapters import Adapter, average_extras, load_peft_adapter, redistribute_adapter, save_peft_adapter
    from .methods.clair import flag_clients

    # ---- everything checked before anything is written
    if args.rule not in AGGREGATORS:
        return _fail(f"--rule {args.rule!r} is unknown; expected one of {sorted(AGGREGATORS)}.")
    if args.rank is not None and (args.rule != "svd" or args.rank < 1):
        return _fail(f"--rank {args.rank}: expected a positive rank, with --rule svd only (got --rule {args.rule}).")
    n = len(args.clients)
    if args.weights is not None and (len(args.weights) != n or min(args.weights) < 0 or sum(args.weights) <= 0):
        return _fail(f"--weights: expected {n} non-negative numbers with a positive sum (one per client); "
                     f"got {args.weights}.")
    if args.robust and n < 3:
        return _fail(f"--robust needs at least 3 clients to tell a contaminated one from the rest; got {n}.")
    out, per_client = Path(args.out), Path(args.per_client) if args.per_client else None
    for folder, flag in ((out, "--out"), (per_client, "--per-client")):
        if folder is not None and (err := _check_out(folder, args.overwrite, flag)):
            return _fail(err)
    names = [Path(c).name or str(c) for c in args.clients]
    if per_client is not None and len(set(names)) != n:
        return _fail(f"--per-client writes DIR/<client folder name>/, but the client folder names repeat: {names}.")
    adapters: list[Adapter] = []
    for folder in args.clients:
        try:
            adapters.append(load_peft_adapter(folder))
        except (OSError, ValueError) as err:
            return _fail(str(err))
    weights = [1.0] * n if args.weights is None else list(args.weights)
    console = Console(stderr=False)

    # ---- robust: CLAIR on every module, one decision per client
    kept = list(range(n))
    if args.robust:
        modules = sorted(set.intersection(*(set(a.pairs) for a in adapters)))
        if not modules:
            return _fail("--robust needs modules every client adapted; these adapters share none.")
        rank = min(min(a.pairs[m].rank for a in adapters) for m in modules)
        t0 = time.perf_counter()
        found = flag_clients([{m: a.pairs[m] for m in modules} for a in adapters], rank=rank, weights=weights)
        table = Table(title=f"CLAIR on {len(modules)} modules (rank {rank}, {time.perf_counter() - t0:.2f} s): "
                            "mean z-score of the off-subspace residual; flagged above 3")
        for col in ("client", "mean z-score", "flagged"):
            table.add_column(col, justify="right")
        for name, score, ok in zip(names, found.scores, found.benign, strict=True):
            table.add_row(name, f"{score:.2f}", "" if ok else "FLAGGED")
        console.print(table)
        kept = [k for k in range(n) if found.benign[k]]
        if not kept:
            return _fail("CLAIR flagged every client; nothing to merge (nothing was written).")

    # ---- aggregation, module by module, with the truncation error
    chosen = [adapters[k] for k in kept]
    w = [weights[k] for k in kept]
    modules = sorted({m for a in chosen for m in a.pairs})
    summary = Table(title=f"merge --rule {args.rule}" + (f" --rank {args.rank}" if args.rank else "")
                    + f": {len(kept)} of {n} clients")
    for col in ("module", "rank", "relative error of the truncation", "ms"):
        summary.add_column(col, justify="right")
    pairs = {}
    for m in tqdm(modules, desc="modules", disable=args.no_progress, file=sys.stderr):
        holders = [k for k, a in enumerate(chosen) if m in a.pairs]
        t0 = time.perf_counter()
        options = {"rank": args.rank} if args.rank else {}
        pairs[m] = aggregate(args.rule, [chosen[k].pairs[m] for k in holders], [w[k] for k in holders], **options)
        ms = 1e3 * (time.perf_counter() - t0)
        error = "-"
        if args.rank:  # Eckart-Young: ||tail|| / ||all|| of the exact sum's singular values (B = U S)
            exact = aggregate("svd", [chosen[k].pairs[m] for k in holders], [w[k] for k in holders])
            s = exact.B.double().norm(dim=0)
            error = f"{float(s[args.rank:].norm() / s.norm().clamp_min(1e-300)):.3e}"
        summary.add_row(m, str(pairs[m].rank), error, f"{ms:.1f}")
    merged = Adapter(pairs, average_extras(chosen, w), adapters[0].config)

    # ---- writing
    if args.overwrite:
        for folder in (out, per_client):
            if folder is not None and folder.exists():
                shutil.rmtree(folder)
    save_peft_adapter(out, merged, lora_alpha=args.lora_alpha)
    if per_client is not None:
        for k in kept:
            share = redistribute_adapter(merged, adapters[k].config or adapters[k].ranks, method="svd")
            save_peft_adapter(per_client / names[k], share)
    console.print(summary)
    console.print(f"global adapter in {out}" + (f"; per-client shares in {per_client}" if per_client else ""))
    return 0
