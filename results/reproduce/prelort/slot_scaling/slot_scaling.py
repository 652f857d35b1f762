"""PreLort's and replication's global rank-16 model with slots 9-16 (and 5-8) given zero-padding's weight.

A one-off diagnostic for docs/reproduce.md (the PreLort paragraph); it uses the runner's private set-up and scoring
(``Simulation.setup``, ``_load``, ``_score``) so its numbers are the runner's own, and may need updating if those
change. 0-based slots 8..15 are held by the rank-16 clients only, 4..7 by the clients of rank >= 8; zero-padding
would scale each factor of such a slot by ``w``, the data share of the clients holding it (the product by ``w^2``).
Columns: a_saved (as run; must equal the recorded accuracy), b_w16_B (B of slots 8..15 times w16), b2_w16_BA (B and A,
the product times w16^2), c_zero (slots 8..15 zeroed: the recorded rank-8 score), d_w16w8_B / d2_w16w8_BA (slots 4..7
too, with w8), e_zero4 (slots 4..15 zeroed: the recorded rank-4 score).

Usage: python slot_scaling.py RUN_DIR [ADAPTER_DIR]  > result.json
RUN_DIR is a finished run of configs/reproduce/prelort/minilm_bbc.toml (results/reproduce/prelort/minilm_bbc/seed<s>);
ADAPTER_DIR defaults to RUN_DIR/adapters (the adapters are not committed: rerun the stored config.json with
``lowrank-fed run``, methods ["replication", "prelort"] suffice, into a scratch folder and pass its adapters/).
"""
import json, sys, tempfile
from pathlib import Path

import numpy as np
from safetensors import safe_open

from lowrank_fed import FactorPair
from lowrank_fed.llm.config import RunConfig
from lowrank_fed.llm.evaluate import summarise
from lowrank_fed.llm.methods import Model, make_method
from lowrank_fed.llm.runner.simulation import Simulation, load_final, state_from_flat

run = Path(sys.argv[1])
adapters = Path(sys.argv[2]) if len(sys.argv) > 2 else run / "adapters"
methods = ["prelort", "replication"]
cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
sim = Simulation(cfg, tempfile.mkdtemp(), progress=False)
sim.setup()
setup = json.loads((run / "setup.json").read_text())
assert setup["n_k"] == sim.n_k and setup["ranks"] == sim.ranks, (setup["n_k"], sim.n_k)
n, r = np.array(sim.n_k, float), np.array(sim.ranks)
w16 = n[r >= 16].sum() / n.sum()   # zero-pad weight of slots 8..15
w8 = n[r >= 8].sum() / n.sum()     # zero-pad weight of slots 4..7
recorded = {}
for line in (run / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if row["round"] == cfg.rounds and row["method"] in methods:
        recorded[row["method"]] = row


def scaled(pairs, spec, both):
    """spec: list of (lo, hi, factor); scales B columns lo..hi-1 (and A rows too if both)."""
    out = {}
    for m, p in pairs.items():
        B, A = p.B.clone(), p.A.clone()
        for lo, hi, f in spec:
            B[:, lo:hi] *= f
            if both:
                A[lo:hi, :] *= f
        out[m] = FactorPair(B, A)
    return out


def score(model):
    sim._load(model)
    return summarise(sim._score("test"))["accuracy"]


results = []
for name in methods:
    path = adapters / f"{name}.safetensors"
    tensors = {k: v.to(sim.device) for k, v in load_final(path).items()}
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["lowrank_fed"])
    server, _ = state_from_flat(tensors, {"server": meta["state"], "clients": {}}, sim.ws.shapes)
    method = make_method(name, **cfg.method_options.get(name, {}))
    g = method.global_model(server)
    assert all(p.rank == 16 for p in g.pairs.values())
    rec = recorded[name]
    res = {"seed": cfg.seed, "method": name, "round": server.round, "recorded": rec["accuracy"],
           "recorded_by_rank": {k: v["accuracy"] for k, v in rec["by_rank"].items()}, "w16": w16, "w8": w8}
    res["a_saved"] = score(g)
    res["b_w16_B"] = score(Model(scaled(g.pairs, [(8, 16, w16)], False), g.extras, None))
    res["b2_w16_BA"] = score(Model(scaled(g.pairs, [(8, 16, w16)], True), g.extras, None))
    res["c_zero"] = score(Model(scaled(g.pairs, [(8, 16, 0.0)], False), g.extras, None))
    res["d_w16w8_B"] = score(Model(scaled(g.pairs, [(8, 16, w16), (4, 8, w8)], False), g.extras, None))
    res["d2_w16w8_BA"] = score(Model(scaled(g.pairs, [(8, 16, w16), (4, 8, w8)], True), g.extras, None))
    res["e_zero4"] = score(Model(scaled(g.pairs, [(4, 16, 0.0)], False), g.extras, None))
    results.append(res)
print(json.dumps(results, indent=1))
