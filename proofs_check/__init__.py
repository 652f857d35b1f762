r"""Every theorem and claim lowrank-fed rests on, as a numerical experiment that could fail.

Run ``python -m proofs_check [--quick] [--only NAME ...] [--out DIR]``. Each claim measures a
quantity, compares it with what the theory predicts under a stated tolerance, and returns a
:class:`Record`; the command prints the table, writes ``results.json`` and PNG figures to ``--out``,
and exits non-zero if any claim fails.
"""

from ._registry import CLAIMS, Record, claim, run_claims

__all__ = ["CLAIMS", "Record", "claim", "run_claims"]
