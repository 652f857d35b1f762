#!/usr/bin/env bash
# Choose the learning rate of every method of every reproduction config on validation data, before the reruns.
#
#   configs/reproduce/tune_all.sh [EXPERIMENT ...]          run the tunes (default: all five experiments)
#   configs/reproduce/tune_all.sh --print [EXPERIMENT ...]  print the exact commands, run nothing
#   configs/reproduce/tune_all.sh --link [EXPERIMENT ...]   point each config at its tuned file (after the tunes)
#
# An EXPERIMENT may be narrowed to one config, EXPERIMENT/CONFIG (prelort/minilm_bbc): tune or link that one alone
# while the experiment's other configs wait for compute.
# Order (docs/reproduce.md): tune_all.sh, then tune_all.sh --link, then lowrank-fed reproduce NAME.
#
# Each config is one setting (model, data, ranks, scale convention) and is tuned alone, the constant twins too:
# `lowrank-fed tune CONFIG --param lr` runs every method of the config alone at each grid value on the tuning
# seeds 100, 101, 102 (never a seed a reproduction reports), scores the global model's validation accuracy
# (perplexity for SmolLM2) after the last round, takes the best mean, and adds up to 3 values past an edge that
# holds the best (docs/reproduce.md, "How hyper-parameters are chosen"). The grid is the config's rate x 1/3, 1, 3
# (tune's default, written out where every method shares the rate; the LoRA-A2 configs give their baselines 2e-3
# and LoRA-A2 2e-2, so each method gets its own: 0.000666667 0.002 0.006 and 0.00666667 0.02 0.06).
# Trials go to runs/tune/reproduce/EXPERIMENT/CONFIG/ (a stopped tune continues: finished trials are reused), the
# choices to configs/reproduce/EXPERIMENT/tuned/CONFIG.toml, the path --link makes the config's `tuned` key name.
#
# Validation: at least 200 examples (a standard error of about 0.035 per seed on an accuracy near 0.5, against 0.07
# with the default 50), held out of the training data. Where the config draws a training subset (train_size), the tune
# draws 200 more so the clients train on as many examples as in the reproduction (LoRA-A2: 2200 = 2000 + 200;
# the copy task: 260 = 60 + 200, i.e. 6 per client as in the config). BBC News (1780 training articles after the
# 20% test split) has no train_size: its tunes hold 200 out instead of the config's 50 (12 for SmolLM2), so their
# clients train on 150 (188) fewer articles than the reproduction's. HAFL's configs already hold out 200.
#
# CPU time, estimated from the committed runs (results/reproduce/*/seed*/timings.jsonl, the same per-method
# seconds as report.json's run times, one busy thread of this 2-core machine): one trial is one method on one seed,
# so a tune is 9 trials per method (3 values x 3 seeds), up to 18 with 3 extensions. PreLort's committed runs had
# 5 (MiniLM) and 3 (SmolLM2) local steps: their training seconds are scaled to 50 steps. Per config:
#   lora-a2  dir001_r1 0.9 h, dir001_r2 1.0 h, dir001_r8 0.9 h, dir05_r1 0.9 h, dir05_r2 0.9 h, dir05_r8 1.0 h
#            (trials: FedIT, FFA, FlexLoRA 70-95 s, LoRA-A2 130-160 s)                             total  5.6 h
#   byun-lee top10_bbc 1.3 h (FedIT 280 s, replication 260 s)                                       total  1.3 h
#   hafl     freezing 2.2 h (FedIT 300 s, HetLoRA 410 s, HAFL 170 s), truncation 0.7 h (HAFL 280 s),
#            homogeneous 0.8 h (FedIT at rank 32, no committed run: FedIT's 300 s), and the twins
#            freezing_constant 2.2 h, truncation_constant 0.7 h; freezing_zeropad (HAFL alone, zero-padding at
#            its slots, added later) 0.3 h                                                       total  6.9 h
#   prelort  minilm_bbc 9.6 h (each method 580-730 s at 50 steps), smollm2_headlines 17-19 h (each method
#            1000-1110 s at 50 steps, plus ~90 s for 200 validation perplexities in each of the 3 evaluations),
#            and the same for the twins                                                           total ~55 h
#   clair    copy_g0..g03 under a minute each (trials of 1-2 s); minilm_g0..g03 0.4-0.6 h each   total  2.1 h
# All five: about 70 h without extensions, up to twice that if every method's best lies at an edge. PreLort's
# four tunes are three quarters of it: run them on a GPU, or one experiment at a time (arguments above).
# Measured since (2026-12-05), with trials scored at round 0 and the last round only (tune sets eval_every = rounds)
# and 2 worker processes: a HAFL-setting trial takes 70-100 s of wall time (FedIT's took 157 s scored every round);
# hafl/freezing's last 21 trials (HetLoRA's 12, extended to 0.045, and HAFL's 9) took 46 min while tests and a
# reproduction shared the machine. The settings scored every round (hafl, byun-lee, SmolLM2) gain the most, those
# scored once already (lora-a2) nothing.
#
# The personalised methods of the CLAIR configs (`local`, which has no global model, and CLAIR, clair_nodetect and
# the oracle, whose clients each get their own download) are scored on what their benign clients use
# (val_benign_local_*: each client's model on its share of the validation split), FedIT and FlexLoRA on their
# global model's validation score. (Until 2026-12-06 CLAIR and its references were scored on their global model:
# results/tune/reproduce/clair-global-score/ for MiniLM; the copy task's kept only its tuned files.)
set -euo pipefail

cd "$(dirname "$0")/../.."
CONFIGS=${REPRODUCE_CONFIGS:-configs/reproduce}
LOWRANK_FED=${LOWRANK_FED:-.venv/bin/lowrank-fed}
TUNE_ROOT=${TUNE_ROOT:-runs/tune/reproduce}
SEEDS=(100 101 102)
EXPERIMENTS=(clair lora-a2 byun-lee hafl prelort)

mode=run
case "${1:-}" in
    --print) mode=print; shift ;;
    --link) mode=link; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
esac
selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${EXPERIMENTS[@]}")
for name in "${selected[@]}"; do
    case " ${EXPERIMENTS[*]} " in
        *" ${name%%/*} "*) ;;
        *) echo "error: unknown experiment '$name'; expected some of: ${EXPERIMENTS[*]}" >&2; exit 2 ;;
    esac
    if [[ $name == */*/* ]] || { [[ $name == */* ]] && [ ! -f "$CONFIGS/$name.toml" ]; }; then
        echo "error: '$name' names no config: expected EXPERIMENT/CONFIG, with $CONFIGS/EXPERIMENT/CONFIG.toml" >&2; exit 2
    fi
done

# wanted EXPERIMENT CONFIG: the experiment, or that config of it, was selected
wanted() { case " ${selected[*]} " in *" $1 "*|*" $1/$2 "*) return 0 ;; esac; return 1; }

# tune EXPERIMENT CONFIG [ARGS ...]: tune configs/reproduce/EXPERIMENT/CONFIG.toml's lr on seeds 100-102 into
# TUNE_ROOT/EXPERIMENT/CONFIG and copy its tuned.toml to configs/reproduce/EXPERIMENT/tuned/CONFIG.toml.
tune() {
    local exp=$1 stem=$2
    shift 2
    wanted "$exp" "$stem" || return 0
    local config=$CONFIGS/$exp/$stem.toml out=$TUNE_ROOT/$exp/$stem tuned=$CONFIGS/$exp/tuned/$stem.toml
    local cmd=("$LOWRANK_FED" tune "$config" --param lr --seeds "${SEEDS[@]}" --out "$out" --no-progress "$@")
    case $mode in
        print) printf '%q ' "${cmd[@]}"; echo ;;
        link) links+=("$config" "$tuned") ;;
        run)
            if grep -q '^tuned *=' "$config"; then
                echo "[tune_all] $config already names its tuned file (tune_all.sh --link was run); skipped" >&2
                return 0
            fi
            echo "[tune_all] $config" >&2
            "${cmd[@]}"
            mkdir -p "$(dirname "$tuned")"
            cp "$out/tuned.toml" "$tuned"
            if [ -n "$clair_from" ]; then
                local table
                table=$(sed -n '/^\[clair\]$/,/^$/p' "$CONFIGS/$exp/tuned/$clair_from.toml")
                if [ -z "$table" ]; then
                    echo "error: $CONFIGS/$exp/tuned/$clair_from.toml has no [clair] table to give $tuned" >&2
                    exit 2
                fi
                printf '\n# [clair] from %s.toml: CLAIR'"'"'s rate at gamma = 0, where its cut is calibrated\n%s\n' \
                    "$clair_from" "$table" >> "$tuned"
            fi
            echo "[tune_all] chosen: $tuned" >&2 ;;
    esac
    if [ "$mode" = print ] && [ -n "$clair_from" ]; then
        echo "# then [clair] of $CONFIGS/$exp/tuned/$clair_from.toml is appended to $tuned"
    fi
}
clair_from=""

# link CONFIG TUNED [CONFIG TUNED ...]: check that every tuned file exists (else nothing is changed); then add
# `tuned = "tuned/CONFIG.toml"` to each config (after its name), drop the [method] lr lines the tuned file now sets
# (a value given in two places is an error), and check that the config loads with the tuned values.
link() {
    "${PYTHON:-.venv/bin/python}" - "$@" <<'EOF'
import re
import sys
import tomllib
from pathlib import Path

from lowrank_fed.llm.config import RunConfig, load_config

pairs = [(Path(c), Path(t)) for c, t in zip(sys.argv[1::2], sys.argv[2::2], strict=True)]
todo = []
for config, tuned in pairs:
    if re.search(r"^tuned\s*=", config.read_text(), flags=re.M):
        print(f"[tune_all] {config} already names its tuned file; unchanged", file=sys.stderr)
    else:
        todo.append((config, tuned))
missing = [str(t) for _, t in todo if not t.is_file()]
if missing:
    print(f"error: {len(missing)} tuned files do not exist yet ({', '.join(missing)}): run "
          "configs/reproduce/tune_all.sh for them first; no config was changed", file=sys.stderr)
    raise SystemExit(2)
for config, tuned in todo:
    text = config.read_text()
    chosen = tomllib.loads(tuned.read_text())
    table, kept = None, []
    for line in text.splitlines(keepends=True):
        header = re.match(r"^\[([^\[\]]+)\]\s*$", line)
        if header or line.startswith("[["):  # an array of tables ([[attacks]]) is no method table
            table = header.group(1).strip() if header else "[[]]"
        key = re.match(r"^([A-Za-z_]+)\s*=", line)
        if key and table in chosen and key.group(1) in chosen[table]:
            continue  # the tuned file sets it now
        if key and table is None and key.group(1) in chosen and not isinstance(chosen[key.group(1)], dict):
            continue
        kept.append(line)
        if table is None and line.startswith("name ="):
            kept.append(f'tuned = "{tuned.relative_to(config.parent).as_posix()}"\n')
    new = "".join(kept)
    if new.count("\ntuned = ") != 1:
        print(f"error: {config} has no top-level name line to put tuned after; it and the rest unchanged",
              file=sys.stderr)
        raise SystemExit(2)
    config.write_text(new)
    merged = RunConfig.from_dict(load_config(config))
    for method, values in chosen.items():
        for option, value in (values.items() if isinstance(values, dict) else [(method, values)]):
            got = merged.method_options[method][option] if isinstance(values, dict) else getattr(merged, option)
            if got != value:
                config.write_text(text)
                print(f"error: {config}: {method}.{option} reads {got}, not the tuned {value}; it and the rest "
                      "unchanged", file=sys.stderr)
                raise SystemExit(1)
    print(f"[tune_all] {config} now reads {tuned}", file=sys.stderr)
EOF
}

links=()

# methods_but_clair CONFIG: the config's methods in its order, CLAIR left out (its rate comes from gamma = 0)
methods_but_clair() {
    "${PYTHON:-.venv/bin/python}" -c 'import sys, tomllib
print(" ".join(m for m in tomllib.load(open(sys.argv[1], "rb"))["methods"] if m != "clair"))' "$1"
}

# ---- CLAIR: equal ranks; `local` on its benign clients' own models. CLAIR's rate and its cut are coupled (the cut
# is calibrated on gamma = 0 runs at CLAIR's rate, and the rate is tuned under the cut), so CLAIR is tuned at
# gamma = 0 only and that rate is used at every gamma; the other methods are tuned per gamma. (Tuned per gamma, the
# copy task's gamma = 0.3 had no fixed point: under the cut 2.02 its tune separated 0.015 as better, under the cut
# 2.20 calibrated at 0.015 it tied 0.005 with 0.015.) Copy task: 200 validation texts on top of its 60 training ones.
tune clair copy_g0 --set train_size=260 --set val_size=200 --grid 0.00166667 0.005 0.015
tune clair minilm_g0 --set val_size=200 --grid 0.00166667 0.005 0.015
for g in g01 g02 g03; do
    # shellcheck disable=SC2046  # one word per method
    clair_from=copy_g0 tune clair "copy_$g" --methods $(methods_but_clair "$CONFIGS/clair/copy_$g.toml") \
        --set train_size=260 --set val_size=200 --grid 0.00166667 0.005 0.015
    # shellcheck disable=SC2046
    clair_from=minilm_g0 tune clair "minilm_$g" --methods $(methods_but_clair "$CONFIGS/clair/minilm_$g.toml") \
        --set val_size=200 --grid 0.00166667 0.005 0.015
done

# ---- LoRA-A2: val_size = 0 in the configs; 200 validation examples drawn on top of the 2000 training ones.
# Default grid per method (each method's own rate x 1/3, 1, 3).
for a in 001 05; do
    for r in 1 2 8; do
        tune lora-a2 "dir${a}_r$r" --set train_size=2200 --set val_size=200
    done
done

# ---- Byun & Lee
tune byun-lee top10_bbc --set val_size=200 --grid 0.00166667 0.005 0.015

# ---- HAFL (val_size = 200 already); the constant twins are their own settings.
for stem in freezing homogeneous freezing_constant freezing_zeropad freezing_heldmean; do
    tune hafl "$stem" --grid 0.00166667 0.005 0.015
done
# Truncation's clients receive truncations of its global model, and its claim (no drop at distribution) compares
# what they receive: it is tuned on that (each client's download on its share of the validation split). Until
# 2026-12-06 it was tuned on its global model: results/tune/reproduce/hafl-global-score/.
for stem in truncation truncation_constant; do
    tune hafl "$stem" --grid 0.00166667 0.005 0.015 --score-on downloads
done

# ---- PreLort (50 local steps; the rate of the 5- and 3-step settings was never re-tuned for them). MiniLM: chosen
# on what every client receives, its download on its validation share (--score-on downloads, the config key
# val_downloads), which two of its three claims read; each trial also records the global model's validation score,
# so the choice on the global model (the first claim's) is read from the same trials as a check. SmolLM2: on the
# global model, which two of its three claims read (docs/reproduce.md)
for stem in minilm_bbc minilm_bbc_constant; do
    tune prelort "$stem" --set val_size=200 --grid 0.00166667 0.005 0.015 --score-on downloads
done
for stem in smollm2_headlines smollm2_headlines_constant; do
    tune prelort "$stem" --set val_size=200 --grid 0.000333333 0.001 0.003
done

if [ "$mode" = link ] && [ ${#links[@]} -gt 0 ]; then
    link "${links[@]}"
fi
