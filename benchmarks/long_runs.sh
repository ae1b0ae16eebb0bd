#!/usr/bin/env bash
# The paper-length runs behind docs/results.md: SQ-VAE (I), VQ-VAE and VQ-VAE with EMA,
# seed 0, for EPOCHS epochs (default 100, the experiment files' epoch_max), side by side
# with one thread each (on a 2-core CPU three one-thread runs beat one after another).
#
#   bash benchmarks/long_runs.sh RUNS_ROOT DATASET_ROOT [DATASET] [EPOCHS]
#
# DATASET is mnist (default) or fashion-mnist. Run it again to continue: an unfinished run
# folder is resumed exactly where it stopped, and a finished one says so and does nothing.
set -euo pipefail
runs=${1:?RUNS_ROOT}; data=${2:?DATASET_ROOT}; set=${3:-mnist}; epochs=${4:-100}
here=$(cd "$(dirname "$0")/.." && pwd)
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

one() {  # config, run folder name under RUNS_ROOT, extra overrides...
    local config=$1 folder=$2; shift 2
    local existing
    existing=$(ls -d "$runs/$folder"/*_seed0_* 2>/dev/null | tail -n 1 || true)
    if [ -n "$existing" ]; then
        python "$here/main.py" -c "$config" --resume "$existing"
    else
        python "$here/main.py" -c "$config" --save --seed 0 train.epoch_max "$epochs" \
            path "$runs" path_specific "$folder/" path_dataset "$data" "$@"
    fi
}

one "${set}_gauss_1.yaml" "${set}_sqvae_${epochs}ep" >> "$runs/${set}_sqvae_${epochs}ep.log" 2>&1 &
one "${set}_vqvae.yaml" "${set}_vqvae_${epochs}ep" >> "$runs/${set}_vqvae_${epochs}ep.log" 2>&1 &
one "${set}_vqvae.yaml" "${set}_vqvae_ema_${epochs}ep" quantization.ema True \
    >> "$runs/${set}_vqvae_ema_${epochs}ep.log" 2>&1 &
wait
