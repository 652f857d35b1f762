r"""Reports of a run: the summary rows, the comparison table (markdown and rich), and the PNG plots.

Columns, for a metric ``m`` (accuracy, or perplexity for generation):

- ``global m``: the global model on the test set after the last round (none for personalised methods:
  FedSA-LoRA's global model, the shared ``A`` with ``B = 0``, is no client's model);
- ``m @ val-best``: the test score of the round with the best score on the validation split (taken
  from the training data), so no choice is made on the test set;
- ``local m``: the mean over clients of the model each client downloads (its rank's truncation,
  redistribution or mask, as the method sends it), each on the client's own held-out set;
- ``personal m``: the same for personalised methods (FedSA-LoRA), with each client's own ``B`` and head;
- ``by rank``: the model each distinct client rank downloads, on the test set;
- classification, after those: ``global macro-F1`` and ``local macro-F1`` / ``personal macro-F1``, the same
  models' macro-F1 (:func:`~lowrank_fed.llm.evaluate.macro_f1`) on the same examples (final round); model
  selection (``@ val-best``) stays on accuracy;
- with ``[[attacks]]``: ``benign clients' m``, the mean of ``local``/``personal`` over the benign
  clients only, and for methods that flag clients (CLAIR) the last round's flag precision and recall
  against the truth.
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["summary_row", "summary_markdown", "summary_table", "add_verdict", "verdict_lines", "write_plots",
           "per_example_correct"]

_SHORT = {"accuracy": "acc", "perplexity": "ppl"}


def summary_row(method, history: list[dict], timings: list[dict], metric: str, *, adapted_params: int | None = None) -> dict:
    r"""One method's summary from its per-round history (scores) and timings.

    ``upload_vs_full`` is the parameters uploaded over the run divided by what full fine-tuning of the same
    modules would upload, ``sum_uploads sum_m d_out d_in`` (``adapted_params`` per upload);
    ``aggregation_error`` the mean over rounds of the rounds' ``aggregation_error``
    (:mod:`lowrank_fed.llm.methods.exactness`; None for a method without a global adapter).
    """
    evals = [h for h in history if metric in h]
    final = history[-1]
    row = {"method": method.name, "title": method.title, "metric": metric, "personalised": method.personalised,
           "initial": history[0].get(metric), "final": final.get(metric), "rounds": final["round"],
           "mb_up": sum(h["bytes_up"] for h in history) / 1e6, "mb_down": sum(h["bytes_down"] for h in history) / 1e6,
           "dropped": sum(h["dropped"] for h in history),
           "params_up": sum(h.get("params_up", 0) for h in history)}
    uploads = sum(len(h.get("clients", [])) for h in history)
    errors = [h["aggregation_error"] for h in history if h.get("aggregation_error") is not None]
    # the mean over rounds of how far the global adapter is from the weighted mean of what clients trained
    row["aggregation_error"] = sum(errors) / len(errors) if errors else None
    if adapted_params and uploads:
        row["upload_vs_full"] = row["params_up"] / (uploads * adapted_params)
    if not method.scores_global:
        # Its global model (FedSA: shared A, B = 0, the initial head) is no client's model: no global score.
        row["final"] = None
    scored = [h for h in evals if f"val_{metric}" in h and h["round"] > 0]
    if scored and method.scores_global:
        pick = (max if metric == "accuracy" else min)(scored, key=lambda h: (h[f"val_{metric}"], -h["round"]))
        row.update(selected_round=pick["round"], selected=pick[metric], selected_val=pick[f"val_{metric}"])
    row["local" if not method.personalised else "personal"] = final.get(f"local_{metric}")
    row["by_rank"] = {r: v[metric] for r, v in final.get("by_rank", {}).items()}
    if "macro_f1" in final or "local_macro_f1" in final:  # classification: macro-F1 beside accuracy
        row["macro_f1"] = final.get("macro_f1") if method.scores_global else None
        row["local_macro_f1" if not method.personalised else "personal_macro_f1"] = final.get("local_macro_f1")
    if final.get("test_correct") is not None and method.scores_global:
        row["test_correct"] = final["test_correct"]  # for the verdict's paired standard error (add_verdict)
    if f"benign_local_{metric}" in final:
        row["benign"] = final[f"benign_local_{metric}"]
    if "benign_local_token_accuracy" in final:
        row["benign_token_accuracy"] = final["benign_local_token_accuracy"]
    detected = [h["detection"] for h in history if "detection" in h]
    if detected:
        row["precision"], row["recall"] = detected[-1]["precision"], detected[-1]["recall"]
    for key in ("seconds", "train_seconds", "server_seconds"):
        row[key] = sum(t.get("wall_seconds" if key == "seconds" else key, 0.0) for t in timings)
    if "rouge_l" in final:
        row["rouge_l"], row["rouge_l_initial"] = final["rouge_l"], history[0].get("rouge_l")
    return row


def per_example_correct(packed: str, n: int):
    """Per-example correctness from ``packed`` (hex of ``np.packbits``), length ``n``; None if it does not fit."""
    import numpy as np

    try:
        bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), dtype=np.uint8))
    except ValueError:
        return None
    return bits[:n].astype(np.float64) if len(bits) >= n > len(bits) - 8 else None


def add_verdict(summary: list[dict], n_test: int) -> dict | None:
    r"""Rank the methods on the headline metric (the global model's final test score) and say if the lead is noise.

    One run is one seed on ``n_test`` test examples. For accuracy each method's standard error is
    ``sqrt(p (1 - p) / N)``. The best and the runner-up are scored on the same examples, so the margin's standard
    error is the paired one, ``std(c_best - c_next, ddof=1) / sqrt(N)`` from the per-example correctness ``c``
    (``test_correct`` in the rows; removed here); without it, the unpaired ``sqrt(se_best^2 + se_next^2)``, an
    upper bound when the two models err on the same examples more often than by chance, and ``paired`` is False.
    A margin of at most two such standard errors is a tie within noise (``tie``), never a win. For perplexity
    no standard error is computed (``se_difference`` None) and ``tie`` is None unless the scores are equal.

    Every row gets ``standard_error`` (None for perplexity or without a global score); the facts are returned and
    stored in the best row as ``verdict``: ``metric``, ``higher_is_better``, ``best``, ``best_score``,
    ``runner_up``, ``runner_up_score``, ``margin`` (>= 0, in the metric's units), ``se_difference``, ``paired``,
    ``tie``, ``n_test``, ``seeds`` (1), ``not_ranked`` (methods without a global score). None when no method has
    a global score; with one, only ``best`` and ``best_score`` (``runner_up`` None).
    """
    correct = {r["method"]: r.pop("test_correct", None) for r in summary}
    if not summary:
        return None
    metric = summary[0]["metric"]
    accuracy = metric == "accuracy"
    for r in summary:
        p = r.get("final")
        r["standard_error"] = math.sqrt(p * (1 - p) / n_test) if accuracy and p is not None and n_test > 0 else None
    scored = [r for r in summary if r.get("final") is not None]
    if not scored:
        return None
    higher = metric != "perplexity"
    ranked = sorted(scored, key=lambda r: -r["final"] if higher else r["final"])  # stable: config order on ties
    best = ranked[0]
    facts = {"metric": metric, "higher_is_better": higher, "best": best["method"], "best_title": best["title"],
             "best_score": best["final"], "runner_up": None, "runner_up_title": None, "runner_up_score": None,
             "margin": None, "se_difference": None, "paired": None, "tie": None, "n_test": n_test, "seeds": 1,
             "not_ranked": [r["method"] for r in summary if r.get("final") is None]}
    if len(ranked) > 1:
        nxt = ranked[1]
        margin = abs(best["final"] - nxt["final"])
        facts.update(runner_up=nxt["method"], runner_up_title=nxt["title"], runner_up_score=nxt["final"],
                     margin=margin)
        if accuracy:
            a, b = (per_example_correct(correct[r["method"]], n_test) if correct[r["method"]] else None for r in (best, nxt))
            if a is not None and b is not None and n_test > 1:
                se = float((a - b).std(ddof=1) / math.sqrt(n_test))
                facts["paired"] = True
            else:
                se = math.sqrt(best["standard_error"] ** 2 + nxt["standard_error"] ** 2)
                facts["paired"] = False
            facts["se_difference"] = se
            facts["tie"] = bool(margin == 0 or margin <= 2 * se)
        elif margin == 0:
            facts["tie"] = True
    best["verdict"] = facts
    return facts


def verdict_lines(summary: list[dict]) -> list[str]:
    """The verdict of :func:`add_verdict` (stored in the best row) in words; ``[]`` when there is none."""
    facts = next((r["verdict"] for r in summary if r.get("verdict")), None)
    if facts is None:
        return []
    metric, n = facts["metric"], facts["n_test"]
    word = ("best" if facts["higher_is_better"] else "lowest") + f" global {metric}"
    lines = []
    if facts["runner_up"] is None:
        lines.append(f"Verdict: only {facts['best_title']} has a global {metric} ({facts['best_score']:.4f}); "
                     f"nothing to compare it with.")
    else:
        above = "above" if facts["higher_is_better"] else "below"
        lead = (f"{facts['best_title']} has the {word}, {facts['best_score']:.4f}, {facts['margin']:.4f} {above} "
                f"the runner-up {facts['runner_up_title']} ({facts['runner_up_score']:.4f})")
        se = facts["se_difference"]
        how = ("paired over the same test examples" if facts["paired"] else
               "unpaired bound: per-example results were not stored")
        if facts["tie"] and facts["margin"] == 0:
            lines.append(f"Verdict: a tie: {facts['best_title']} and {facts['runner_up_title']} have the same "
                         f"global {metric}, {facts['best_score']:.4f}.")
        elif se is None:
            lines.append(f"Verdict: {lead}; no standard error is computed for {metric}, so whether this margin is "
                         f"more than noise is not known.")
        elif facts["tie"]:
            lines.append(f"Verdict: a tie within noise: {lead}, within 2 standard errors of the difference "
                         f"({se:.4f}, {how}); not a win.")
        else:
            lines.append(f"Verdict: {lead}, more than 2 standard errors of the difference ({se:.4f}, {how}).")
    best_row_se = next((r["standard_error"] for r in summary if r.get("verdict")), None)
    spread = (f"; each accuracy has a standard error of about {best_row_se:.3f} (sqrt(p(1-p)/N) at "
              f"p = {facts['best_score']:.3f})" if best_row_se is not None else "")
    lines.append(f"This is one seed on {n} test examples{spread}; other seeds can reorder close methods.")
    if facts["not_ranked"]:
        titles = ", ".join(r["title"] for r in summary if r["method"] in facts["not_ranked"])
        lines.append(f"Not ranked (no global model to score): {titles}.")
    return lines


def _fmt(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rank_range(row: dict) -> str:
    values = list(row["by_rank"].values())
    return f"{min(values):.3f}-{max(values):.3f}" if values else "-"


def _ranks(summary: list[dict]) -> list[str]:
    return sorted({k for r in summary for k in r["by_rank"]}, key=int)


def _rank_columns(summary: list[dict]):
    s = _SHORT.get(summary[0]["metric"], summary[0]["metric"]) if summary else "acc"
    return [("Method", lambda r: r["title"])] + [
        (f"rank {k} {s}", lambda r, k=k: _fmt(r["by_rank"].get(k))) for k in _ranks(summary)]


def _columns(summary: list[dict]):
    metric = summary[0]["metric"] if summary else "accuracy"
    s = _SHORT.get(metric, metric)
    cols = [("Method", lambda r: r["title"]),
            (f"global {s}", lambda r: _fmt(r["final"])),
            (f"{s} @ val-best (round)", lambda r: f"{_fmt(r.get('selected'))} ({r.get('selected_round', '-')})"),
            (f"local {s}", lambda r: _fmt(r.get("local"))),
            (f"personal {s}", lambda r: _fmt(r.get("personal"))),
            (f"{s} by rank (min-max)", _rank_range)]
    if any("macro_f1" in r for r in summary):  # classification: after accuracy's columns
        cols += [("global macro-F1", lambda r: _fmt(r.get("macro_f1"))),
                 ("local macro-F1", lambda r: _fmt(r.get("local_macro_f1"))),
                 ("personal macro-F1", lambda r: _fmt(r.get("personal_macro_f1")))]
    if any("benign" in r for r in summary):
        cols.append((f"benign clients' {s}", lambda r: _fmt(r.get("benign"))))
    if any("benign_token_accuracy" in r for r in summary):
        cols.append(("benign clients' token acc", lambda r: _fmt(r.get("benign_token_accuracy"))))
    if any("precision" in r for r in summary):
        cols += [("flag precision", lambda r: _fmt(r.get("precision"), 2)),
                 ("flag recall", lambda r: _fmt(r.get("recall"), 2))]
    if any("rouge_l" in r for r in summary):
        cols.append(("ROUGE-L", lambda r: _fmt(r.get("rouge_l"))))
    if any(r.get("aggregation_error") is not None for r in summary):
        cols.append(("aggregation error (mean of rounds)",
                     lambda r: "-" if r.get("aggregation_error") is None else f"{r['aggregation_error']:.2e}"))
    cols += [("MB up", lambda r: f"{r['mb_up']:.2f}"), ("MB down", lambda r: f"{r['mb_down']:.2f}"),
             ("upload % of full FT", lambda r: f"{100 * r['upload_vs_full']:.2f}" if r.get("upload_vs_full") else "-"),
             ("dropped", lambda r: str(r["dropped"])), ("time s", lambda r: f"{r['seconds']:.1f}"),
             ("server %", lambda r: f"{100 * r['server_seconds'] / max(r['train_seconds'], 1e-12):.2f}")]
    return cols


def summary_markdown(summary: list[dict], facts: dict | None = None) -> str:
    """The comparison table as GitHub markdown, with the facts needed to read it."""
    cols = _columns(summary)
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r) for _, f in cols) + " |" for r in summary]
    lines.append("")
    if _ranks(summary):
        lines.append("The model each client rank downloads, on the test set (final round):")
        lines.append("")
        cols = _rank_columns(summary)
        lines += ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(f(r) for _, f in cols) + " |" for r in summary if r["by_rank"]]
        lines.append("")
    if summary and summary[0].get("initial") is not None:
        extra = f", ROUGE-L {summary[0]['rouge_l_initial']:.4f}" if summary[0].get("rouge_l_initial") is not None else ""
        lines.append(f"Untrained model: {summary[0]['metric']} {summary[0]['initial']:.4f}{extra}.")
    if facts:
        text = (f"Test set: {facts['eval_size']} examples; validation: {facts['val_size']} (from the training data); "
                f"per-client held-out sets: {min(facts['holdout_sizes'])}-{max(facts['holdout_sizes'])} examples.")
        if "majority_accuracy" in facts:
            text += f" Majority-class accuracy: {facts['majority_accuracy']:.4f}."
        lines.append(text)
    verdict = verdict_lines(summary)
    if verdict:
        lines += ["", *verdict]
    return "\n".join(lines) + "\n"


def summary_table(summary: list[dict], title: str = "lowrank-fed run", *, by_rank: bool = False):
    """The comparison table as a ``rich`` table (``by_rank``: the per-rank table instead)."""
    from rich.table import Table

    cols = _rank_columns(summary) if by_rank else _columns(summary)
    table = Table(title=title)
    for i, (c, _) in enumerate(cols):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in summary:
        if not by_rank or r["by_rank"]:
            table.add_row(*(f(r) for _, f in cols))
    return table


def write_plots(histories: dict[str, list[dict]], out_dir: str | Path, metric: str, *, title: str = "",
                majority: float | None = None, titles: dict[str, str] | None = None,
                personalised: set[str] = frozenset()) -> list[Path]:
    r"""PNG plots: the metric per round (global solid, local/personal dashed), per rank, train loss, vs MB moved.

    ``title`` (the config: model, data, clients, ranks, seed, eval size) heads every plot;
    ``majority`` draws the majority-class accuracy as a horizontal line; methods in ``personalised``
    get only their per-client (personal) curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir, titles = Path(out_dir), titles or {}
    paths = []

    def finish(fig, ax, name: str, xlabel: str, ylabel: str, integer_x: bool = True):
        if majority is not None and ylabel == metric:
            ax.axhline(majority, color="grey", linestyle=":", label=f"majority class ({majority:.3f})")
        if integer_x:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel.replace("_", " "))
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a plot with nothing labelled (no personalised row, say) has no legend
            ax.legend(fontsize=7)
        fig.tight_layout()
        path, tmp = out_dir / name, out_dir / f"{name}.tmp.png"  # written whole, then renamed into place
        fig.savefig(tmp, dpi=110, metadata={"Software": None})
        plt.close(fig)
        tmp.replace(path)
        paths.append(path)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, hist) in enumerate(histories.items()):
        color = f"C{i}"
        rows = [r for r in hist if metric in r]
        if name not in personalised:
            ax.plot([r["round"] for r in rows], [r[metric] for r in rows], marker="o", color=color,
                    label=f"{titles.get(name, name)} global")
        local = [r for r in hist if f"local_{metric}" in r]
        if local:
            ax.plot([r["round"] for r in local], [r[f"local_{metric}"] for r in local], linestyle="--", marker=".",
                    color=color, label=f"{titles.get(name, name)} {'personal' if name in personalised else 'per-client'}")
    finish(fig, ax, f"{metric}.png", "round", metric)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, hist) in enumerate(histories.items()):
        by_rank = next((r["by_rank"] for r in reversed(hist) if "by_rank" in r), None)
        if by_rank:
            ranks = sorted(by_rank, key=int)
            ax.plot([int(r) for r in ranks], [by_rank[r][metric] for r in ranks], marker="o", color=f"C{i}",
                    label=titles.get(name, name))
    ax.set_xscale("log", base=2)
    finish(fig, ax, "by_rank.png", "client rank (model it downloads, final round)", metric, integer_x=False)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, hist in histories.items():
        rows = [r for r in hist if r.get("train_loss") is not None]
        ax.plot([r["round"] for r in rows], [r["train_loss"] for r in rows], marker="o", label=titles.get(name, name))
    finish(fig, ax, "train_loss.png", "round", "train_loss")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, hist in histories.items():
        key = f"local_{metric}" if name in personalised else metric
        total, x, y = 0.0, [], []
        for r in hist:
            total += (r.get("bytes_up", 0) + r.get("bytes_down", 0)) / 1e6
            if r.get(key) is not None:
                x.append(total)
                y.append(r[key])
        ax.plot(x, y, marker="o", label=titles.get(name, name))
    finish(fig, ax, "communication.png", "cumulative MB (up + down)", metric, integer_x=False)
    return paths
