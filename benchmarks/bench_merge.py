r"""``lowrank-fed merge`` against PEFT's own ``add_weighted_adapter(combination_type="svd")`` on the same adapters.

A base model of ``L`` layers, each one ``d x d`` linear map (``layers.<i>.proj``), and ``K`` PEFT LoRA adapters of
ranks 4..64 on every layer, saved by PEFT. Both merge them into one rank-64 adapter, the best rank-64
approximation of ``sum_k p_k s_k B_k A_k`` (``p_k`` the normalised weights, ``s_k = lora_alpha / r_k``):

- **PEFT**: the adapters loaded into one ``PeftModel`` (``load_adapter``), then ``add_weighted_adapter(...,
  combination_type="svd", svd_rank=64)``, which forms each layer's dense ``d x d`` sum and takes its full SVD;
- **ours**: ``lowrank-fed merge C_1 .. C_K --rule svd --rank 64 --weights ...`` (reading the folders, the
  factored SVD of every module, writing the PEFT folder), and the library call alone,
  :func:`lowrank_fed.llm.adapters.aggregate_adapters` on the loaded adapters.

Each side runs in its own process, so its memory is its own; the table gives the time of the merge step and the
most memory it added above the process after loading (the process's peak reset at the step's start, ``VmHWM``).
Both results are compared with a float64 dense reference on the first and last layer (relative Frobenius error of
the rank-64 product against the best rank-64 approximation).
"""

from __future__ import annotations

from . import _threads  # noqa: F401  (before numpy)

import argparse
import contextlib
import io
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

RANKS = (4, 8, 16, 32, 48, 64)
RANK_OUT = 64


def _base(d: int, n_layers: int):
    import torch

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"proj": torch.nn.Linear(d, d, bias=False)})
                                              for _ in range(n_layers))

        def forward(self, x):
            for layer in self.layers:
                x = layer["proj"](x)
            return x

    torch.manual_seed(0)
    return Stack()


def make_adapters(folder: Path, d: int, n_layers: int) -> list[Path]:
    """``K`` PEFT adapters (ranks :data:`RANKS`, ``lora_alpha = 2 r``) with random, non-zero ``B`` and ``A``."""
    import torch
    from peft import LoraConfig, get_peft_model

    out = []
    for k, r in enumerate(RANKS):
        torch.manual_seed(100 + k)
        model = get_peft_model(_base(d, n_layers), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                                              init_lora_weights=False))
        path = folder / f"client{k}"
        model.save_pretrained(path)
        out.append(path)
    return out


def _status_mb(key: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of this process in MB; None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _mark() -> float:
    """Start a phase: reset this process's peak to its resident size (Linux ``clear_refs`` 5) and return the size.

    The process peak (``ru_maxrss``) alone cannot see a phase that stays below an earlier peak: in a full
    ``make bench`` run loading the adapters peaked higher than PEFT's merge, which then read as 0 MB. Where the
    reset is refused, the lifetime peak is used, a lower bound on the phase's memory.
    """
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return _status_mb("VmRSS") or 0.0


def _peak_since(start: float) -> float:
    """The phase's peak above its start (MB)."""
    peak = _status_mb("VmHWM")
    return (peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) - start


def _peft_side(paths, weights, d, n_layers, queue):
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base(d, n_layers), paths[0], adapter_name="c0")
    for k, path in enumerate(paths[1:], start=1):
        model.load_adapter(path, adapter_name=f"c{k}")
    before = _mark()
    t0 = time.perf_counter()
    model.add_weighted_adapter([f"c{k}" for k in range(len(paths))], list(weights), "merged",
                               combination_type="svd", svd_rank=RANK_OUT)
    seconds = time.perf_counter() - t0
    layers = (0, n_layers - 1)
    deltas = {i: model.base_model.model.layers[i]["proj"].get_delta_weight("merged").double() for i in layers}
    queue.put({"seconds": seconds, "peak_mb": _peak_since(before), "deltas": {i: t.numpy() for i, t in deltas.items()}})


def _our_side(paths, weights, out, queue):
    from lowrank_fed.cli import main as cli_main
    from lowrank_fed.llm.adapters import aggregate_adapters, load_peft_adapter

    adapters = [load_peft_adapter(p) for p in paths]
    before = _mark()
    t0 = time.perf_counter()
    merged = aggregate_adapters("svd", adapters, weights, rank=RANK_OUT)
    library = time.perf_counter() - t0
    peak = _peak_since(before)
    del merged
    argv = ["merge", *map(str, paths), "--rule", "svd", "--rank", str(RANK_OUT), "--weights",
            *map(str, weights), "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its table: not part of this benchmark's output
        status = cli_main(argv)
    command = time.perf_counter() - t0
    queue.put({"library": library, "command": command, "status": status, "peak_mb": peak})


def _in_child(target, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _reference(paths, weights, layer: int):
    """The best rank-64 approximation of the layer's exact weighted sum, dense, float64."""
    import numpy as np

    from lowrank_fed.llm.adapters import load_peft_adapter

    p = np.asarray(weights) / np.sum(weights)
    total = None
    for pk, path in zip(p, paths, strict=True):
        adapter = load_peft_adapter(path)
        module = next(m for m in adapter.pairs if f"layers.{layer}." in m)
        pair = adapter.pairs[module]
        term = pk * (pair.B.double().numpy() @ pair.A.double().numpy())
        total = term if total is None else total + term
    U, S, Vh = np.linalg.svd(total, full_matrices=False)
    return (U[:, :RANK_OUT] * S[:RANK_OUT]) @ Vh[:RANK_OUT], module


def main(argv=None) -> int:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="d = 128, 4 layers")
    parser.add_argument("--full", action="store_true", help="d = 4096, 32 layers (PEFT takes tens of minutes)")
    args = parser.parse_args(argv)
    d, n_layers = (128, 4) if args.quick else (4096, 32) if args.full else (1024, 32)
    weights = [float(w) for w in range(10, 10 * len(RANKS) + 1, 10)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_adapters(tmp, d, n_layers)
        peft = _in_child(_peft_side, paths, [w / sum(weights) for w in weights], d, n_layers)
        ours = _in_child(_our_side, paths, weights, tmp / "merged")
        if ours["status"] != 0:
            print(f"lowrank-fed merge failed with exit status {ours['status']}", file=sys.stderr)
            return 1
        from lowrank_fed.llm.adapters import load_peft_adapter

        merged = load_peft_adapter(tmp / "merged")
        errors = {"peft": [], "ours": []}
        for i in (0, n_layers - 1):
            ref, module = _reference(paths, weights, i)
            pair = merged.pairs[module]
            ours_delta = pair.B.double().numpy() @ pair.A.double().numpy()
            for side, delta in (("peft", peft["deltas"][i]), ("ours", ours_delta)):
                errors[side].append(float(np.linalg.norm(delta - ref) / np.linalg.norm(ref)))
    from lowrank_fed.experiments.table import print_table

    print_table(
        f"merge of {len(RANKS)} PEFT adapters (ranks {RANKS}) on {n_layers} layers of {d} x {d} into rank {RANK_OUT}, "
        "float32, one BLAS thread",
        ["measure", "value"],
        [
            ["PEFT add_weighted_adapter(svd) s / per layer s", f"{peft['seconds']:.2f} / {peft['seconds'] / n_layers:.3f}"],
            ["ours, aggregate_adapters s", f"{ours['library']:.3f}"],
            ["ours, the whole `lowrank-fed merge` command (read, merge, write) s", f"{ours['command']:.2f}"],
            ["speed-up, PEFT / aggregate_adapters", f"{peft['seconds'] / ours['library']:.0f}x"],
            ["speed-up, PEFT / lowrank-fed merge", f"{peft['seconds'] / ours['command']:.1f}x"],
            ["peak memory above loading: PEFT / ours MB", f"{peft['peak_mb']:.0f} / {ours['peak_mb']:.0f}"],
            ["error vs float64 best rank-64 approximation, first / last layer: PEFT",
             " / ".join(f"{e:.1e}" for e in errors["peft"])],
            ["same, ours (as written by merge)", " / ".join(f"{e:.1e}" for e in errors["ours"])],
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
