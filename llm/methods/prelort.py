r"""PreLort's server side: segment-wise aggregation and prefix download.

.. math:: b_i = \frac{\sum_{k: r_k > i} p_k b_{k,i}}{\sum_{k: r_k > i} p_k},\qquad a_i \text{ likewise}

Each slot is averaged over the clients that hold it; a slot no participant holds keeps its previous
global value (``previous=`` of the core rule). Client: downloads ``truncate(global, r_k)``.

Source: PreLort [abstract]; the rule details are our reconstruction (``docs/methods.md``). Clients
train plainly here; prefix-nested training is the seed methods' client side (next issue).
"""

from __future__ import annotations

from .base import Method

__all__ = ["PreLort"]


class PreLort(Method):
    """PreLort's aggregation: ``aggregate("segment", pairs, n_k, previous=global)``."""

    name, title, rule = "prelort", "PreLort (segment)", "segment"

    def rule_options(self, server, module):
        return {"previous": server.pairs[module]}
