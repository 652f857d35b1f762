r"""The twins' agreement rule: a claim measured under both scale conventions is published only where both agree.

PEFT's scale ``s = lora_alpha / r`` makes the step size depend on the rank, so a comparison of methods whose
clients train at different ranks partly measures the scale convention. An experiment may therefore hold a config
and its **constant twin**: the same config with ``lora_scaling = "constant"`` (every client of every method at
``s = lora_alpha / r_ref``), named ``<stem>_constant`` (:data:`TWIN_SUFFIX`; ``hafl/freezing_constant.toml`` is the
twin of ``hafl/freezing.toml``). Every claim is analysed twice, on the originals' runs and on the twins' runs
(the same analysis, each twin's runs standing in for its original's; configs without a twin keep their runs), and
the published verdict is, with ``v_o`` the original's and ``v_c`` the twin's:

- ``v_o`` when only the original has runs (``v_c`` is "not run yet"), ``v_c`` when only the twin has; the note
  says which convention measured it and which twin has no runs, and the verdict cell ``"<convention> only"``
  where it gives no other reason;
- ``v_o`` when ``v_o = v_c``: the conventions agree;
- "not testable here" or "too few seeds" when either convention gives it (in that order): where one side cannot
  give a verdict there is nothing to agree on; a claim at the ceiling (a tie that even a perfect winner would not
  have won) counts as the tie it is, so it never outweighs the other convention's verdict, and a tie under both
  is published as the one with room to win where only one is at the ceiling;
- :data:`DEPENDS` ("depends on the scale convention") when both give a verdict (holds, tie, does not hold) and
  they differ: neither is published as the finding.

Both sets of numbers stay in the report: ``ours`` gives both, the twin's comparisons and per-seed values are added
with the prefix ``[constant]``, and the claim's ``twin`` entry (``report.json``) holds the twin's own analysis.
A claim that reads no config with a twin is left as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from .verdicts import CEILING, DEPENDS

if TYPE_CHECKING:
    from .analysis import Claim
    from .runs import Results

__all__ = ["TWIN_SUFFIX", "TWIN_SCALING", "ORIGINAL_SCALING", "twins", "twin_results", "publish"]

#: A config's constant twin is named ``<stem><TWIN_SUFFIX>``.
TWIN_SUFFIX = "_constant"
#: The scale conventions of a twin and of its original (the config default), as the report names them.
TWIN_SCALING = "constant"
ORIGINAL_SCALING = "alpha_over_r"
#: The verdicts that say no verdict could be given; either side's wins over agreement, in this order.
_UNDECIDED = ("not testable here", "too few seeds")


def twins(configs: Sequence[str]) -> dict[str, str]:
    """``{original: twin}`` for every config whose ``<stem>_constant`` is also one of ``configs``."""
    return {stem: stem + TWIN_SUFFIX for stem in configs if stem + TWIN_SUFFIX in configs}


def twin_results(results: Results, pairs: dict[str, str]) -> Results:
    """``results`` with each original's runs replaced by its twin's (an original whose twin has none: no runs);
    configs without a twin keep their runs."""
    out = dict(results)
    for original, twin in pairs.items():
        if results.get(twin):
            out[original] = results[twin]
        else:
            out.pop(original, None)
    return out


def _prefixed(claim: Claim) -> tuple[list[dict], dict[str, list]]:
    label = f"[{TWIN_SCALING}]"
    comparisons = [{**c, "against": f"{label} {c['against']}"} for c in claim.comparisons]
    return comparisons, {f"{label} {k}": v for k, v in claim.values.items()}


def _and(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def publish(original: Claim, twin: Claim, pairs: dict[str, str]) -> Claim:
    r"""The published claim from the original's analysis and the twin's (its ``configs`` already the twins' stems).

    See the module docstring for the rule. The result carries ``twin``: the twin's configs, convention, verdict and
    (where it ran) its ``ours``, note, comparisons and values.
    """
    mine = [s for s in original.configs if s in pairs]
    if not mine:
        return original
    theirs = [pairs[s] for s in mine]
    ran_o, ran_c = original.verdict != "not run yet", twin.verdict != "not run yet"
    entry = {"configs": theirs, "lora_scaling": TWIN_SCALING, "verdict": twin.verdict}
    if not ran_o and not ran_c:
        return replace(original, twin=entry)
    if not ran_c:  # the twin lacks runs, or (a twin that ran some methods) the runs of this claim's methods
        lacks = twin.ours.removeprefix("not run yet: ")
        lacks = lacks if lacks.startswith("no runs of ") else "no runs"
        return replace(original, twin=entry, why=original.why or f"{ORIGINAL_SCALING} only", note=_and(
            original.note, f"measured under lora_scaling = \"{ORIGINAL_SCALING}\" only: the constant twin "
            f"({', '.join(theirs)}) has {lacks}, so the scale conventions' agreement is not checked"))
    entry.update(ours=twin.ours, note=twin.note, why=twin.why, comparisons=twin.comparisons, values=twin.values)
    if not ran_o:
        return replace(twin, twin=entry, why=twin.why or f"{TWIN_SCALING} only", note=_and(
            twin.note, f"measured under lora_scaling = \"{TWIN_SCALING}\" only ({', '.join(theirs)}): the "
            f"{ORIGINAL_SCALING} original ({', '.join(mine)}) has no runs, so the conventions' agreement is not "
            "checked"))
    comparisons, values = _prefixed(twin)
    both = dict(ours=f"{ORIGINAL_SCALING}: {original.ours}; {TWIN_SCALING} ({', '.join(theirs)}): {twin.ours}",
                comparisons=[*original.comparisons, *comparisons], values={**original.values, **values},
                configs=(*original.configs, *theirs), twin=entry)
    # a tie at the ceiling (even a perfect winner would not have won) is a tie here: it never outweighs a verdict
    eo, ec = _agreeing(original), _agreeing(twin)
    if eo == ec:  # the same, or a tie under both: the one with room to win where only one is at the ceiling
        side = twin if original.why == CEILING and twin.verdict == "tie" else original
        return replace(original, **both, verdict=side.verdict, why=side.why,
                       advice=original.advice or twin.advice, note=_and(
                           original.note, f"both scale conventions agree ({ORIGINAL_SCALING} and {TWIN_SCALING}: "
                           f"{_word(original)})" if _word(original) == _word(twin) else
                           f"both scale conventions tie ({ORIGINAL_SCALING}: {_word(original)}, {TWIN_SCALING}: "
                           f"{_word(twin)})"))
    for word in _UNDECIDED:
        if word in (eo, ec):
            side = original if eo == word else twin
            return replace(original, **both, verdict=word, why=side.why, advice="", note=_and(
                original.note, f"{ORIGINAL_SCALING}: {_word(original)}, {TWIN_SCALING}: {_word(twin)}; "
                f"no verdict under one convention, so none is published"))
    return replace(original, **both, verdict=DEPENDS, advice="",
                   why=f"{ORIGINAL_SCALING}: {_word(original)}, {TWIN_SCALING}: {_word(twin)}",
                   note=_and(original.note, f"the scale conventions disagree ({ORIGINAL_SCALING}: {_word(original)}; "
                             f"{TWIN_SCALING}: {_word(twin)}): the claim depends on the scale convention, "
                             "so neither verdict is published"))


def _agreeing(claim: Claim) -> str:
    """The verdict the agreement rule compares: a claim at the ceiling (:data:`~.verdicts.CEILING`) counts as a
    tie, which it is (a tie that even a perfect winner would not have won)."""
    return "tie" if claim.why == CEILING else claim.verdict


def _word(claim: Claim) -> str:
    return "not testable here (at the ceiling)" if claim.why == CEILING else claim.verdict
