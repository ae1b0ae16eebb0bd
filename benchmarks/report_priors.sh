#!/usr/bin/env bash
# The priors behind docs/results.md: `-ts RUN --prior` for each run folder given (finished
# priors are only evaluated again), one after another.
#
#   bash benchmarks/report_priors.sh DATASET_ROOT EPOCHS RUN...
#
# EPOCHS caps the prior's epochs (prior.epoch_max) to fit a CPU session.
set -euo pipefail
data=${1:?DATASET_ROOT}; epochs=${2:?EPOCHS}; shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
for run in "$@"; do
    python "$here/main.py" -c mnist_gauss_1.yaml -ts "$run" --prior path_dataset "$data" \
        prior.epoch_max "$epochs"
done
