#!/usr/bin/env bash
# FSSD Table 2 row A, training side: the FSSD LeNet recipe (benchmarks/configs/
# lenet_fashionmnist_train.yaml) for seeds 1-5 (Base/ODIN/Maha/MCD/FSSD use seeds 1-3; the Deep
# Ensembles draw their members from 1-5) and the same recipe with Outlier Exposure (KMNIST test
# split as outliers, lambda 0.5) for seeds 1-3. Two lanes of one thread each (2 cores).
# Usage: bash benchmarks/fssd_table2_train.sh [EPOCHS]   (default 14, the paper's)
set -euo pipefail
cd "$(dirname "$0")/.."
EPOCHS=${1:-14}
fit() {  # seed, experiment, extra args...
  local s=$1 exp=$2; shift 2
  local start; start=$(date +%s)
  OMP_NUM_THREADS=1 .venv/bin/lightning-ood fit \
    --config benchmarks/configs/lenet_fashionmnist_train.yaml \
    --seed_everything "$s" --trainer.max_epochs "$EPOCHS" --experiment "$exp" "$@" \
    > ".cache/bench_logs/$exp.log" 2>&1
  echo "$exp: $EPOCHS epochs in $(( $(date +%s) - start )) s"
}
mkdir -p .cache/bench_logs
OE=(--data.init_args.outlier_set kmnist --data.init_args.ood_sets "[mnist]")
( fit 1 "lenet_e${EPOCHS}_seed1"; fit 2 "lenet_e${EPOCHS}_seed2"; fit 3 "lenet_e${EPOCHS}_seed3"
  fit 3 "oe_lenet_e${EPOCHS}_seed3" "${OE[@]}" ) &
( fit 4 "lenet_e${EPOCHS}_seed4"; fit 5 "lenet_e${EPOCHS}_seed5"
  fit 1 "oe_lenet_e${EPOCHS}_seed1" "${OE[@]}"; fit 2 "oe_lenet_e${EPOCHS}_seed2" "${OE[@]}" ) &
wait
