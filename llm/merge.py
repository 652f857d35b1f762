r"""``lowrank-fed merge``: aggregate PEFT LoRA adapters trained anywhere into one global adapter.

.. code-block:: text

    lowrank-fed merge CLIENT_DIR... --rule RULE --out DIR [--weights W...] [--rank N] [--per-client DIR]
                      [--robust [--threshold gap|Z]] [--lora-alpha A] [--overwrite]

Each ``CLIENT_DIR`` is a PEFT adapter folder (any ranks, alphas, rsLoRA, ``rank_pattern``); the scale is
folded in on reading (:mod:`~lowrank_fed.llm.adapters`), so every rule acts on ``Delta W_k = s_k B_k A_k``:
``svd`` and ``stack`` give ``sum_k p_k Delta W_k`` exactly, ``svd --rank N`` its best rank-``N``
approximation, ``zero_pad``, ``replication``, ``segment``, ``fedavg`` the papers' rules. ``p_k`` are
``--weights`` (for example example counts), normalised; uniform without them. The modules are aggregated
in threads (:func:`~lowrank_fed.aggregation.aggregate_modules`: the CPU cores this process may use, at most
8, one BLAS thread each), each module's result the same bits as one by one; the table gives each module's
own milliseconds (timed in its thread) and, in its "all modules" row, the wall time of the whole aggregation.

``--robust`` first screens the clients (:func:`lowrank_fed.robust.screening_scores`): on every module a client
holds (held by at least 3 clients), a subspace test (one minus the median cosine of its column space, weighted by
its singular values, with the other holders') and a norm test (``log ||Delta W||_F``), each a robust z-score over the
module's holders; a client's score is the root-mean-square of its positive z-scores over its modules, both tests
combined. One decision on the scores, ``--threshold``: ``gap``, the default, flags the clients above the largest
significant gap of the sorted scores (:func:`lowrank_fed.robust.threshold_flags`); a number ``Z`` flags scores above
it. It prints each client's score, both tests, its number of scored modules and, when flagged, the reason (the test
and the modules where its z is highest), and leaves the flagged clients out. ``--per-client DIR``
writes each (kept) client's share, the global redistributed to its own per-module ranks by SVD, in its
own config (alpha, rsLoRA), as ``DIR/<client folder name>/``.

Everything is read and checked before anything is written; a bad folder, weight or option is an error
(exit status 2, one line) naming it: a missing, truncated or corrupt weights file, a non-finite tensor, a config
whose declared rank differs from its tensors, weights that are not finite, an alpha that is not finite and
positive, ``--rank`` above ``min(d_out, d_in)`` of the smallest module, ``fedavg`` over unequal ranks, a module or
head whose holders all have weight 0. ``--out`` and ``--per-client`` go through the output guard
(:func:`~lowrank_fed.llm.outputs.plan_output`): never the current folder, its parents, home, an input adapter's
folder or a folder merge did not write; an earlier merge output is replaced only with ``--overwrite``. Each folder
is written completely into a temporary sibling and then renamed into place, so a crash leaves the old output or the
new one, and a non-finite result is never written.
"""

from __future__ import annotations

import argparse
import math
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
    parser.add_argument("--robust", action="store_true", help="screen the clients (subspace and norm tests on every module they hold) and leave the "
                             "flagged ones out")
    parser.add_argument("--threshold", default="gap", metavar="gap|Z",
                        help="--robust's decision on the clients' scores: 'gap' (default: the largest "
                             "significant gap of the sorted scores) or a number Z (flag scores above Z)")
    parser.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                        help="alpha of the written global adapter (default: the first client's)")
    parser.add_argument("--missing", choices=("zero", "holders"), default="zero",
                        help="a module some clients lack: 'zero' (default) counts it as a zero update with the "
                             "client's weight, so the merge is the weighted average of the clients' models; "
                             "'holders' averages it over the clients that hold it, weights renormalised")
    parser.add_argument("--allow-negative", action="store_true",
                        help="task arithmetic with --rule svd or stack: the weights are coefficients, any sign, not "
                             "normalised (Delta W = sum_k w_k Delta W_k; subtracting an adapter is exact)")
    parser.add_argument("--allow-mixed-base", action="store_true",
                        help="merge adapters whose base_model_name_or_path or task_type differ (refused otherwise)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier merge output in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _check_options(args: argparse.Namespace, n: int) -> str | None:
    """The first problem with the options that need no adapter read (None if there is none)."""
    from lowrank_fed import AGGREGATORS

    if args.rule not in AGGREGATORS:
        return f"--rule {args.rule!r} is unknown; expected one of {sorted(AGGREGATORS)}."
    if args.rank is not None and (args.rule != "svd" or args.rank < 1):
        return f"--rank {args.rank}: expected a positive rank, with --rule svd only (got --rule {args.rule})."
    if args.allow_negative:
        if args.rule not in ("svd", "stack") or args.weights is None or args.robust:
            return ("--allow-negative (task arithmetic, Delta W = sum_k w_k Delta W_k) needs --weights and an exact "
                    f"rule, --rule svd or stack, without --robust; got --rule {args.rule}"
                    f"{'' if args.weights is not None else ', no --weights'}{', --robust' if args.robust else ''}.")
        if len(args.weights) != n or not all(math.isfinite(w) for w in args.weights) or not any(args.weights):
            return f"--weights: expected {n} finite numbers, not all zero (one per client); got {args.weights}."
    elif args.weights is not None and (len(args.weights) != n or not all(math.isfinite(w) for w in args.weights)
                                       or min(args.weights) < 0 or sum(args.weights) <= 0):
        return (f"--weights: expected {n} finite non-negative numbers with a positive sum (one per client); "
                f"got {args.weights}.")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        return f"--lora-alpha: expected a finite positive number (the scale is alpha / r); got {args.lora_alpha}."
    if args.robust and n < 3:
        return f"--robust needs at least 3 clients to tell a contaminated one from the rest; got {n}."
    if args.threshold != "gap":
        try:
            z = float(args.threshold)
        except ValueError:
            z = float("nan")
        if not (math.isfinite(z) and z > 0):
            return f"--threshold: expected 'gap' or a finite positive z-score cut; got {args.threshold!r}."
        if not args.robust:
            return f"--threshold {args.threshold} is --robust's decision; give --robust too."
    return None


def _plan_outputs(args: argparse.Namespace, names: list[str]) -> tuple[Path, Path | None]:
    """``--out`` and ``--per-client`` through the output guard; OutputFolderError when either is refused."""
    from .outputs import OutputFolderError, plan_output

    signatures = {"--out": ("adapter_config.json",), "--per-client": tuple(names)}
    layouts = {"--out": ("adapter_model.safetensors", "adapter_model.bin", "README.md"), "--per-client": ()}
    for folder, flag in ((args.out, "--out"), (args.per_client, "--per-client")):
        if folder is None:
            continue
        plan = plan_output(folder, signature=signatures[flag], layout=layouts[flag], overwrite=args.overwrite,
                           inputs=args.clients,
                           flag=flag, hint="Give --overwrite to replace an earlier output of merge, or choose "
                                           "another folder.")
        if plan == "existing":
            raise OutputFolderError(f"{flag} '{folder}' holds an earlier output of merge; nothing was changed. "
                                    f"Give --overwrite to replace it, or choose another folder.")
    out = Path(args.out)
    per_client = Path(args.per_client) if args.per_client is not None else None
    if per_client is not None:
        a, b = out.resolve(), per_client.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise OutputFolderError(f"--out '{out}' and --per-client '{per_client}' overlap; expected two separate "
                                    "folders.")
    return out, per_client


def _check_shapes(args: argparse.Namespace, adapters) -> str | None:
    """The first disagreement between the adapters and the rule (None if there is none), naming the folders."""
    for m in sorted({m for a in adapters for m in a.pairs}):
        held = {args.clients[k]: a.pairs[m] for k, a in enumerate(adapters) if m in a.pairs}
        shapes = {folder: tuple(p.shape) for folder, p in held.items()}
        if len(set(shapes.values())) > 1:
            return f"module {m!r}: the clients' updates have different shapes (d_out, d_in) {shapes}; expected one."
        ranks = {folder: p.rank for folder, p in held.items()}
        if args.rule == "fedavg" and len(set(ranks.values())) > 1:
            return (f"--rule fedavg averages B and A factor by factor, so it needs equal ranks; module {m!r} has "
                    f"ranks {ranks}. Use --rule svd (exact) or zero_pad for mixed ranks.")
    if args.rank is not None:  # the smallest module bounds every module's rank
        m, (d_out, d_in) = min(((m, p.shape) for a in adapters for m, p in a.pairs.items()),
                               key=lambda item: (min(item[1]), item[0]))
        if args.rank > min(d_out, d_in):
            return (f"--rank {args.rank}: expected at most min(d_out, d_in) = {min(d_out, d_in)} of module {m!r} "
                    f"(shape {d_out} x {d_in}), the smallest module.")
    return None


def _check_bases(args: argparse.Namespace, adapters) -> str | None:
    """Adapters of different base models or task types are refused unless ``--allow-mixed-base`` (naming them)."""
    for key, what in (("base_model_name_or_path", "base models"), ("task_type", "task types")):
        seen = {folder: getattr(a.config, key, None) for folder, a in zip(args.clients, adapters, strict=True)}
        if len(set(seen.values())) > 1 and not args.allow_mixed_base:
            return (f"the adapters were trained on different {what} ({key}: {seen}); a merge of them is meaningful "
                    "only if the bases are the same weights under other names. Give --allow-mixed-base to merge "
                    "anyway (the output then names no base model).")
    return None


def _merge_error(err, holders: list[str]) -> str:
    """:class:`~lowrank_fed.llm.adapters.MergeError` in the command's words, naming the client folders."""
    if err.kind == "overflow":
        return (f"module {err.where!r}: --weights times the clients' B overflow to Inf; expected coefficients "
                "of a sensible size.")
    if err.kind == "weight":
        return (f"module {err.where!r}: every client holding it ({holders}) has weight 0; "
                "expected a positive weight on at least one holder.")
    if err.kind == "extras_coefficients":
        return err.reason.replace("coefficients combine", "--allow-negative combines", 1)
    if err.kind == "extras_weight":
        return (f"tensor {err.where!r} (not LoRA, e.g. a head): every client holding it "
                f"({holders}) has weight 0; expected a positive weight on one.")
    return f"module {err.where!r} (held by {holders}): {err.reason}"


def main(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.console import Console
    from rich.table import Table
    from tqdm.auto import tqdm

    from lowrank_fed.linalg import aggregation_error, pooled_error
    from lowrank_fed.robust import screening_scores, threshold_flags
    from lowrank_fed.robust.screening import TESTS

    from .adapters import (Adapter, MergeError, aggregate_adapters, load_peft_adapter, redistribute_adapter,
                           save_peft_adapter)
    from .outputs import OutputFolderError, atomic_folder

    # ---- everything checked before anything is written
    n = len(args.clients)
    if problem := _check_options(args, n):
        return _fail(problem)
    resolved = [Path(c).resolve() for c in args.clients]
    if len(set(resolved)) != n:
        twice = next(c for c, r in zip(args.clients, resolved, strict=True) if resolved.count(r) > 1)
        return _fail(f"'{twice}' is given twice (or through a link); each client once, its weight in --weights.")
    names = [Path(c).name or str(c) for c in args.clients]
    if args.per_client is not None and len(set(names)) != n:
        return _fail(f"--per-client writes DIR/<client folder name>/, but the client folder names repeat: {names}.")
    try:
        out, per_client = _plan_outputs(args, names)
    except OutputFolderError as err:
        return _fail(str(err))
    adapters: list[Adapter] = []
    for folder in args.clients:
        try:
            adapters.append(load_peft_adapter(folder))
        except (OSError, ValueError) as err:
            return _fail(str(err))
    if problem := _check_shapes(args, adapters):
        return _fail(problem)
    if problem := _check_bases(args, adapters):
        return _fail(problem)
    weights = [1.0] * n if args.weights is None else list(args.weights)
    console = Console(stderr=False)
    if not console.is_terminal:  # a pipe or a file: wide enough that module names are never cut
        console = Console(stderr=False, width=max(console.width, 200))

    # ---- robust: a subspace test and a norm test on every module a client holds, one decision per client
    kept = list(range(n))
    if args.robust:
        t0 = time.perf_counter()
        threshold = args.threshold if args.threshold == "gap" else float(args.threshold)
        try:
            found = screening_scores([{m: (p.B.double().numpy(), p.A.double().numpy()) for m, p in a.pairs.items()}
                                      for a in adapters])
        except ValueError as err:
            return _fail(f"--robust: {err}")
        scored = np.flatnonzero(np.isfinite(found.scores))
        flagged = np.zeros(n, dtype=bool)
        flagged[scored] = threshold_flags(found.scores[scored], threshold)
        rule = "flagged above the largest significant gap" if threshold == "gap" else f"flagged above {threshold:g}"
        table = Table(title=f"--robust on {len(found.modules)} modules ({time.perf_counter() - t0:.2f} s): score = "
                            "root-mean-square excess z of the subspace and norm tests over the modules each client "
                            f"holds; {rule}")
        table.add_column("client", justify="right")
        for col in ("score", *TESTS, "modules"):
            table.add_column(col, justify="right")
        table.add_column("flagged")
        table.add_column("reason: worse test, highest z", overflow="fold")
        for k, name in enumerate(names):
            held = int(np.isfinite(found.module_z[0, k]).sum())
            if not np.isfinite(found.scores[k]):
                table.add_row(name, "-", "-", "-", "0", "", found.reason(k))
                continue
            table.add_row(name, f"{found.scores[k]:.2f}", *(f"{c:.2f}" for c in found.test_scores[:, k]), str(held),
                          "FLAGGED" if flagged[k] else "", found.reason(k) if flagged[k] else "")
        console.print(table)
        kept = [k for k in range(n) if not flagged[k]]
        if not kept:
            return _fail("--robust flagged every client; nothing to merge (nothing was written).")

    # ---- aggregation: the modules in threads, with how far each is from the exact weighted sum
    chosen = [adapters[k] for k in kept]
    w = [weights[k] for k in kept]
    modules = sorted({m for a in chosen for m in a.pairs})
    summary = Table(title=f"merge --rule {args.rule}" + (f" --rank {args.rank}" if args.rank else "")
                    + f" --missing {args.missing}: {len(kept)} of {n} clients")
    summary.add_column("module", overflow="fold")
    for col in ("held by", "rank", "aggregation_error", "ms"):
        summary.add_column(col, justify="right", overflow="fold")
    errors = []

    def held_by(holders: list[int]) -> str:  # "all", or which of the (kept) clients hold a module
        if len(holders) == len(chosen):
            return "all"
        return f"{len(holders)} of {len(chosen)}: " + ", ".join(names[kept[k]] for k in holders)

    def who(holders: list[int]) -> list[str]:
        return [names[kept[k]] for k in holders]

    details: dict = {}
    options = {"rank": args.rank} if args.rank else {}
    t0 = time.perf_counter()
    try:  # each module's seconds are timed in its own thread; a refusal is the first in name order
        merged = aggregate_adapters(args.rule, chosen, w, missing=args.missing,
                                    coefficients=args.allow_negative, details=details, **options)
    except MergeError as err:
        return _fail(_merge_error(err, who(err.holders)))
    seconds = time.perf_counter() - t0
    for m in tqdm(modules, desc="modules", disable=args.no_progress, file=sys.stderr):
        d = details[m]
        num, den = aggregation_error(d.inputs, d.weights, d.pair)
        errors.append((d.share * num, d.share * den))
        summary.add_row(m, held_by(d.holders), str(d.pair.rank), f"{num / den:.3e}" if den > 0 else "-",
                        f"{1e3 * d.seconds:.1f}")
    overall = pooled_error(errors) or 0.0
    summary.add_row("all modules", "", "", f"{overall:.3e}", f"{1e3 * seconds:.1f}", style="bold")
    for name in sorted({e for a in chosen for e in a.extras}):
        holders = [k for k, a in enumerate(chosen) if name in a.extras]
        summary.add_row(f"{name} (not LoRA: weighted average of its holders)", held_by(holders), "", "", "")
    merged = Adapter(merged.pairs, merged.extras, adapters[0].config)

    # ---- writing: each folder complete in a temporary sibling first, then renamed into place
    # A client's share: the global at its own ranks, of the modules and head it trained, in its own config.
    own = {k: Adapter({m: merged.pairs[m] for m in adapters[k].pairs},
                      {e: merged.extras[e] for e in adapters[k].extras}, merged.config) for k in kept}
    shares = {names[k]: redistribute_adapter(own[k], adapters[k].config or adapters[k].ranks, method="svd")
              for k in kept} if per_client is not None else {}
    try:
        with atomic_folder(out) as tmp:
            mixed = len({getattr(a.config, "base_model_name_or_path", None) for a in adapters}) > 1
            save_peft_adapter(tmp, merged, lora_alpha=args.lora_alpha, base_model_name_or_path="" if mixed else None)
        if per_client is not None:
            with atomic_folder(per_client) as tmp:
                for name, share in shares.items():
                    save_peft_adapter(tmp / name, share)
    except ValueError as err:  # a non-finite result: never written
        return _fail(str(err))
    console.print(summary)
    console.print(f"global adapter in {out}" + (f"; per-client shares in {per_client}" if per_client else ""))
    return 0
