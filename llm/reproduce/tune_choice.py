r"""What ``lowrank-fed tune`` tunes and how it chooses: the parameter (:class:`Target`), the grid and its edge
extension (:func:`extend_value`), the choice (:func:`choose`) and its separation from the neighbours
(:func:`separation`). The rules, with their equations, are in :mod:`lowrank_fed.llm.tune`'s docstring."""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, RunConfig, same_run_keys
from ..methods import METHODS, method_options
from .runs import MAX_SEEDS

__all__ = ["Target", "resolve_param", "label", "extend_value", "choose", "separation", "DEFAULT_SEEDS", "LR_BOUNDS",
           "MAX_EXTENSIONS", "NOT_TUNED", "TUNE_SIGNATURE", "TUNE_LAYOUT", "SCORES", "SCORED_ON", "request_changes"]

#: Tuning seeds: from :data:`~.runs.MAX_SEEDS` up, never a seed a reproduction reports.
DEFAULT_SEEDS = (MAX_SEEDS, MAX_SEEDS + 1, MAX_SEEDS + 2)
#: The range an edge extension of ``lr`` may not leave.
LR_BOUNDS = (1e-6, 1.0)
#: Values added beyond the grid's edges per method, at most (default of ``--max-extensions``).
MAX_EXTENSIONS = 3
#: Run-wide keys that are not tuned: the seed (the tune's own), what the validation or test split is, the scoring.
NOT_TUNED = ("seed", "val_size", "eval_size", "eval_every", "rouge_size", "max_new_tokens", "threads", "workers")
#: The names that mark a folder as a tune's (``plan_output``), and what else it holds.
TUNE_SIGNATURE = ("tune.json", "trials")
TUNE_LAYOUT = ("tuned.toml", "tune.md")
#: The score: ``metric`` is the task's (val_accuracy, or val_perplexity for generation); ``loss`` is val_loss.
SCORES = ("metric", "loss")
#: What ``--score-on`` scores: the global model (personalised methods: their own models), or every client's download.
SCORED_ON = ("global", "downloads")


def request_changes(earlier: Mapping[str, Any], request: Mapping[str, Any]) -> list[str]:
    """The keys of tune ``request`` whose values differ from an ``earlier`` one's (its ``tune.json``), which make
    the earlier trials another tune's. The config's path may be spelled otherwise, and its execution keys
    (``workers``, ``checkpoint``: how a run is computed, never what) may change; nothing else may."""
    def comparable(r: Mapping[str, Any]) -> dict[str, Any]:
        data = r.get("config_data")
        return {**r, "config_data": same_run_keys(data) if isinstance(data, dict) else data}

    before, now = comparable(earlier), comparable(request)
    return [k for k in now if k != "config" and before.get(k) != now[k]]


# ----------------------------------------------------------------------------- what is tuned


@dataclass(frozen=True)
class Target:
    r"""What ``--param`` names: a method option (``[method] option``) or a run-wide key.

    Attributes
    ----------
    param : str
        As given (``lr``, ``clair.rank``, ``local_steps``).
    option : str
        The option or key name.
    method : str or None
        The one method a ``METHOD.OPTION`` parameter belongs to.
    run_wide : bool
        A top-level config key (tuned for one method at a time; written at the top of ``tuned.toml``).
    """

    param: str
    option: str
    method: str | None = None
    run_wide: bool = False

    def where(self, method: str) -> str:
        """How the value is set for ``method``, as a config reads: ``[fedit] lr`` or ``local_steps``."""
        return self.option if self.run_wide else f"[{method}] {self.option}"

    def apply(self, data: dict, method: str, value: Any) -> dict:
        """A copy of the config dict ``data`` with the value set for ``method``."""
        out = copy.deepcopy(data)
        if self.run_wide:
            out[self.option] = value
        else:
            table = out.get(method)
            out[method] = {**(table if isinstance(table, Mapping) else {}), self.option: value}
        return out

    def current(self, data: dict, method: str) -> Any:
        """The value the config gives (the method's table, else the run's ``lr`` for ``lr``, else the default)."""
        table = data.get(method) if isinstance(data.get(method), Mapping) else {}
        if not self.run_wide and self.option in table:
            return table[self.option]
        if self.run_wide or self.option == "lr":
            return data.get(self.option, RunConfig.model_fields[self.option].default)
        return method_options(method).model_fields[self.option].default


def _numeric_field(name: str) -> bool:
    annotation = RunConfig.model_fields[name].annotation
    return annotation in (int, float)


def resolve_param(param: str, requested: list[str] | None, default: list[str]) -> tuple[Target, list[str]]:
    r"""The :class:`Target` of ``--param`` and the methods it is tuned for.

    ``requested`` are the methods ``--methods`` names (None: not given), ``default`` the config's; a
    ``METHOD.OPTION`` parameter is tuned for ``METHOD`` alone.

    Raises
    ------
    ConfigError
        An unknown method or option, an option only some of the methods have, a run-wide key that is not numeric
        or is one of :data:`NOT_TUNED`, or a run-wide key with more than one method.
    """
    if "." in param:
        method, option = param.split(".", 1)
        if method not in METHODS:
            raise ConfigError(f"--param '{param}': unknown method '{method}'; expected METHOD.OPTION with METHOD one "
                              f"of {', '.join(METHODS)}.")
        options = [o for o in method_options(method).model_fields]
        if option not in options:
            raise ConfigError(f"--param '{param}': [{method}] has no option '{option}'; its options: "
                              f"{', '.join(options) or 'none'}.")
        if requested and requested != [method]:
            raise ConfigError(f"--param '{param}' is an option of [{method}] only; got --methods {' '.join(requested)} "
                              f"(leave --methods out, or give --methods {method}).")
        return Target(param, option, method=method), [method]
    methods = list(requested or default)
    having = [m for m in methods if param in method_options(m).model_fields]
    if having and len(having) == len(methods):
        return Target(param, param), methods
    if having:
        others = [m for m in methods if m not in having]
        raise ConfigError(f"--param '{param}' is an option of {', '.join(f'[{m}]' for m in having)} but not of "
                          f"{', '.join(f'[{m}]' for m in others)}; use --param METHOD.{param} or --methods.")
    if param in RunConfig.model_fields and param != "method_options":
        if param in NOT_TUNED or not _numeric_field(param):
            why = ("it defines the tune itself (its seeds, the validation or test split, the scoring)"
                   if param in NOT_TUNED else "only numeric run-wide keys and method options are tuned")
            raise ConfigError(f"--param '{param}': cannot be tuned: {why}.")
        if len(methods) != 1:
            raise ConfigError(f"--param '{param}' is a run-wide key: tune it for one method at a time (--methods "
                              f"NAME; got {len(methods)} methods: {', '.join(methods)}); its choice is written at "
                              "the top of tuned.toml.")
        return Target(param, param, run_wide=True), methods
    options = sorted({o for m in methods for o in method_options(m).model_fields})
    numeric = [k for k in RunConfig.model_fields if k not in NOT_TUNED and k != "method_options" and _numeric_field(k)]
    raise ConfigError(f"--param '{param}': unknown; expected a method option ({', '.join(options)}), METHOD.OPTION, "
                      f"or a numeric run-wide key ({', '.join(numeric)}).")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def label(value: Any) -> str:
    """A value as TOML writes it (``0.002``, ``16``, ``true``, ``"svd"``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def _folder_name(target: Target, value: Any) -> str:
    return re.sub(r"[^\w.+=-]", "_", f"{target.param}={label(value).strip(chr(34))}")


def extend_value(edge: Any, neighbour: Any, *, geometric: bool, integer: bool) -> Any:
    r"""The value one step beyond ``edge``, away from ``neighbour``.

    ``edge * (edge / neighbour)`` (the same ratio) when ``geometric``, else ``edge + (edge - neighbour)`` (the same
    step); rounded to 6 significant digits, or to an integer (at least one away from ``edge``) when ``integer``.

    >>> extend_value(0.02, 0.005, geometric=True, integer=False), extend_value(0.002, 0.005, geometric=True, integer=False)
    (0.08, 0.0008)
    >>> extend_value(8, 4, geometric=True, integer=True), extend_value(0.0, 0.5, geometric=False, integer=False)
    (16, -0.5)
    """
    new = edge * (edge / neighbour) if geometric else edge + (edge - neighbour)
    if integer:
        step = 1 if edge > neighbour else -1
        rounded = int(round(new))
        return rounded if rounded != edge else edge + step
    return float(f"{new:.6g}")


# ----------------------------------------------------------------------------- statistics


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _se_of_mean(values: list[float]) -> float | None:
    """``sd(values, ddof=1) / sqrt(n)``; None for one value."""
    n = len(values)
    if n < 2:
        return None
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)


def same_mean(a: float, b: float) -> bool:
    """Whether two means are equal up to rounding, ``|a - b| <= 1e-9 max(1, |a|, |b|)``: means of the same counts
    summed in another order (0.07 + 0.08 + 0.075 against 0.095 + 0.065 + 0.065) differ in the last bit, and no
    tie-break may turn on that; accuracies that differ by one validation example differ by ``1 / (S N)``."""
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def choose(means: dict[Any, float], order: list[Any], higher_is_better: bool) -> Any:
    """The value with the best mean; equal means (:func:`same_mean`): the first in ``order`` (the smaller value of a
    sorted grid)."""
    best = None
    for v in order:
        if best is None or (not same_mean(means[v], means[best])
                            and (means[v] > means[best] if higher_is_better else means[v] < means[best])):
            best = v
    return best


def separation(chosen: list[float], other: list[float], *, higher_is_better: bool, accuracy: bool,
               n_val: int | None) -> dict:
    r"""Whether the chosen value's scores beat ``other``'s by more than a standard error.

    ``d_s = +-(chosen_s - other_s)`` over the ``S`` seeds (positive when the chosen value is better), ``dbar`` their
    mean. Standard error of ``dbar``:

    - paired over seeds: ``se_seeds = sd(d, ddof=1) / sqrt(S)`` (``S >= 2``);
    - for accuracy, also over seeds x validation examples: ``se_examples = sqrt(p (1 - p) / (S N) + q (1 - q) / (S N))``
      with ``p``, ``q`` the two mean accuracies and ``N`` = ``n_val`` (unpaired binomial);
    - ``se`` is the larger of the two that exist (two seeds that happen to agree give ``se_seeds = 0``; a few
      examples give a large ``se_examples``), None when neither does (one seed, not accuracy).

    ``separated = dbar > se`` (False when ``se`` is None).

    >>> separation([0.8, 0.7, 0.9], [0.5, 0.6, 0.4], higher_is_better=True, accuracy=True, n_val=50)["separated"]
    True
    >>> separation([0.8, 0.6], [0.7, 0.7], higher_is_better=True, accuracy=True, n_val=50)["separated"]
    False
    >>> separation([0.3, 0.3], [0.2, 0.2], higher_is_better=True, accuracy=True, n_val=30)["se_from"]
    'seeds x validation examples'
    """
    sign = 1.0 if higher_is_better else -1.0
    d = [sign * (a - b) for a, b in zip(chosen, other, strict=True)]
    dbar = _mean(d)
    candidates = {}
    if (se_seeds := _se_of_mean(d)) is not None:
        candidates["paired over seeds"] = se_seeds
    if accuracy and n_val:
        p, q, n = _mean(chosen), _mean(other), len(d) * n_val
        candidates["seeds x validation examples"] = math.sqrt(p * (1 - p) / n + q * (1 - q) / n)
    how, se = max(candidates.items(), key=lambda kv: kv[1]) if candidates else ("none (one seed, not accuracy)", None)
    return {"difference": dbar, "se": se, "se_from": how, "se_seeds": se_seeds, "separated": se is not None and dbar > se}


@dataclass
class _MethodTune:
    method: str
    grid: list[Any]
    values: list[Any]
    numeric: bool
    integer: bool
    scores: dict[str, dict[int, dict]] = field(default_factory=dict)  # label -> seed -> trial scores
    extensions: list[dict] = field(default_factory=list)
    stopped: str | None = None
    cuts: dict[str, dict] = field(default_factory=dict)  # label -> {"threshold", "n_scores"}: calibrated per value


def _score_key(score: str, scores: dict, method: str, *, contaminated: bool = False,
               downloads: bool = False) -> tuple[str, bool]:
    """The key of a trial's ``scores`` that is compared, and whether higher is better: the global model's
    ``val_<metric>`` (``val_loss``), or for a personalised method (``local``, FedSA-LoRA, CLAIR and its references:
    each client uses its own model) the mean over clients of each client's own model on its share of the validation
    rows: over the benign clients where the setting has ``contaminated`` ones (``val_benign_local_<metric>``: the
    claims compare what benign clients get, and a baseline tuned on them can only be stronger), else over every
    client (``val_local_<metric>``): a personalised method is tuned on what its clients receive, as its claims
    score it. ``downloads`` (``--score-on downloads``): every method so, its clients' downloads where it is not
    personalised (a truncation's: what its no-drop claim compares)."""
    prefix = "val_"
    if METHODS[method].personalised or downloads:
        prefix = "val_benign_local_" if contaminated else "val_local_"
    if score == "loss":
        key, higher = prefix + "loss", False
    elif prefix + "accuracy" in scores:
        key, higher = prefix + "accuracy", True
    else:
        key, higher = prefix + "perplexity", False
    if key not in scores:
        raise ConfigError(f"{method}: the trials have no validation score {key!r} (they have {sorted(scores)}).")
    return key, higher
