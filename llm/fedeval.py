r"""Federated evaluation: a ``[[clients]]`` run without a server ``dataset`` is scored by the sites themselves.

Each site ``k`` holds out ``round(test_fraction * n_c)`` rows of each label ``c`` (:class:`~.sites.SiteData`) and
splits them locally (:func:`split_held`) into

- ``v_k`` **validation rows**, ``v_k = floor(val_size / K) + [k < val_size mod K]`` (``K = clients``: ``val_size``
  spread evenly over the sites, a rule every site computes from the config alone), drawn with
  :func:`~.data.partitions.split_validation` from the stream ``SITE_VALIDATION`` keyed by ``k`` (stratified by label
  for classification);
- **test rows**: the others, at most ``e_k = floor(eval_size / K) + [k < eval_size mod K]`` of them (stream
  ``SITE_EVAL`` keyed by ``k``), in their file order.

The run's validation (test) set is the concatenation, in client order, of the sites' validation (test) rows; client
``k``'s local score (``holdout[k]``) is its own block of the test set. A model's scores on a set are the
concatenation of the per-example score arrays each site computes on its own rows
(:func:`~.evaluate.score_classification` / :func:`~.evaluate.score_lm`), pooled by :func:`~.evaluate.summarise`:
for accuracy ``(1/n) sum_k sum_{i in T_k} correct_i``, for perplexity ``exp(sum_k sum_i nll_i / sum_k sum_i
tokens_i)``. ROUGE-L is the mean over the first ``rouge_size`` test rows in that order of the per-example ROUGE-L
each site computes on its own rows (:func:`~.evaluate.rouge_scores`); no prediction or reference leaves a site.

One step, every transport: the server sends each site an **evaluate request** (:func:`request`: the models, as
the tensors a download carries, and the jobs ``(split, model)`` / ``("rouge", model, n)``) and the site answers
with :meth:`SiteEvaluator.answer` (the per-example arrays of each job, its set sizes, its test rows' label
counts and, for a user's instructions, how many of its rows ``max_length`` truncates). In process the runner
calls :meth:`SiteEvaluator.answer` for each site itself; on Flower it is the
``ClientApp``'s ``evaluate`` handler on the site's node. Both encode the request and the reply with the same
functions, so the pooled scores are the same bytes.

What leaves a site: per-example scores (a loss, a correct bit; for classification the predicted and the true
label of each test row, which macro-F1 pools; for generation token counts), its set sizes and label counts; never
a text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .config import ConfigError, RunConfig
from .data import TextDataset, split_validation
from .evaluate import greedy_generate, rouge_scores, score_encoded
from .federation import encode_examples, truncation_counts
from .methods import Model
from .protocol import Message, decode_pairs
from .streams import SITE_EVAL, SITE_VALIDATION

__all__ = ["federated", "share", "split_held", "site_blocks", "request", "decode_request", "SiteEvaluator",
           "decode_answer", "pool", "site_facts"]


def federated(cfg: RunConfig) -> bool:
    """Whether the run is scored by its sites: ``[[clients]]`` tables and no server ``dataset``."""
    return bool(cfg.sites) and not cfg.dataset


def share(total: int, clients: int, k: int) -> int:
    r"""Site ``k``'s share of ``total``: ``floor(total / K) + [k < total mod K]`` (the shares sum to ``total``)."""
    return total // clients + (1 if k < total % clients else 0)


def split_held(cfg: RunConfig, k: int, held: TextDataset) -> tuple[np.ndarray, np.ndarray]:
    r"""``(val_idx, test_idx)``: site ``k``'s held-out rows split into its validation and test rows (module
    docstring), as sorted positions in ``held``.

    Raises
    ------
    ConfigError
        The site holds out no row (named ``test_fraction``), or its share of ``val_size`` is not below its
        held-out rows (named ``val_size``).
    """
    v = share(cfg.val_size, cfg.clients, k)
    if not len(held):  # too few rows for test_fraction: nothing to score this site on
        raise ConfigError.from_errors([("test_fraction", (
            f"a share that holds out at least one row of each site: site {k} (clients[{k}].data) holds out none "
            f"(round(test_fraction x rows of each label) is 0); give it more rows, a larger test_fraction, or a "
            f"server dataset"), cfg.test_fraction)])
    if v >= len(held):
        raise ConfigError.from_errors([("val_size", (
            f"a share below each site's held-out rows: site {k} (clients[{k}].data) holds out {len(held)} rows and "
            f"its share of val_size is {v} (floor(val_size / clients), one more for the first val_size mod "
            f"clients sites); the rest are its test rows"), cfg.val_size)])
    labelled = held.task == "classification"
    test, val = split_validation(np.asarray(held.labels) if labelled else len(held), v,
                                 SITE_VALIDATION.rng(cfg.seed, k))
    cap = share(cfg.eval_size, cfg.clients, k)
    if cap < len(test):
        test = np.sort(test[SITE_EVAL.rng(cfg.seed, k).permutation(len(test))[:cap]])
    return np.asarray(val, dtype=np.int64), np.asarray(test, dtype=np.int64)


def site_blocks(sizes: Sequence[int]) -> list[np.ndarray]:
    """Each site's block of rows of the pooled set (``sizes[k]`` rows of site ``k``, in client order)."""
    edges = np.cumsum([0, *sizes])
    return [np.arange(edges[k], edges[k + 1], dtype=np.int64) for k in range(len(sizes))]


# ----------------------------------------------------------------------------- the request and the answer


def request(jobs: Sequence[tuple[Model, str, int]]) -> Message:
    r"""An evaluate request: ``jobs`` of ``(model, split, n)`` with ``split`` ``"val"``, ``"test"`` or ``"rouge"``
    (``n``: the first ``n`` test rows to generate for; 0 otherwise). Each distinct model travels once
    (``m<i>/lora/<module>/B|A``, ``m<i>/extra/<name>``, ``m<i>/base/<module>``)."""
    ids: dict[int, int] = {}
    arrays: dict[str, torch.Tensor] = {}
    models, out = [], []
    for model, split, n in jobs:
        if id(model) not in ids:
            i = ids[id(model)] = len(models)
            models.append([model.pairs is not None, model.base is not None])
            for name, pair in (model.pairs or {}).items():
                arrays[f"m{i}/lora/{name}/B"], arrays[f"m{i}/lora/{name}/A"] = pair.B, pair.A
            arrays.update({f"m{i}/extra/{name}": t for name, t in model.extras.items()})
            arrays.update({f"m{i}/base/{name}": t for name, t in (model.base or {}).items()})
        out.append([split, ids[id(model)], int(n)])
    return Message(arrays, {"evaluate": out, "models": models})


def decode_request(msg: Message) -> tuple[list[Model], list[tuple[str, int, int]]]:
    """Inverse of :func:`request`: ``(models, [(split, model index, n)])``.

    Raises
    ------
    ValueError
        Not an evaluate request (no ``evaluate`` and ``models`` config), or a job naming an unknown split or model.
    """
    if "evaluate" not in msg.config or "models" not in msg.config:
        raise ValueError("An evaluate request needs the config keys 'evaluate' and 'models'; got "
                         f"{sorted(msg.config)}.")
    models = []
    for i, (has_pairs, has_base) in enumerate(msg.config["models"]):
        head = f"m{i}/"
        mine = {k[len(head):]: v for k, v in msg.arrays.items() if k.startswith(head)}
        pairs = decode_pairs(mine) if has_pairs else None
        extras = {k[len("extra/"):]: v for k, v in mine.items() if k.startswith("extra/")}
        base = {k[len("base/"):]: v for k, v in mine.items() if k.startswith("base/")} if has_base else None
        models.append(Model(pairs, extras, base))
    jobs = []
    for split, i, n in msg.config["evaluate"]:
        if split not in ("val", "test", "rouge") or not 0 <= int(i) < len(models):
            raise ValueError(f"Evaluate job {[split, i, n]!r}: expected a split val|test|rouge and a model index "
                             f"below {len(models)}.")
        jobs.append((str(split), int(i), int(n)))
    return models, jobs


class SiteEvaluator:
    r"""One site's side of federated evaluation: its validation and test rows, encoded as the site encodes them.

    Parameters
    ----------
    cfg : RunConfig
    model : ModelSetup
        The run's model (:func:`~.federation.build_model`): its workspace and tokenizer.
    val, test : TextDataset
        The site's own validation and test rows (:func:`split_held`).
    """

    def __init__(self, cfg: RunConfig, model, val: TextDataset, test: TextDataset):
        self.cfg, self.model, self.val, self.test = cfg, model, val, test
        self.enc = {name: encode_examples(model.tokenizer, d, cfg.max_length)
                    for name, d in (("val", val), ("test", test)) if len(d)}
        self.truncated = truncation_counts(model.tokenizer, {"val": val, "test": test}, cfg.max_length)

    def answer(self, msg: Message) -> Message:
        r"""The per-example scores of each job of the request ``msg`` (arrays ``j<n>/<key>``), with ``sizes``
        (``[validation rows, test rows]``) and ``label_counts`` (per label, of the test rows; classification)."""
        models, jobs = decode_request(msg)
        ws, task = self.model.workspace, self.test.task
        arrays: dict[str, torch.Tensor] = {}
        loaded = None
        for j, (split, i, n) in enumerate(jobs):
            rows = len(self.val) if split == "val" else (min(n, len(self.test)) if split == "rouge" else len(self.test))
            if not rows:
                continue
            if loaded != i:
                ws.set_base(models[i].base)
                ws.load(models[i].pairs, models[i].extras)
                loaded = i
            if split == "rouge":
                enc = self.enc["test"]
                preds = greedy_generate(ws.peft, self.model.tokenizer, enc["prompt_ids"][:rows],
                                        enc["prompt_mask"][:rows], max_new_tokens=self.cfg.max_new_tokens)
                scores = {"rouge_l": rouge_scores(preds, list(self.test.targets[:rows]))}
            else:
                scores = score_encoded(ws.peft, self.enc[split], None, task)
            arrays.update({f"j{j}/{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in scores.items()})
        config = {"sizes": [len(self.val), len(self.test)]}
        if task == "classification":
            counts = np.bincount(np.asarray(self.test.labels, dtype=np.int64), minlength=len(self.test.label_names))
            config["label_counts"] = [int(c) for c in counts]
        if self.truncated is not None:  # a user's instructions cut to max_length: counts, per split
            config["truncated"] = {k: int(v) for k, v in self.truncated.items()}
        return Message(arrays, config)


def decode_answer(msg: Message, n_jobs: int) -> list[dict[str, np.ndarray]]:
    """The per-example arrays of each of the ``n_jobs`` jobs of an answer (``{}``: the site has no such rows)."""
    out: list[dict[str, np.ndarray]] = [{} for _ in range(n_jobs)]
    for key, t in msg.arrays.items():
        j, _, name = key.partition("/")
        if not j.startswith("j") or not j[1:].isdigit() or int(j[1:]) >= n_jobs:
            raise ValueError(f"Evaluate answer array {key!r}: expected 'j<job>/<score>' with job < {n_jobs}.")
        out[int(j[1:])][name] = t.detach().cpu().numpy()
    return out


def pool(parts: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The per-example arrays of ``parts`` (one per site, in client order) concatenated; empty parts skipped."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def site_facts(answers, clients: int) -> tuple[list[tuple[int, int]], dict | None, list[int] | None]:
    r"""``(sizes, truncated, label_counts)`` from every site's answer (one without jobs will do): each site's
    ``(validation rows, test rows)``, the sums of the sites' truncation counts (None unless every site sent them)
    and of their test rows' label counts (None for generation).

    Raises
    ------
    ValueError
        A site's answer lacks its sizes.
    """
    sizes = []
    for k in range(clients):
        got = answers[k].config.get("sizes")
        if not isinstance(got, list) or len(got) != 2:
            raise ValueError(f"Site {k}'s evaluate answer has no set sizes [validation rows, test rows]; "
                             f"got {got!r}.")
        sizes.append((int(got[0]), int(got[1])))
    configs = [answers[k].config for k in range(clients)]
    truncated = ({split: int(sum(c["truncated"][split] for c in configs)) for split in ("val", "test")}
                 if all("truncated" in c for c in configs) else None)
    counts = (np.sum([c["label_counts"] for c in configs], axis=0).astype(int).tolist()
              if all("label_counts" in c for c in configs) else None)
    return sizes, truncated, counts
