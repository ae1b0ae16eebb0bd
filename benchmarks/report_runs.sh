#!/usr/bin/env bash
# The training runs behind docs/results.md, one after another (each uses every core).
#
#   bash benchmarks/report_runs.sh RUNS_ROOT DATASET_ROOT [EPOCHS] [SEEDS] [DATASETS]
#
# For each of DATASETS (default "mnist fashion-mnist"): SQ-VAE (I), VQ-VAE and VQ-VAE with
# the EMA codebook, EPOCHS epochs (default 3) for each seed in SEEDS (default "0 1 2").
# Finished runs are skipped, so the script can be re-run. The paper-length runs are
# benchmarks/long_runs.sh.
set -euo pipefail
runs=${1:?RUNS_ROOT}; data=${2:?DATASET_ROOT}; epochs=${3:-3}; seeds=${4:-0 1 2}
sets=${5:-mnist fashion-mnist}
here=$(cd "$(dirname "$0")/.." && pwd)

train() {  # config, seed, epochs, run folder name under RUNS_ROOT, extra overrides...
    local config=$1 seed=$2 n=$3 folder=$4; shift 4
    # A finished run (it has its test record) is kept; an unfinished one is started again.
    for done in "$runs/$folder"/*_seed"${seed}"_*; do
        if grep -qs '"split": "test"' "$done/metrics.jsonl"; then return 0; fi
        rm -rf "$done"
    done
    python "$here/main.py" -c "$config" --save --seed "$seed" train.epoch_max "$n" \
        path "$runs" path_specific "$folder/" path_dataset "$data" "$@"
}

for set in $sets; do
    for seed in $seeds; do
        train "${set}_gauss_1.yaml" "$seed" "$epochs" "${set}_sqvae_${epochs}ep"
        train "${set}_vqvae.yaml" "$seed" "$epochs" "${set}_vqvae_${epochs}ep"
        train "${set}_vqvae.yaml" "$seed" "$epochs" "${set}_vqvae_ema_${epochs}ep" \
            quantization.ema True
    done
done
