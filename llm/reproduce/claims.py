r"""The five reproductions: which configs each runs, and how its claims are read from the runs.

Every claim is read from paired per-seed differences (:mod:`.verdicts`): the claimed winner minus **each**
baseline on the same seed (same split, partition and batches), a drop, a saving. Each difference gets a 95%
Student-t interval over seeds and a verdict against its threshold (**holds** above, **tie** across, **does not
hold** below; **too few seeds** under 3); a claim against several baselines holds only if it holds against each
(:func:`~.verdicts.combine`). A claim whose runs do not exist yet says **not run yet**; one that the experiment
cannot test says **not testable here** and why. Counts follow the papers: LoRA-A2's saving is against fine-tuning
the whole model, HAFL's bytes against the homogeneous rank-``R`` federation that freezing replaces, HAFL's drop at
distribution is scored per client on what it downloads. The claims and the papers' numbers are those of the papers
(see ``docs/reproduce.md``); nothing here is tuned on the test set: the configs' hyper-parameters were chosen on
validation splits, as their headers say.

The claims are defined per paper in :mod:`.papers` (``papers/lora_a2.py``, ``byun_lee.py``, ``hafl.py``,
``prelort.py``, ``clair.py``: each its ``EXPERIMENT``); what they are made of is in :mod:`.analysis`, how a claim
measured under both scale conventions is published in :mod:`.twins`. This module is the registry
(:data:`EXPERIMENTS`) and keeps every name it held importable from here.
"""

from __future__ import annotations

# every name this module held before the split, kept importable from here
from .analysis import (UNTUNED, Claim, Experiment, _against, _decide, _diff, _correct,  # noqa: F401
                       _final, _last, _ms, _near_chance, _no_runs, _not_run, _per_seed, _seeds, _take, _titles, _vs,
                       describe, model_params)
from .papers import byun_lee, clair, hafl, lora_a2, prelort
from .papers.byun_lee import _byun_lee, _top_client  # noqa: F401
from .papers.clair import DETECTION_SHARE, _benign, _clair, _detections  # noqa: F401
from .papers.hafl import _client_drop, _client_drops, _hafl, _rounds_to  # noqa: F401
from .papers.lora_a2 import LORA_A2_BAND, LORA_A2_SAVING, _lora_a2, _within  # noqa: F401
from .papers.prelort import (PRELORT_PPL_TOL, _by_rank, _nested, _prelort, _prelort_minilm,  # noqa: F401
                             _prelort_smollm2)
from .runs import Results, Run  # noqa: F401
from .verdicts import mean_sd, verdict

__all__ = ["EXPERIMENTS", "Experiment", "Claim", "Run", "UNTUNED", "describe", "mean_sd", "verdict", "model_params"]

#: Every reproduction, by name, in the order ``--list`` shows them.
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (lora_a2.EXPERIMENT, byun_lee.EXPERIMENT, hafl.EXPERIMENT,
                                                           prelort.EXPERIMENT, clair.EXPERIMENT)}

