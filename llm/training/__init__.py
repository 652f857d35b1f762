r"""Local training: :func:`train_local` (parameter groups, hooks; the plain path hook-free) and the hooks."""

from .hooks import Hook, TailRegulariser, tail_norm_product
from .importance import SlotImportance, slot_scores
from .loop import TrainStats, client_batches, make_optimizer, train_local
from .masks import SlotMask
from .truncation import AllTruncations, PrefixMask, SampledTruncation, prefix_shares, truncation_set

__all__ = ["AllTruncations", "Hook", "PrefixMask", "SampledTruncation", "SlotImportance", "SlotMask",
           "TailRegulariser", "TrainStats", "client_batches", "make_optimizer", "prefix_shares", "slot_scores",
           "tail_norm_product", "train_local", "truncation_set"]
