r"""Every method's options (its ``[method]`` table of a run config), importing no torch.

The run config (:mod:`lowrank_fed.llm.config`) validates a ``[method]`` table through the ``Options`` model that
:mod:`.registry` names for the method, so checking a config never imports a method's class (torch, PEFT). Each
method file imports its model from here (``Options = HetLoRAOptions``); a method without options of its own uses
:class:`Options` (its client policy needs its own server rule) or :class:`PairOptions` (any rule of
:data:`PAIR_RULES` may serve it). Every float option is finite; unknown keys are errors.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: CLAIR's default false-alarm level of the gap rule, :data:`lowrank_fed.robust.detection.GAP_LEVEL` written out (a
#: test checks they agree): importing ``lowrank_fed.robust`` would import SciPy, half a second of every config check.
GAP_LEVEL = 0.05

__all__ = ["PAIR_RULES", "Options", "PairOptions", "HetLoRAOptions", "PreLortOptions", "HAFLOptions",
           "LoRAA2Options", "CLAIROptions", "ClairNoDetectOptions"]


#: The server rules a client policy that downloads a prefix and uploads whole pairs of its rank can pair with.
PAIR_RULES = ("zero_pad", "replication", "segment", "svd")


class Options(BaseModel):
    r"""A method's options (a ``[method]`` table of the run config); unknown keys are errors.

    ``server`` pairs the method's client policy with another server rule from the core (composition):
    only methods whose clients download a prefix and upload whole pairs (FedIT, HetLoRA, replication,
    PreLort) accept one of :data:`PAIR_RULES`; the others need their own rule and refuse any other.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # every float option finite
    pairs_with: ClassVar[tuple[str, ...]] = ()
    server: str | None = Field(None, description="another server rule for this client policy (composition)")
    freeze_head: bool = Field(False, description="the classifier head stays the shared initial one: never trained, "
                                                 "uploaded or averaged (LoRA-A2's setting, for any method)")
    lr: float | None = Field(None, gt=0, description="this method's learning rate instead of the run's `lr` (so each "
                                                  "method's can be chosen on validation data)")

    @field_validator("server")
    @classmethod
    def _server(cls, value):
        if value is not None and value not in cls.pairs_with:
            if not cls.pairs_with:
                raise ValueError("no other server rule: this method's client policy needs its own server rule")
            raise ValueError(f"one of {list(cls.pairs_with)}")
        return value


class PairOptions(Options):
    """Options of a prefix-download, whole-pair-upload client policy: any rule of :data:`PAIR_RULES` may serve it."""

    pairs_with: ClassVar[tuple[str, ...]] = PAIR_RULES


class HetLoRAOptions(PairOptions):
    lam: float = Field(0.01, ge=0.0, description="regularisation strength lambda")
    gamma: float = Field(0.99, gt=0.0, lt=1.0, description="pruning ratio")
    r_min: int = Field(1, ge=1, description="smallest rank a client prunes to")


class PreLortOptions(PairOptions):
    nested: Literal["sample", "all", "off"] = Field(
        "sample", description="prefix-nested training: one sampled truncation per batch, the mean over all, or off")


class HAFLOptions(Options):
    variant: Literal["truncation", "freezing"] = Field(
        "freezing", description="truncation: a client holds only its top-r_k slots; freezing: all R, the rest frozen")
    scorer: Literal["client", "server"] = Field(
        "client", description="who scores the slots: the clients' AdaLoRA sensitivity, or the server's norm(b_i) norm(a_i)")
    beta1: float = Field(0.85, ge=0.0, lt=1.0, description="smoothing of the sensitivity (AdaLoRA's beta_1)")
    beta2: float = Field(0.85, ge=0.0, lt=1.0, description="smoothing of its uncertainty (AdaLoRA's beta_2)")
    aggregation: Literal["slotwise", "zero_pad", "held_mean"] = Field("slotwise", description=(
        "the server rule: the adaptive rank-1 average (slot i over the clients that updated it), zero-padding at "
        "the same slots (over every client, a zero where a client did not update: the rule the adaptive one is "
        "claimed to beat), or held_mean (over every client, the previous global value where a client did not "
        "update: under freezing the FedAvg of the whole held adapters); the client side unchanged"))


class LoRAA2Options(Options):
    global_rank: int = Field(16, ge=1, description=(
        "r_G, the rank every client holds; budgets r_k <= r_G; at most min(d_out, d_in) of the smallest adapted module"))
    lr_ratio: float = Field(5.0, gt=0.0, description="eta_B / eta_A (eta_A = the run's lr)")
    probe: Literal["round", "epoch"] = Field(
        "epoch", description="probe batches: `epoch` (one pass over the client's data) or `round` (the local round's)")


class CLAIROptions(Options):
    rank: Union[int, None] = Field(None, ge=1, description=(
        "rank of the shared subspace per module; absent: the smallest participant rank"))
    lam: Union[float, Literal["default", "path", "auto"]] = Field("default", description=(
        "block penalty: `default` (2 sqrt(rank / ((1 - gamma_bar) K))), a number, or `path` / `auto` (chosen "
        "from the data by CLAIR's path; on noisy LoRA updates it was measured to end at S = 0, flagging nobody)"))
    gamma_bar: float = Field(0.3, ge=0.0, lt=1.0, description="upper bound on the contaminated share (`default` lam)")
    threshold: Union[Literal["gap"], float] = Field("gap", description=(
        "the decision on the clients' mean z-scores: `gap` (flag those above the largest significant gap of the "
        "sorted scores, false alarm `gap_level` per round under a Gaussian null) or a number z* (flag scores above "
        "it: one calibrated on uncontaminated validation runs, or the former fixed cut 3)"))
    gap_level: float = Field(GAP_LEVEL, gt=0.0, lt=1.0, description=(
        "the gap rule's false-alarm probability per round when no client is contaminated (Gaussian scores)"))
    z_threshold: Union[float, None] = Field(None, gt=0.0, description=(
        "the former fixed cut (3): flag a mean z-score above it; when set, it is the threshold (same as "
        "`threshold = z`), so configs that set it keep their decision"))
    refine: bool = Field(True, description="benign clients download their refined adapter; false: the benign mean")
    score: Literal["adapter", "update"] = Field("adapter", description=(
        "what the clients are scored on: `adapter` (each client's whole uploaded adapter) or `update` (this "
        "round's change, the upload minus what the client downloaded; the subspace and the refinement still use "
        "whole adapters)"))
    keep_flags: bool = Field(False, description=(
        "a flagged client stays flagged for the rest of the run (ours, not in the paper): left out of the mean, the "
        "head and the subspace and sent the benign mean after every later round it takes part in; its scores are "
        "still computed and recorded. False: each round decides afresh (the paper's per-round rule)"))

    @model_validator(mode="after")
    def _one_threshold(self):
        if self.z_threshold is not None and "threshold" in self.model_fields_set \
                and self.threshold != self.z_threshold:
            raise ValueError(f"set `threshold` or the older `z_threshold`, not both "
                             f"(got threshold = {self.threshold!r}, z_threshold = {self.z_threshold!r})")
        if not isinstance(self.threshold, str) and not self.threshold > 0:
            raise ValueError(f"a numeric `threshold` must be > 0 (a z-score cut); got {self.threshold!r}")
        return self

    @property
    def decision(self):
        """The threshold in force: ``z_threshold`` when set, else ``threshold``."""
        return self.threshold if self.z_threshold is None else self.z_threshold


class ClairNoDetectOptions(Options):
    rank: Union[int, None] = CLAIROptions.model_fields["rank"]
    refine: bool = CLAIROptions.model_fields["refine"]
