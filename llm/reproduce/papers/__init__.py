"""The seed papers' claims, one module per paper: each defines its ``EXPERIMENT`` (configs, differences from
the paper, how its claims are read from the runs); :data:`~lowrank_fed.llm.reproduce.claims.EXPERIMENTS` lists them."""
