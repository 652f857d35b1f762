r"""What every reproduction's claims are made of: a claim (:class:`Claim`), an experiment (:class:`Experiment`), and
the helpers that read paired per-seed numbers out of finished runs (:class:`~.runs.Run`).

Every claim is read from paired per-seed differences (:mod:`.verdicts`): the claimed winner minus **each**
baseline on the same seed (same split, partition and batches), a drop, a saving. :func:`_decide` turns a claim's
comparisons into its verdict (:func:`~.verdicts.combine`); :func:`_not_run` says "not run yet" instead of a fake
verdict; :func:`_take` pairs configs by the seeds they all have. Where a claim is measured under both scale
conventions (a config and its ``_constant`` twin), :meth:`Experiment.claims` publishes the verdict both agree on
(:mod:`.twins`).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..config_files import tuned_paths
from ..methods import METHODS, method_options
from .chance import _above_majority, _at_ceiling, _near_chance, _perfect  # noqa: F401  (importable from here)
from .runs import Results, Run
from .twins import _and, publish, twin_results, twins
from .verdicts import CEILING, advice, combine, example_se, mean_sd, paired

__all__ = ["Claim", "Experiment", "UNTUNED", "describe", "model_params"]


@dataclass(frozen=True)
class Claim:
    r"""A claim, the paper's number, ours (text), the verdict, a note; ``values``: label -> per-seed numbers;
    ``comparisons``: the paired comparisons the verdict combines (:func:`~.verdicts.paired`); ``advice``:
    :data:`~.verdicts.ADD_SEEDS` for a tie on fewer than 5 seeds."""

    claim: str
    paper: str
    ours: str
    verdict: str
    note: str = ""
    values: dict[str, list] = field(default_factory=dict)
    comparisons: list[dict] = field(default_factory=list)
    advice: str = ""
    #: the configs whose runs the claim reads; whether its outcome depends on training (a learning rate)
    configs: tuple[str, ...] = ()
    trained: bool = True
    #: why it is "not testable here" (or which convention measured it, or how the conventions disagree), in a few
    #: words for the verdict cell
    why: str = ""
    #: the constant twin's analysis, for a claim that reads a config with a twin (:func:`~.twins.publish`)
    twin: dict | None = None

    def to_dict(self) -> dict:
        """The claim as JSON would read it back (``configs`` a list; ``twin`` only where there is one)."""
        out = {**asdict(self), "configs": list(self.configs)}
        if out["twin"] is None:
            del out["twin"]
        return out


#: The verdict cell's reason for a claim whose runs used a learning rate chosen for another setting.
UNTUNED = "learning rate not tuned for this setting"


@dataclass(frozen=True)
class Experiment:
    r"""A reproduction: its configs (stems of ``configs/reproduce/<name>/*.toml``) and its claims' analysis.

    ``differences`` says how the experiment differs from the paper; ``{stem.key}`` (``{minilm_bbc.local_steps}``,
    ``{dir001_r1.method_options.fedit.lr}``) is filled from that config's runs' own ``config.json``
    (:func:`describe`), so the text never states a setting the runs did not use.

    ``tuned`` lists the configs whose learning rates were chosen on validation data **for their own setting**
    (None: every config's, as its header says). A config whose TOML has a ``tuned`` key (the choice of
    ``lowrank-fed tune`` for that config) counts as tuned too. A claim on training outcomes that reads any other
    config is "not testable here" (:data:`UNTUNED`, :meth:`claims`); counts of bytes or parameters are not.
    """

    name: str
    title: str
    paper: str
    configs: tuple[str, ...]
    differences: str
    analyse: Callable[[Results], list[Claim]]
    tuned: tuple[str, ...] | None = None

    def untuned(self, config_root, results: Results | None = None) -> set[str]:
        """The configs whose learning rates were not chosen for their own setting (see the class docstring)."""
        return set(self._untuned_reasons(config_root, results))

    def _untuned_reasons(self, config_root, results: Results | None) -> dict[str, str]:
        r"""Config stem -> why its runs' rates are not chosen for it (``""``: it reuses another setting's rates).

        A config whose TOML names tuned files (``tuned = ...``, :func:`lowrank_fed.llm.tune.tune`'s choices) is
        checked against ``results``, whatever :attr:`tuned` says: each of its runs must have been made at the
        values those files hold (an option the run does not set reads its default; a method's ``lr`` falls back on
        the run's ``lr``), and the files must hold a table for every method of the run (``local`` included: tune
        scores a personalised method on its clients' own models, ``val_local_<metric>``).
        Runs of the config from before it was linked, or a method left out of its tune, make it untuned. Any other
        config is tuned when :attr:`tuned` is None or lists it, else untuned (it reuses another setting's rates).
        """
        out = {}
        for stem in self.configs:
            path = Path(config_root) / self.name / f"{stem}.toml"
            if not (path.is_file() and "tuned" in tomllib.loads(path.read_text())):
                if self.tuned is not None and stem not in self.tuned:
                    out[stem] = ""
                continue
            runs = (results or {}).get(stem, {})
            if not runs:
                continue
            files = tuned_paths(path)
            chosen = {}
            for file in files:
                chosen.update(tomllib.loads(file.read_text()))
            named = f"{path.name} names {', '.join(_relative(f, path.parent) for f in files)}"
            for seed, run in sorted(runs.items()):
                why = _stale(run, chosen)
                if why:
                    out[stem] = f"{stem}'s runs were not made at its tuned values (seed {seed}: {why}; {named})"
                    break
        return out

    def claims(self, results: Results, config_root) -> list[Claim]:
        r""":attr:`analyse`, with every claim on training outcomes over an untuned config made "not testable here";
        where configs have constant twins (``<stem>_constant``), each claim analysed on both and published by the
        twins' agreement rule (:mod:`.twins`: the verdict both conventions agree on, else "depends on the scale
        convention"; where only one has runs, that one, and the note says which)."""
        untuned = self._untuned_reasons(config_root, results)
        first = self._marked(self.analyse(results), untuned)
        pairs = twins(self.configs)
        if not pairs:
            return first
        second = [replace(c, configs=tuple(pairs.get(s, s) for s in c.configs))
                  for c in self.analyse(twin_results(results, pairs))]
        second = self._marked(second, untuned)
        if [c.claim for c in first] != [c.claim for c in second]:
            raise ValueError(f"reproduce {self.name}: the analysis gives other claims on the constant twins' runs "
                             f"({[c.claim for c in second]}) than on the originals' ({[c.claim for c in first]}); "
                             "expected the same claims in the same order.")
        return [publish(a, b, pairs) for a, b in zip(first, second, strict=True)]

    def _marked(self, claims: list[Claim], untuned: dict[str, str]) -> list[Claim]:
        """Every claim on training outcomes over an ``untuned`` config (stem -> why) made "not testable here"
        (:data:`UNTUNED`)."""
        out = []
        for c in claims:
            bad = sorted(set(c.configs) & set(untuned))
            if c.trained and bad and c.verdict != "not run yet":
                reuse = [b for b in bad if not untuned[b]]
                why = ([f"{', '.join(reuse)} {'reuse' if len(reuse) > 1 else 'reuses'} the learning rates chosen "
                        f"for {', '.join(self.tuned or ()) or 'another setting'}"] if reuse else [])
                why += [untuned[b] for b in bad if untuned[b]]
                rest = c.note.removeprefix("not testable here: ")  # a claim already not testable: one prefix
                note = f"not testable here: {UNTUNED} ({'; '.join(why)})" + (
                    f"; and {rest}" if rest != c.note else f"; {c.note}" if c.note else "")
                c = Claim(c.claim, c.paper, c.ours, "not testable here", note, c.values, c.comparisons, "",
                          c.configs, c.trained, UNTUNED)
            out.append(c)
        return out


def _relative(file: Path, folder: Path) -> str:
    """``file`` as a config in ``folder`` names it (``tuned/x.toml``), else its full path."""
    file, folder = file.resolve(), folder.resolve()
    return file.relative_to(folder).as_posix() if file.is_relative_to(folder) else str(file)


def _stale(run: Run, chosen: dict) -> str:
    """Why ``run`` was not made at the ``chosen`` values (a tuned file's tables and keys, merged), or ``""``."""
    methods = run.config.get("methods", [])
    options = run.config.get("method_options", {})
    missing = [m for m in methods if m in METHODS and not isinstance(chosen.get(m), dict)]
    if missing:
        return f"{', '.join(missing)} not tuned (no [{missing[0]}] table)"
    for table, values in chosen.items():
        if not isinstance(values, dict):
            used = run.config.get(table)
            if used != values:
                return f"{table} = {used} (tuned: {values})"
            continue
        if table not in methods:
            continue  # a method this run does not have
        parsed = method_options(table)(**options.get(table, {}))  # what the run's [table] meant, defaults included
        for option, value in values.items():
            used = getattr(parsed, option)
            if option == "lr" and used is None:
                used = run.config.get("lr")  # a method without its own lr trains at the run's
            if used != value:
                return f"{table}.{option} = {used} (tuned: {value})"
    return ""


_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)((?:\.[A-Za-z0-9_]+)+)\}")


def _setting(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def describe(text: str, settings: dict[str, list[dict]]) -> str:
    r"""``text`` with every ``{stem.key.subkey}`` replaced by that value in the config dicts of ``settings[stem]``
    (one per seed; differing values are all given, ``a / b``).

    Raises
    ------
    KeyError
        A placeholder naming a config without settings or a key its config does not have.
    """
    def one(m: re.Match) -> str:
        stem, path = m.group(1), m.group(2)[1:].split(".")
        if not settings.get(stem):
            raise KeyError(f"describe: no settings of config '{stem}' for '{m.group(0)}'")
        values = []
        for cfg in settings[stem]:
            v = cfg
            for key in path:
                if not isinstance(v, dict) or key not in v:
                    raise KeyError(f"describe: config '{stem}' has no '{'.'.join(path)}' (for '{m.group(0)}')")
                v = v[key]
            if _setting(v) not in values:
                values.append(_setting(v))
        return " / ".join(values)
    return _PLACEHOLDER.sub(one, text)


def _ms(values: Sequence[float], digits: int = 3) -> str:
    s = mean_sd(values)
    return f"{s['mean']:.{digits}f}" + ("" if s["sd"] is None else f" ± {s['sd']:.{digits}f}")


def _decide(claim: str, paper: str, ours: str, comparisons: list[dict], note: str = "",
            values: dict[str, list] | None = None, *, untestable: str = "", configs: Sequence[str] = (),
            trained: bool = True, short: str = "no method above the majority class") -> Claim:
    """The claim with the combined verdict of its comparisons; comparisons at the ceiling
    (:func:`~.verdicts.paired`'s ``perfect``) make it "not testable here" where no other comparison ties or decides.
    ``untestable``: the reason it is not testable here, ``short`` that reason in a few words; ``configs``: the
    configs it reads; ``trained``: whether it is about training outcomes."""
    # a comparison at the ceiling is a tie that even a perfect winner would not have won: the claim is "not
    # testable here" only where every tie is one (a tie with room to win is a finding), never over a "does not hold"
    word = combine("tie" if c.get("ceiling") else c["verdict"] for c in comparisons)
    top = [c for c in comparisons if c.get("ceiling")]
    why = ""
    if untestable and word != "not run yet":
        word, why = "not testable here", short
        note = f"not testable here: {untestable}" + (f"; {note}" if note else "")
    elif word == "tie" and top and not any(c["verdict"] == "tie" for c in comparisons):
        word, why = "not testable here", CEILING
        note = f"not testable here: {_at_ceiling(top)}" + (f"; {note}" if note else "")
    elif top:
        note = _and(note, _at_ceiling(top))
    return Claim(claim, paper, ours, word, note, values or {}, comparisons,
                 advice(comparisons) if word not in ("not testable here", "not run yet") else "", tuple(configs),
                 trained, why)


def _not_run(claim: str, paper: str, missing: str, note: str = "", configs: Sequence[str] = ()) -> Claim:
    """A claim whose runs (or the numbers it needs from them) do not exist yet: no verdict, never a fake one."""
    return Claim(claim, paper, f"not run yet: {missing}", "not run yet", note, configs=tuple(configs))


def _take(results: Results, stems: Sequence[str]) -> dict[str, dict[int, Run]] | None:
    """The runs of ``stems`` on the seeds they all have (None when one has none): claims pair configs by seed."""
    if any(not results.get(s) for s in stems):
        return None
    common = set.intersection(*(set(results[s]) for s in stems))
    if not common:
        return None
    return {s: {k: results[s][k] for k in sorted(common)} for s in stems}


def _no_runs(results: Results, stems: Sequence[str]) -> str:
    """What is missing for a claim on ``stems``, for its "not run yet" text."""
    missing = [s for s in stems if not results.get(s)]
    return (f"no finished runs of {', '.join(missing)}" if missing
            else f"no seed that every one of {', '.join(stems)} has run")


def _read(results: Results, stems: Sequence[str], texts: Sequence[tuple[str, str]],
          build: Callable[..., list[Claim]]) -> list[Claim]:
    r"""``build(runs_1, ..., runs_k)``: the claims read from the runs of ``stems`` (one ``{seed: Run}`` per stem, on
    the seeds they all have, :func:`_take`); or, where one of them has no runs, each claim of ``texts`` (claim,
    paper's number) "not run yet" with what is missing (:func:`_not_run`), never a fake verdict."""
    taken = _take(results, stems)
    if taken is None:
        missing = _no_runs(results, stems)
        return [_not_run(*text, missing, configs=stems) for text in texts]
    return build(*(taken[s] for s in stems))


def _seeds(by_seed: dict[int, Run]) -> list[int]:
    return sorted(by_seed)


def _per_seed(by_seed: dict[int, Run], fn: Callable[[Run], float]) -> list[float]:
    return [float(fn(by_seed[s])) for s in _seeds(by_seed)]


def _final(method: str, key: str = "final") -> Callable[[Run], float]:
    return lambda run: run.summary[method][key]


def _last(run: Run, method: str) -> dict:
    """The method's last evaluated round."""
    return [h for h in run.history[method] if "per_client" in h or "by_rank" in h][-1]


def _titles(run: Run) -> dict[str, str]:
    return {m: row["title"] for m, row in run.summary.items()}


def _diff(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per seed ``a - b``."""
    return [x - y for x, y in zip(a, b, strict=True)]


def _against(scores: dict[str, list[float]], winner: str, baselines: Sequence[str], titles: dict[str, str], *,
             tol: float = 0.0, lower_is_better: bool = False, by_seed: dict[int, Run] | None = None,
             best: float | None = None) -> list[dict]:
    r"""``winner`` against each baseline, paired per seed (``winner - b``, or ``b - winner`` when lower is better).

    With ``by_seed`` (final global accuracy) each comparison also gets ``example_se``: per seed, the paired
    standard error over the test examples (:func:`~.verdicts.example_se`), when every run recorded them; the
    interval's spread is floored at them (:func:`~.verdicts.paired`). With ``best`` (the best score there is, 1 for
    an accuracy; higher is better) each is also made for a winner at ``best`` on every example (:func:`_perfect`):
    a tie that even it would not have won is "not testable here" (:func:`~.verdicts.paired`).
    """
    if best is not None and lower_is_better:
        raise ValueError("'best' is the best score of a higher-is-better claim; got lower_is_better=True.")
    def final(run: Run, m: str):  # the method's per-example correctness after its last round
        return _correct(run, run.history[m][-1].get("test_correct"))

    out = []
    for b in baselines:
        d = _diff(scores[b], scores[winner]) if lower_is_better else _diff(scores[winner], scores[b])
        out.append(paired(d, tol, against=titles.get(b, b), se=None if by_seed is None else _ses(
            by_seed, final, winner, b), perfect=None if best is None else _perfect(
            scores[b], by_seed, lambda run, b=b: final(run, b), best)))
    return out


def _correct(run: Run, packed: str | None):
    """A pass's per-example correctness over the run's test examples (``test_correct``, hex of ``numpy.packbits``)
    as floats; None when it was not recorded or does not fit ``eval_size``."""
    from ..runner.report import per_example_correct

    n = int(run.setup.get("eval_size", 0))
    return None if packed is None or n < 2 else per_example_correct(packed, n)


def _ses(by_seed: dict[int, Run], correct: Callable[[Run, str], object], a: str, b: str) -> list[float] | None:
    """Per seed the paired standard error over test examples of ``a - b``, from the per-example correctness
    ``correct(run, method)`` gives (0/1 per example, or a mean over clients' downloads); None when a run lacks it."""
    ses = []
    for s in _seeds(by_seed):
        ca, cb = (correct(by_seed[s], m) for m in (a, b))
        if ca is None or cb is None:
            return None
        ses.append(example_se(ca, cb))
    return ses


def _vs(comparisons: list[dict], digits: int = 3) -> str:
    """``vs X +0.091 [+0.050, +0.132]; ...``: each comparison's mean and interval."""
    def one(c):
        if c.get("kind") == "not run":
            return f"vs {c['against']} not run yet"
        if c.get("kind") == "proportion":
            return f"{c['against']} {c['k']}/{c['n']} [{c['low']:.2f}, {c['high']:.2f}]"
        if c.get("kind") == "exact":
            return f"vs {c['against']} " + ", ".join(f"{d:+.{digits}f}" for d in c["differences"]) + " (exact)"
        if c.get("kind") == "sign":
            return (f"vs {c['against']} {c['k_plus']} seeds for, {c['k_minus']} against "
                    f"(sign test p = {c['p_value']:.2f})")
        if c["low"] is None:
            return f"vs {c['against']} {c['mean']:+.{digits}f}"
        return f"vs {c['against']} {c['mean']:+.{digits}f} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}]"
    return "; ".join(one(c) for c in comparisons)


def model_params(run: Run) -> int:
    r"""Every parameter of the run's model, base and head (``setup.json``'s ``model_params``).

    Runs written before the runner recorded it get it from the model their config names
    (:func:`~lowrank_fed.llm.models.parameter_count`; packaged models only).
    """
    if run.setup.get("model_params"):
        return int(run.setup["model_params"])
    from ..models import parameter_count

    if not run.config.get("model"):
        raise ValueError("The run's setup.json has no 'model_params' and its config.json was not loaded; expected "
                         "a run folder with both (lowrank_fed.llm.reproduce.run.load_run).")
    labels = run.setup.get("label_names") if run.setup.get("task") == "classification" else None
    return parameter_count(run.config["model"], num_labels=len(labels) if labels else None)

