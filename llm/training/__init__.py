r"""Local training: :func:`train_local` (parameter groups, hooks; the plain path hook-free) and the hooks."""

from .hooks import Hook, TailRegulariser, tail_norm_product
from .loop import TrainStats, client_batches, make_optimizer, train_local
from .masks import SlotMask

__all__ = ["Hook", "SlotMask", "TailRegulariser", "TrainStats", "client_batches", "make_optimizer", "tail_norm_product", "train_local"]
