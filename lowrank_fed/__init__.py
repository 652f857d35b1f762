r"""lowrank-fed: federated LoRA fine-tuning with heterogeneous client ranks.

The core (this package) is NumPy / array-API code: factor pairs, the aggregation rules of
FedIT, HetLoRA, replication padding, PreLort, HAFL, FLoRA, FlexLoRA and LoRA-A2, and CLAIR's
robust recovery (:mod:`lowrank_fed.robust`). It never imports torch; it accepts torch tensors
through the array API standard.
"""

from .aggregation import AGGREGATORS, aggregate, alternating_update, redistribute, select_slots
from .factors import FactorPair, pad, truncate
from .linalg import factored_svd, sin_theta

__all__ = [
    "AGGREGATORS",
    "FactorPair",
    "aggregate",
    "alternating_update",
    "factored_svd",
    "pad",
    "redistribute",
    "select_slots",
    "sin_theta",
    "truncate",
]
__version__ = "0.1.0"
