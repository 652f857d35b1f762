r"""Engine settings of a run on Flower (:class:`FlowerSettings`) and Flower's run config split into them and the
run config (:func:`split_run_config`). Neither changes a run's results; importing this module imports no Flower.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["FlowerSettings", "split_run_config"]


@dataclass(frozen=True)
class FlowerSettings:
    r"""Engine settings of a run on Flower (not part of the run config: they do not change the results).

    In Flower's run config (``[tool.flwr.app.config]``, ``flwr run --run-config``) they are the keys
    ``flower-<name>`` with ``-`` for ``_`` (``flower-round-timeout = 600.0``).

    Attributes
    ----------
    out : str
        Output folder; ``""``: ``runs/<name>`` (relative to the ServerApp's working folder).
    round_timeout : float
        Seconds a round waits for its replies; a node that has not answered by then is a dropped update. Also
        the longest a discovery query waits for a new node's answer.
    min_replies : int
        Replies a round needs (after the checks) to be aggregated; below it the global state is kept.
    start_timeout : float
        Seconds the ServerApp waits for a SuperNode of every client; if some client still has none by then, the
        run is refused (nothing written). The first round the ServerApp runs waits ``round_timeout +
        start_timeout`` for its replies: each node's first ClientApp also loads the model and the data.
    num_gpus : float
        GPUs per ClientApp in the simulation (0: CPU only).
    """

    out: str = ""
    round_timeout: float = 600.0
    min_replies: int = 1
    start_timeout: float = 120.0
    num_gpus: float = 0.0

    def __post_init__(self):
        checks = {"round_timeout": self.round_timeout > 0, "min_replies": self.min_replies >= 1,
                  "start_timeout": self.start_timeout >= 0, "num_gpus": self.num_gpus >= 0}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"Flower setting 'flower-{name.replace('_', '-')}' must be "
                                 f"{'>= 1' if name == 'min_replies' else 'positive' if name == 'round_timeout' else '>= 0'}. "
                                 f"Got {getattr(self, name)!r}.")

    def check(self, cfg) -> None:
        r"""Refuse settings the run ``cfg`` cannot satisfy: ``min_replies`` above the clients a round samples
        (``clients_per_round``, or ``clients``) would keep the global state every round.

        Raises
        ------
        ValueError
            Naming the setting, its bound and the value.
        """
        per_round = cfg.clients_per_round or cfg.clients
        if self.min_replies > per_round:
            where = (f"clients_per_round = {cfg.clients_per_round}" if cfg.clients_per_round else
                     f"clients = {cfg.clients}")
            raise ValueError(f"Flower setting 'flower-min-replies' (flower up --min-replies) must be at most the "
                             f"clients a round samples ({where}): with more, no round is ever aggregated. Got "
                             f"{self.min_replies}.")

    def to_flat(self) -> dict:
        """``{"flower-<name>": value}``: Flower's run-config form."""
        return {f"flower-{f.name.replace('_', '-')}": getattr(self, f.name) for f in fields(self)}


def split_run_config(flat) -> tuple[FlowerSettings, object]:
    r"""Flower's run config -> ``(FlowerSettings, RunConfig)``: ``flower-*`` keys are settings, the rest the run.

    Raises
    ------
    ConfigError
        A run-config key is invalid (named as ``lowrank-fed run`` names it).
    ValueError
        A ``flower-*`` key is unknown or out of range.
    """
    from ..config import RunConfig

    names = {f"flower-{f.name.replace('_', '-')}": f for f in fields(FlowerSettings)}
    settings, rest = {}, {}
    for key, value in dict(flat).items():
        if key.startswith("flower-"):
            if key not in names:
                raise ValueError(f"Unknown Flower setting {key!r}; expected one of {sorted(names)}.")
            f = names[key]
            settings[f.name] = float(value) if f.type in ("float", float) and not isinstance(value, bool) else value
        else:
            rest[key] = value
    return FlowerSettings(**settings), RunConfig.from_flat(rest)
