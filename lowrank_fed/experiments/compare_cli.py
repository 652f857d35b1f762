"""``lowrank-fed compare``: the aggregation rules side by side, printed as a table."""

from __future__ import annotations

import argparse

from .compare import FLORA_RANKS, compare_rules, heterogeneous_clients
from .table import print_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranks", type=int, nargs="+", default=list(FLORA_RANKS), help="client ranks (FLoRA's mix)")
    parser.add_argument("--d-out", type=int, default=1024)
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--spread", type=float, default=0.3, help="client deviation from the shared update")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    scenarios = [
        (f"heterogeneous ranks {args.ranks}", args.ranks),
        (f"equal ranks [16] x {len(args.ranks)}", [16] * len(args.ranks)),
    ]
    for title, ranks in scenarios:
        pairs, weights = heterogeneous_clients(ranks, args.d_out, args.d_in, spread=args.spread, seed=args.seed)
        rows = compare_rules(pairs, weights)
        print_table(
            f"Aggregation rules, {len(ranks)} clients, {args.d_out} x {args.d_in} layer, {title}",
            ["rule", "rank", "rel. error", "slot scale", "bytes", "ms", "note"],
            [
                [r.rule, r.rank or "-", f"{r.rel_error:.2e}", f"{r.mean_dilution:.3f}", r.bytes or "-",
                 f"{1e3 * r.seconds:.1f}", r.note]
                for r in rows
            ],
        )
    print(
        "rel. error: ||B A - sum_k p_k B_k A_k||_F / ||sum_k p_k B_k A_k||_F (0 = exact: stack, svd).\n"
        "slot scale: mean over slots of ||b_i|| / ||owners' mean b_i||; < 1 means slots shrunk by clients\n"
        "that lack them (zero_pad's dilution). segment, replication and slotwise keep 1, so a slot owned by\n"
        "one client keeps its full size instead of its weight's share, which the weighted sum would give it."
    )
    return 0
