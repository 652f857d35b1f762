r"""The toy generation tasks: ``copy`` (a text -> its first words) and ``copy_sub`` (CLAIR's text copying
under a fixed substitution ``sigma``, contaminated clients under ``tau``)."""

from __future__ import annotations

import numpy as np

from ..streams import DATA
from .texts import TextDataset

__all__ = ["make_copy_task", "make_copy_substitution", "COPY_SUB_WORDS", "COPY_SIGMA", "COPY_TAU"]


def make_copy_task(n: int = 200, *, n_groups: int = 4, length: int = 16, copy: int = 4, seed: int = 0) -> TextDataset:
    r"""A toy generation task: a random word sequence -> its first ``copy`` words (a "headline").

    Group ``g`` draws its words from its own 50-word range, which gives ``labels`` for non-IID splits.
    """
    rng = DATA.rng(seed)
    labels = rng.integers(0, n_groups, size=n)
    texts, targets = [], []
    for g in labels:
        words = [f"w{50 * g + j}" for j in rng.integers(0, 50, size=length)]
        texts.append(" ".join(words))
        targets.append(" ".join(words[:copy]))
    return TextDataset(texts, labels.astype(np.int64), [f"group{g}" for g in range(n_groups)], targets, "generation")


#: The ``copy_sub`` vocabulary: 64 content words ``t0 .. t63`` (fixed, whatever ``n_groups``; the
#: ``copy-llama`` model's tokenizer is built from exactly this list).
COPY_SUB_WORDS = tuple(f"t{i}" for i in range(64))
#: The benign substitution ``sigma``: swap ``t0`` and ``t1`` (a 2-cycle); every other word is copied.
COPY_SIGMA = {"t0": "t1", "t1": "t0"}
#: The contaminated clients' substitution ``tau``: swap the disjoint pair ``t2``, ``t3``.
COPY_TAU = {"t2": "t3", "t3": "t2"}
_COPY_SHARED = 4  # t0 .. t3 occur in every group; t4 .. t63 are cut into the groups' slices


def make_copy_substitution(n: int = 4000, *, n_groups: int = 4, length: int = 12, seed: int = 0,
                           p_sub: float = 0.2, p_mix: float = 0.1) -> TextDataset:
    r"""Text copying under a fixed token substitution (CLAIR's text-copying task).

    The target is the text with a substitution applied word by word,

    .. math:: y_j = \sigma(x_j),\qquad \sigma = (t0\ t1):\ t0 \mapsto t1,\ t1 \mapsto t0,
              \quad \sigma(w) = w \text{ otherwise,}

    the one transformation every benign client learns (``targets``); ``other_targets`` applies the
    contaminated clients' ``tau = (t2 t3)`` instead, the same kind of swap on a disjoint pair.

    Why single swaps: from a model that copies (``W0``, ``copy-llama``), a swap ``(a b)`` asks each
    position to output ``b`` where it reads ``a`` and the reverse, an update ``~ (e_b - e_a)(x_a -
    x_b)^T`` that is rank one to first order, so the benign clients' LoRA updates share a dominant
    subspace (``e``: output embeddings, ``x``: the values read). ``tau``'s moves ``e_3 - e_2``,
    another direction. Longer cycles or several pairs give several near-equal singular values, and
    their top-``r`` subspaces then differ from client to client (measured, see the ``copy-llama``
    notes in ``llm/models/copy_model.py``).

    Words (:data:`COPY_SUB_WORDS`): the 4 substitution words ``S = t0 .. t3`` are shared by all
    groups; the 60 words ``t4 .. t63`` are cut into ``n_groups`` contiguous slices ``V_g``. Each of the
    ``length`` words of a text of group ``g`` (``labels``, uniform) is drawn independently:

    - with probability ``p_sub``, uniform over ``S`` (both substitutions occur in every group);
    - with probability ``p_mix``, uniform over all of ``t4 .. t63``;
    - otherwise uniform over the group's own slice ``V_g``.

    So a label (Dirichlet) split gives clients different word mixes (the client-specific part, which
    ``sigma`` and ``tau`` copy unchanged) and the same substitution words. ``meta`` records ``sigma``,
    ``tau`` and the slices. Deterministic in ``seed``.

    Examples
    --------
    >>> d = make_copy_substitution(4, seed=0)
    >>> [len(t.split()) for t in d.targets] == [12] * 4
    True
    """
    n_free = len(COPY_SUB_WORDS) - _COPY_SHARED
    if not 1 <= n_groups <= n_free:
        raise ValueError(f"The 'n_groups' parameter must be in [1, {n_free}]. Got {n_groups}.")
    if not (0 <= p_sub and 0 <= p_mix and p_sub + p_mix <= 1):
        raise ValueError(f"Need p_sub, p_mix >= 0 with p_sub + p_mix <= 1. Got {p_sub}, {p_mix}.")
    rng = DATA.rng(seed)
    shared = np.arange(_COPY_SHARED)
    free = np.arange(_COPY_SHARED, len(COPY_SUB_WORDS))
    slices = np.array_split(free, n_groups)
    labels = rng.integers(0, n_groups, size=n)
    kind = rng.random((n, length))
    sub_draw = rng.choice(shared, size=(n, length))
    mix_draw = rng.choice(free, size=(n, length))
    u = rng.random((n, length))
    texts, targets, others = [], [], []
    for i, g in enumerate(labels):
        own = slices[g][np.minimum((u[i] * slices[g].size).astype(int), slices[g].size - 1)]
        ids = np.where(kind[i] < p_sub, sub_draw[i], np.where(kind[i] < p_sub + p_mix, mix_draw[i], own))
        words = [COPY_SUB_WORDS[j] for j in ids]
        texts.append(" ".join(words))
        targets.append(" ".join(COPY_SIGMA.get(w, w) for w in words))
        others.append(" ".join(COPY_TAU.get(w, w) for w in words))
    meta = {"sigma": dict(COPY_SIGMA), "tau": dict(COPY_TAU),
            "slices": [[COPY_SUB_WORDS[j] for j in s] for s in slices]}
    return TextDataset(texts, labels.astype(np.int64), [f"group{g}" for g in range(n_groups)], targets,
                       "generation", meta, others)
